"""The gateway's systemd unit verifies and is hardened like the others; the daemon speaks the
notify protocol (READY=1 once it serves, WATCHDOG=1 from its loop)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, wait_until

pytestmark = pytest.mark.timeout(120)
UNIT = ROOT / "systemd" / "mlfleet-gateway.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies_and_is_hardened(tmp_path):
    mlfleet = Path(sys.executable).with_name("mlfleet")
    (tmp_path / UNIT.name).write_text(UNIT.read_text().replace("/usr/local/bin/mlfleet", str(mlfleet)))
    p = subprocess.run(["systemd-analyze", "verify", str(tmp_path / UNIT.name)], capture_output=True,
                       text=True, timeout=60)
    problems = [ln for ln in (p.stdout + p.stderr).splitlines()
                if ln.strip() and "mlfleet" in ln and "Failed to" not in ln and "dbus" not in ln.lower()]
    assert p.returncode == 0, p.stdout + p.stderr
    assert not problems, problems
    p = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", p.stdout + p.stderr)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 1.2, m.group(1)  # the coordinator's limit


def test_gateway_sends_ready_and_feeds_the_watchdog(tmp_path):
    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(0.2)
    env = dict(os.environ, NOTIFY_SOCKET=addr, WATCHDOG_USEC="400000")
    proc = subprocess.Popen([sys.executable, "-m", "mlfleet", "gateway", "--listen", "http://127.0.0.1:0"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got: list[str] = []

    def receive():
        try:
            got.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            pass
        return "READY=1" in got and got.count("WATCHDOG=1") >= 2
    try:
        wait_until(receive, 60, interval_s=0.0, what="READY=1 and two WATCHDOG=1")
        assert got.index("READY=1") < got.index("WATCHDOG=1")
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        sock.close()

