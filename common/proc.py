"""Process helpers: parent-death signals, ready files, graceful-then-SIGKILL stops."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from typing import Any

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Linux: deliver ``sig`` to this process when its parent exits (nothing is orphaned)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except OSError:
        pass


def write_ready_file(path: str, endpoint: str, **extra: Any) -> None:
    """Atomically write ``{"endpoint", "pid"}`` (write to a temp name, then rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"endpoint": endpoint, "pid": os.getpid(), **extra}, f)
    os.replace(tmp, path)


def sd_notify(message: str) -> None:
    """Send a message to systemd's notify socket, if we run under systemd with Type=notify."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    import socket
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError:
        pass


def watchdog_interval_s() -> float | None:
    """Half the systemd watchdog period when WatchdogSec= applies to this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None


def stop_process(proc: subprocess.Popen, grace_s: float = 5.0, sig: int = signal.SIGTERM) -> int:
    """Signal, wait up to ``grace_s``, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def kill_pid(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM a pid we do not own as a child, poll until gone, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
