"""Configuration from flags, MLFLEET_* variables and a TOML file, shown by `mlfleet config show`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(60)


def show(*args: str, env: dict[str, str] | None = None) -> dict:
    p = subprocess.run([sys.executable, "-m", "mlfleet", *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=50, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_flag_beats_variable_beats_file_beats_default(tmp_path):
    cfg = tmp_path / "mlfleet.toml"
    cfg.write_text('[coordinator]\nlisten = "tcp://127.0.0.1:7611"\nheartbeat-interval = "500ms"\n'
                   'node_timeout = "20s"\nadaptive_interval = "20s"\n'
                   '[agent]\nnode_id = "from-file"\nallocated_processors = 3\n')
    c = show("--config", str(cfg), "config", "show", "coordinator", "--adaptive-interval", "3s",
             env={"MLFLEET_COORDINATOR_NODE_TIMEOUT": "7s", "MLFLEET_COORDINATOR_ADAPTIVE_INTERVAL": "9s"})
    assert c["listen"] == "tcp://127.0.0.1:7611"      # file
    assert c["heartbeat_interval_s"] == 0.5            # file, dashes or underscores
    assert c["node_timeout_s"] == 7.0                  # variable beats file
    assert c["adaptive_interval_s"] == 3.0             # flag beats variable and file
    assert c["scale_up_cooldown_s"] == 300.0           # default
    a = show("config", "show", "agent", env={"MLFLEET_CONFIG": str(cfg)})
    assert a["node_id"] == "from-file" and a["allocated_processors"] == 3


def test_bad_config_file_is_a_clear_error(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[coordinator\nlisten = 1")
    p = subprocess.run([sys.executable, "-m", "mlfleet", "--config", str(cfg), "config", "show",
                        "coordinator"], capture_output=True, text=True, cwd=ROOT, timeout=50)
    assert p.returncode == 2 and "--config" in p.stderr
