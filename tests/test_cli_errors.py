"""Usage and configuration errors of the ``mlfleet`` command: one line naming the option and the
rule, no traceback, and the documented exit code (2 for usage or configuration, 3 no answer)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(120)

NOWHERE = "tcp://127.0.0.1:1"  # nothing listens there: a call that is sent gets no answer (3)


def mlfleet(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
            timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlfleet", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


def said(p: subprocess.CompletedProcess) -> str:
    """stderr with rich's box characters and line wrapping collapsed."""
    return " ".join(p.stderr.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def usage_error(p: subprocess.CompletedProcess, *words: str) -> None:
    text = said(p)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in text, (w, text)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    for name in ("admin", "coordinator"):
        assert mlfleet("keys", "generate", name, "--out", str(out)).returncode == 0
    return out


# ---- 1. client keys ------------------------------------------------------------------------------

def test_a_missing_client_key_file_is_a_usage_error(tmp_path):
    p = mlfleet("nodes", "list", "--coordinator", NOWHERE,
                env={"MLFLEET_SECRET_KEY": str(tmp_path / "no.key"),
                     "MLFLEET_COORDINATOR_KEY": str(tmp_path / "no.pub")})
    usage_error(p, "MLFLEET_SECRET_KEY")


def test_a_client_key_readable_by_others_is_a_usage_error(keys):
    (keys / "admin.key").chmod(0o644)
    p = mlfleet("nodes", "list", "--coordinator", NOWHERE,
                env={"MLFLEET_SECRET_KEY": str(keys / "admin.key"),
                     "MLFLEET_COORDINATOR_KEY": str(keys / "coordinator.pub")})
    usage_error(p, "MLFLEET_SECRET_KEY", "chmod 600")


def test_a_client_key_without_its_partner_is_a_usage_error(keys):
    p = mlfleet("nodes", "list", "--coordinator", NOWHERE,
                env={"MLFLEET_SECRET_KEY": str(keys / "admin.key"), "MLFLEET_COORDINATOR_KEY": ""})
    usage_error(p, "MLFLEET_COORDINATOR_KEY")


def test_a_junk_coordinator_key_is_a_usage_error(keys, tmp_path):
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    p = mlfleet("--secret-key", str(keys / "admin.key"), "--coordinator-key", str(junk),
                "nodes", "list", "--coordinator", NOWHERE)
    usage_error(p, "--coordinator-key", str(junk))


def test_key_files_relative_to_the_working_directory_are_read(keys):
    p = mlfleet("nodes", "list", "--coordinator", NOWHERE, cwd=keys,
                env={"MLFLEET_SECRET_KEY": "admin.key", "MLFLEET_COORDINATOR_KEY": "coordinator.pub"})
    assert p.returncode == 3, p.stderr  # the keys were read; nothing answered
    p = mlfleet("nodes", "list", "--coordinator", NOWHERE, cwd=keys.parent,
                env={"MLFLEET_SECRET_KEY": "admin.key", "MLFLEET_COORDINATOR_KEY": "coordinator.pub"})
    usage_error(p, "MLFLEET_SECRET_KEY", "admin.key")


def test_rotate_key_refuses_a_public_key_that_is_neither_a_file_nor_z85():
    p = mlfleet("nodes", "rotate-key", "n", "--public-key", "abc", "--coordinator", NOWHERE)
    usage_error(p, "--public-key", "abc")


# ---- 2. daemon start-up --------------------------------------------------------------------------

@pytest.mark.parametrize("daemon,port", [("coordinator", "99999"), ("agent", "70000")])
def test_a_metrics_port_out_of_range_is_a_usage_error(daemon, port, tmp_path):
    args = ["--node-id", "n1", "--coordinator", NOWHERE] if daemon == "agent" else ["--listen", "tcp://127.0.0.1:0"]
    p = mlfleet(daemon, *args, "--data-dir", str(tmp_path / "d"), "--metrics-listen", port)
    usage_error(p, "--metrics-listen", "0-65535")


@pytest.mark.parametrize("daemon", ["coordinator", "agent"])
def test_an_unwritable_ready_file_is_a_usage_error(daemon, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    args = ["--node-id", "n1", "--coordinator", NOWHERE] if daemon == "agent" else ["--listen", "tcp://127.0.0.1:0"]
    p = mlfleet(daemon, *args, "--data-dir", str(tmp_path / "d"), "--ready-file", str(afile / "r.json"))
    usage_error(p, "--ready-file", str(afile))


# ---- 3. arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("interval", ["bogus", "-1s", "0s"])
def test_stats_watch_needs_a_positive_interval(interval):
    p = mlfleet("deployments", "stats", "--watch", "--interval", interval, "--coordinator", NOWHERE,
                timeout=30)
    usage_error(p, "--interval")


def test_ragged_docs_are_a_usage_error():
    p = mlfleet("infer", "x", "--docs", '[{"input": [[1,2],[3]]}]', "--coordinator", NOWHERE)
    usage_error(p, "--docs")


def test_checks_the_client_makes_before_sending_are_usage_errors():
    p = mlfleet("infer", "x", "--docs", '[{"input": [[1]]}]', "--timeout", "bogus", "--coordinator", NOWHERE)
    usage_error(p, "timeout")
    p = mlfleet("deployments", "start", "m", "--number-of-allocations", "99999999999999999999999",
                "--coordinator", NOWHERE)
    usage_error(p, "cannot be encoded")


# ---- 4. config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("daemon,args", [
    ("coordinator", ["--listen", "tcp://10.0.0.1:7600"]),
    ("agent", ["--node-id", "n1", "--listen", "tcp://10.0.0.1:7601"]),
    ("gateway", ["--listen", "http://10.0.0.1:9200"]),
])
def test_config_show_passes_a_refusal_s_exit_code_through(daemon, args):
    p = mlfleet("config", "show", daemon, *args)
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout, p.stderr)


