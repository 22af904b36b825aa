"""The distribution installs one import package, ``mlfleet``; the shared layer knows no daemon."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(300)


def test_wheel_installs_only_the_mlfleet_package(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    wheel = next(tmp_path.glob("mlfleet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"mlfleet"}, top
    for sub in ("common", "agent", "coordinator"):
        assert f"mlfleet/{sub}/__init__.py" in names
    assert "mlfleet/common/client.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_the_shared_layer_imports_no_daemon():
    for path in sorted((ROOT / "common").glob("*.py")):
        bad = {m for m in _imports(path) if m.startswith(("mlfleet.agent", "mlfleet.coordinator",
                                                          "mlfleet.cli", "mlfleet.gateway"))}
        assert not bad, f"{path.name} imports {bad}"


def test_public_names_import_from_mlfleet():
    import mlfleet
    from mlfleet import ApiError, Client, TooManyRequests
    assert issubclass(TooManyRequests, ApiError)
    assert Client.__module__ == "mlfleet.common.client"
    assert mlfleet.__name__ == "mlfleet"
