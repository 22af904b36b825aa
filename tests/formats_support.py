"""One model in the three formats mlfleet serves, built once per test session.

AOTInductor compiles C++ (about 20-40 s on the 2-core VM), so whatever is compiled is cached
under the session's pytest base temp directory (``cached``): test modules each declare their
own session fixture, and the second one finds the files the first one built.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

N_IN = 2048  # Big: 64 MB of float32 weights, enough to see one copy per node in PSS


def cached(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """``base/formats-cache/name``, built by ``build(path)`` on first use in this session."""
    d = tmp_path_factory.getbasetemp() / "formats-cache"
    d.mkdir(exist_ok=True)
    path = d / name
    if not path.exists():
        part = d / f"building-{name}.pt2"  # aoti_compile_and_package wants the .pt2 suffix
        build(part)
        part.rename(path)
    return path


def big(seed: int = 0) -> torch.nn.Module:
    from tests.test_memory import Big
    torch.manual_seed(seed)
    return Big().eval()


def export_big(seed: int = 0) -> torch.export.ExportedProgram:
    """Big exported with a dynamic batch (an example of batch 2; batch 1 allowed)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.linspace(-1, 1, 2 * N_IN).reshape(2, N_IN)
    return torch.export.export(big(seed), (example,), dynamic_shapes=({0: batch},))


def save_torchscript(path: Path, seed: int = 0) -> None:
    with warnings.catch_warnings():  # the format itself is deprecated: building one is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(big(seed)), str(path))


def save_export(path: Path, seed: int = 0) -> None:
    torch.export.save(export_big(seed), str(path))


def save_aoti(path: Path, seed: int = 0) -> None:
    from torch._inductor import aoti_compile_and_package
    # Inductor takes a dynamic size as >= 2 (sizes 0 and 1 are specialised): without this, the
    # package's input check refuses batch 1, which the exported program accepts.
    aoti_compile_and_package(export_big(seed), package_path=str(path),
                             inductor_configs={"aot_inductor.check_lowerbound": False})


def need_compiler() -> None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build an AOTInductor package")


def big_in_three_formats(tmp_path_factory) -> dict[str, Path]:
    """{format: path} of the same Big (seed 0), the AOTInductor package compiled once per
    session (about 25 s). The names say nothing true about the format: the upload must read
    the contents."""
    need_compiler()
    return {"torchscript": cached(tmp_path_factory, "big-ts.pt2", save_torchscript),
            "export": cached(tmp_path_factory, "big-export.pt", save_export),
            "aoti": cached(tmp_path_factory, "big-aoti.zip", save_aoti)}


def hostile_native(tmp_path_factory) -> tuple[Path, Path]:
    """tests/hostile.py's AOTInductor package (a C++ compile), built once per session: its
    path and the directory its write and exec attempts aim at (baked into the library)."""
    from tests import hostile
    need_compiler()
    d = tmp_path_factory.getbasetemp() / "formats-cache"
    d.mkdir(exist_ok=True)
    target = d / "hostile-target"
    target.mkdir(exist_ok=True)
    pkg = cached(tmp_path_factory, "hostile.pt2", lambda p: hostile.native_package(
        p, read_path="/etc/hostname", write_path=str(target / "written"),
        marker_path=str(target / "marker")))
    return pkg, target