def test_config_show_passes_a_bad_parameter_through():
    p = mlfleet("config", "show", "coordinator", "--heartbeat-interval", "2s", "--node-timeout", "1s")
    usage_error(p, "--node-timeout")


@pytest.mark.parametrize("toml,named", [
    ('[coordinator]\nnode_timout = "9s"\n', "node_timout"),
    ('[cordinator]\nnode_timeout = "9s"\n', "cordinator"),
    ('[agent]\nnode-idd = "x"\n', "node-idd"),
])
def test_unknown_config_keys_and_tables_are_refused(toml, named, tmp_path):
    cfg = tmp_path / "mlfleet.toml"
    cfg.write_text(toml)
    p = mlfleet("--config", str(cfg), "config", "show", "coordinator")
    usage_error(p, named, str(cfg))


def test_known_config_keys_are_taken(tmp_path):
    cfg = tmp_path / "mlfleet.toml"
    cfg.write_text('[coordinator]\nnode-timeout = "9s"\n[agent]\nnode_id = "x"\n')
    p = mlfleet("--config", str(cfg), "config", "show", "coordinator")
    assert p.returncode == 0, p.stderr
    assert '"node_timeout_s": 9.0' in p.stdout


# ---- 5. up and the demo --------------------------------------------------------------------------

def test_up_exits_2_when_the_coordinator_refuses_its_configuration(tmp_path):
    p = mlfleet("up", "--data-dir", str(tmp_path / "d"), "--listen", "tcp://10.0.0.1:7600",
                "--gateway-listen", "none")
    assert p.returncode == 2, p.stderr
    assert "refusing to listen on tcp://10.0.0.1:7600" in said(p)


def test_up_exits_2_when_the_coordinator_s_port_is_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = mlfleet("up", "--data-dir", str(tmp_path / "d"), "--listen", f"tcp://127.0.0.1:{port}",
                    "--gateway-listen", "none")
    assert p.returncode == 2, p.stderr


def test_up_refuses_a_data_dir_under_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    p = mlfleet("up", "--data-dir", str(afile / "d"), "--gateway-listen", "none")
    usage_error(p, "--data-dir", str(afile))


def test_the_demo_removes_its_work_dir_when_up_fails(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mlfleet.demo"], capture_output=True, text=True, cwd=ROOT,
                       timeout=90, env={**os.environ, "TMPDIR": str(tmp_path),
                                        "MLFLEET_CONFIG": str(tmp_path / "missing.toml")})
    assert p.returncode == 1 and "did not start" in p.stderr, p.stderr
    assert not list(tmp_path.glob("mlfleet-demo-*"))


# ---- 6. the agent's run dir ----------------------------------------------------------------------

def test_an_agent_that_cannot_bind_leaves_no_run_dir(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = mlfleet("agent", "--node-id", "n1", "--coordinator", NOWHERE, "--listen", f"tcp://127.0.0.1:{port}",
                    "--data-dir", str(tmp_path / "d"), env={"TMPDIR": str(tmp_path)})
    usage_error(p, "cannot start")
    assert not list(tmp_path.glob("mlfleet-agent-*"))


# ---- 8. key names --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b", ""])
def test_keys_generate_refuses_a_name_that_is_not_plain(name, tmp_path):
    p = mlfleet("keys", "generate", name, "--out", str(tmp_path / "k"))
    usage_error(p, "NAME")
    assert not list(tmp_path.rglob("*.key")) and not list(tmp_path.rglob("*.pub"))
