"""The model sandbox (agent/sandbox.py): Landlock + seccomp, measured in real child processes.

Every sandbox is applied in a child (a Python subprocess: applying is irreversible) that prints
one JSON line of outcomes; the test asserts on them and on what the parent can see (files,
connections). Children are ended by pid (subprocess's timeout) if they hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mlfleet.agent import sandbox
from tests import hostile
from tests.formats_support import hostile_native

REPO = Path(__file__).resolve().parent.parent

needs_kernel = pytest.mark.skipif(
    not (sandbox.probe()["landlock_abi"] and sandbox.probe()["seccomp_filter"]),
    reason="the kernel lacks Landlock or seccomp filters")

PRELUDE = """
import errno, json, os, socket, subprocess, sys
from mlfleet.agent import sandbox
out = {}
def attempt(name, fn):
    try:
        r = fn()
        out[name] = {"ok": True, "value": r if isinstance(r, (int, str, bool, type(None))) else repr(r)}
    except BaseException as e:
        out[name] = {"ok": False, "error": type(e).__name__, "errno": getattr(e, "errno", None),
                     "message": str(e)[-300:]}
def done():
    sys.stdout.write("RESULT " + json.dumps(out) + "\\n")
    sys.stdout.flush()
"""


def child_env() -> dict:
    env = dict(os.environ)
    env["OPENBLAS_NUM_THREADS"] = "1"  # numpy's OpenBLAS starts no thread at import
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return env


def run_child(code: str, *args: str, timeout: float = 60) -> dict:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, env=child_env(),
                          cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, \
        f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def accepted(listener: socket.socket) -> bool:
    """Whether a connection is waiting on a non-blocking listener (the child has exited)."""
    try:
        listener.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def denied(outcome: dict, *errnos: int) -> bool:
    return not outcome["ok"] and (not errnos or outcome["errno"] in errnos)


@pytest.mark.timeout(30)
def test_probe_reports_this_kernel_without_side_effects():
    info = sandbox.probe()
    assert info["arch"] == "x86_64"
    assert info["landlock_abi"] is None or info["landlock_abi"] >= 1
    assert info["seccomp_mode"] == 0 and info["no_new_privs"] is False  # probing installed nothing


@pytest.mark.timeout(30)
def test_seccomp_program_checks_the_architecture_first():
    prog = sandbox.seccomp_program()
    assert prog[0] == (sandbox.BPF_LD_W_ABS, 0, 0, sandbox.OFF_ARCH)
    assert prog[1][0] == sandbox.BPF_JEQ_K and prog[1][3] == sandbox.AUDIT_ARCH_X86_64
    assert prog[3][0] == sandbox.BPF_JGE_K and prog[3][3] == sandbox.X32_SYSCALL_BIT
    rets = {k for code, _, _, k in prog if code == sandbox.BPF_RET_K}
    assert rets == {sandbox.SECCOMP_RET_ALLOW, sandbox.SECCOMP_RET_ERRNO | 1, sandbox.SECCOMP_RET_ERRNO | 38}
    assert len(prog) < 256


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory):
    """One sandboxed child that tries everything; its outcomes, and what the parent saw."""
    base = tmp_path_factory.mktemp("sandbox")
    rw, outside = base / "rw", base / "outside"
    rw.mkdir()
    outside.mkdir()
    (outside / "key").write_text("secret")  # the agent's user owns it, as the agent's key
    os.chmod(outside / "key", 0o600)
    model = base / "mlp.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())), str(model))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = """
    import time
    rw, outside, model, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import torch  # before the sandbox, as the host would
    early = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # created before: seccomp cannot see it
    t0 = time.perf_counter()
    report = sandbox.apply(read_paths=sandbox.default_read_paths() + [model], read_write_paths=[rw])
    out["apply_ms"] = (time.perf_counter() - t0) * 1000
    out["report"] = report.summary()
    out["status"] = {k: v for k, v in sandbox.probe().items() if k in ("seccomp_mode", "no_new_privs")}
    attempt("read /etc/hostname", lambda: open("/etc/hostname").read())
    attempt("read /etc/passwd", lambda: open("/etc/passwd").read())
    own = sys.argv[0] if os.path.isfile(sys.argv[0]) else "/proc/self/cmdline"
    attempt("read own source", lambda: open(own).read())
    attempt("write outside", lambda: open(os.path.join(outside, "leak"), "w").write("x"))
    attempt("write rw", lambda: open(os.path.join(rw, "ok"), "w").write("x"))
    attempt("stat /etc/hostname", lambda: os.stat("/etc/hostname").st_size)
    key = os.path.join(outside, "key")
    attempt("chmod a file outside", lambda: os.chmod(key, 0o644))
    attempt("chmod a directory outside", lambda: os.chmod(outside, 0))
    attempt("chown a file outside", lambda: os.chown(key, os.getuid(), os.getgid()))
    attempt("utime a file outside", lambda: os.utime(key, (0, 0)))
    attempt("setxattr a file outside", lambda: os.setxattr(key, "user.x", b"1"))
    def fchmod_model():
        fd = os.open(model, os.O_RDONLY)  # it may read the model: not change its mode
        try:
            os.fchmod(fd, 0)
        finally:
            os.close(fd)
    attempt("fchmod the model through a read fd", fchmod_model)
    attempt("chmod in its own scratch", lambda: os.chmod(os.path.join(rw, "ok"), 0o600))
    attempt("AF_INET socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    attempt("AF_INET6 socket", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
    attempt("AF_NETLINK socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
    attempt("TCP connect", lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
    attempt("early socket connect", lambda: early.connect(("127.0.0.1", port)))
    attempt("early socket bind", lambda: early.bind(("127.0.0.1", 0)))
    attempt("socketpair", lambda: [s.close() for s in socket.socketpair()] and None)
    attempt("unix socket", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
    attempt("subprocess /bin/true", lambda: subprocess.run(["/bin/true"]).returncode)
    attempt("execv", lambda: os.execv("/bin/true", ["true"]))
    attempt("unshare", lambda: sandbox._syscall("unshare", 0x10000000))  # CLONE_NEWUSER
    attempt("signal the parent", lambda: os.kill(os.getppid(), 0))
    m = torch.jit.load(model)
    attempt("forward", lambda: list(m(torch.ones(4, 8)).shape))
    attempt("threaded forward",
            lambda: float(torch.nn.functional.linear(torch.ones(512, 512), torch.ones(512, 512)).sum()))
    attempt("torch.from_file /etc/hostname",
            lambda: repr(torch.from_file("/etc/hostname", size=1, dtype=torch.uint8)))
    attempt("lazy stdlib import",
            lambda: __import__("sqlite3").connect(":memory:").execute("select 1").fetchone()[0])
    attempt("lazy pure import", lambda: __import__("fractions").Fraction(1, 3).denominator)
    def fork_child():
        pid = os.fork()
        if pid == 0:
            try:
                open("/etc/hostname")
                os._exit(0)
            except PermissionError:
                os._exit(13)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    attempt("fork", fork_child)
    done()
    """
    try:
        res = run_child(code, str(rw), str(outside), str(model), str(port))
        res["parent accepted a connection"] = accepted(listener)
    finally:
        listener.close()
    res["leaked file"] = (outside / "leak").exists()
    res["rw file"] = (rw / "ok").exists()
    return res


@needs_kernel
@pytest.mark.timeout(90)
def test_sandbox_installs_both_layers(sandboxed):
    assert sandboxed["status"] == {"seccomp_mode": 2, "no_new_privs": True}
    assert "landlock ABI" in sandboxed["report"] and "seccomp" in sandboxed["report"]


@needs_kernel
@pytest.mark.timeout(90)
def test_files_outside_the_allowed_paths_cannot_be_read_or_written(sandboxed):
    for name in ("read /etc/hostname", "read /etc/passwd", "write outside"):
        assert denied(sandboxed[name], 13), (name, sandboxed[name])
    assert not sandboxed["leaked file"]
    assert sandboxed["write rw"]["ok"] and sandboxed["rw file"]
    assert sandboxed["stat /etc/hostname"]["ok"]  # Landlock restricts opening, not looking


@needs_kernel
@pytest.mark.timeout(90)
def test_no_file_metadata_changes_anywhere(sandboxed):
    """Mode, owner, times and extended attributes: seccomp refuses them (Landlock does not cover
    them), so a model cannot open up the agent's key or lock its run directory or model cache."""
    for name in ("chmod a file outside", "chmod a directory outside", "chown a file outside",
                 "utime a file outside", "setxattr a file outside",
                 "fchmod the model through a read fd", "chmod in its own scratch"):
        assert denied(sandboxed[name], 1), (name, sandboxed[name])


@needs_kernel
@pytest.mark.timeout(90)
def test_no_network_sockets_no_tcp(sandboxed):
    for name in ("AF_INET socket", "AF_INET6 socket", "AF_NETLINK socket", "TCP connect"):
        assert denied(sandboxed[name], 1), (name, sandboxed[name])  # seccomp: EPERM
    # A TCP socket from before the sandbox: Landlock (ABI >= 4) still refuses connect and bind.
    if sandbox.probe()["landlock_abi"] >= 4:
        assert denied(sandboxed["early socket connect"], 13)
        assert denied(sandboxed["early socket bind"], 13)
    assert not sandboxed["parent accepted a connection"]
    assert sandboxed["socketpair"]["ok"] and sandboxed["unix socket"]["ok"]


@needs_kernel
@pytest.mark.timeout(90)
def test_no_programs_no_namespaces_no_signals_out(sandboxed):
    assert denied(sandboxed["subprocess /bin/true"], 1)
    assert denied(sandboxed["execv"], 1)
    assert denied(sandboxed["unshare"], 1)
    if sandbox.probe()["landlock_abi"] >= 6:
        assert denied(sandboxed["signal the parent"], 1)


@needs_kernel
@pytest.mark.timeout(90)
def test_torch_python_and_fork_keep_working(sandboxed):
    assert sandboxed["forward"] == {"ok": True, "value": "[4, 16]"}
    assert sandboxed["threaded forward"]["ok"]
    assert not sandboxed["torch.from_file /etc/hostname"]["ok"]
    assert "Permission denied" in sandboxed["torch.from_file /etc/hostname"]["message"]
    assert sandboxed["lazy stdlib import"] == {"ok": True, "value": 1}  # a C extension: dlopen
    assert sandboxed["lazy pure import"] == {"ok": True, "value": 3}
    assert sandboxed["fork"] == {"ok": True, "value": 13}  # the child forked and inherited it


@needs_kernel
@pytest.mark.timeout(60)
def test_a_sandboxed_worker_still_reaches_its_agent(tmp_path):
    """A worker's stream to its agent (a pathname AF_UNIX socket, agent/links.py) connects from
    inside the sandbox, in a directory the sandbox does not allow (connecting to a pathname unix
    socket is not a Landlock-handled access on ABI <= 7)."""
    import socket as pysocket

    from mlfleet.common import stream
    path = str(tmp_path / "workers.sock")
    listener = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    code = """
    import socket
    from mlfleet.common import stream
    attempt("apply", lambda: sandbox.apply(read_paths=sandbox.default_read_paths()).summary())
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    stream.send_blocking(s, [b"ready"])
    r = stream.Reader(s)
    msgs = []
    while not msgs:
        msgs = r.read()
    out["reply"] = bytes(msgs[0][0]).decode()
    attempt("read /etc/hostname", lambda: open("/etc/hostname").read())
    s.close()
    done()
    """
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code), path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=REPO)
    try:
        conn, _ = listener.accept()
        r = stream.Reader(conn)
        msgs = []
        while not msgs:
            msgs = r.read()
        assert bytes(msgs[0][0]) == b"ready"
        stream.send_blocking(conn, [b"welcome"])
        stdout, stderr = proc.communicate(timeout=30)
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
    res = json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert res["apply"]["ok"], (res, stderr)
    assert res["reply"] == "welcome"
    assert denied(res["read /etc/hostname"], 13)


@needs_kernel
@pytest.mark.timeout(60)
def test_refuses_a_process_with_threads_and_installs_nothing():
    res = run_child("""
    import threading
    ev = threading.Event()
    t = threading.Thread(target=ev.wait)
    t.start()
    attempt("apply", lambda: sandbox.apply(read_paths=sandbox.default_read_paths()))
    ev.set()
    t.join()
    out["status"] = sandbox.probe()
    done()
    """)
    assert res["apply"]["error"] == "SandboxError" and "threads" in res["apply"]["message"]
    assert res["status"]["seccomp_mode"] == 0 and res["status"]["no_new_privs"] is False


@pytest.mark.timeout(60)
def test_a_kernel_without_landlock_is_refused_or_reported():
    res = run_child("""
    sandbox.landlock_abi = lambda: None  # as on a kernel without Landlock
    attempt("required", lambda: sandbox.apply(read_paths=["/usr"]))
    out["after refusal"] = sandbox.probe()["seccomp_mode"]
    report = sandbox.apply(read_paths=["/usr"], require_all=False)
    out["missing"] = report.missing
    out["summary"] = report.summary()
    attempt("read /etc/hostname", lambda: open("/etc/hostname").read())
    attempt("AF_INET socket", lambda: socket.socket())
    done()
    """)
    assert res["required"]["error"] == "SandboxUnavailable"
    assert res["after refusal"] == 0  # nothing installed before refusing
    assert res["missing"] == ["Landlock"] and "MISSING: Landlock" in res["summary"]
    assert res["read /etc/hostname"]["ok"]  # only seccomp: files stay open to it
    if sandbox.probe()["seccomp_filter"]:
        assert denied(res["AF_INET socket"], 1)


# Hostile models: they try to get out during inference.

@needs_kernel
@pytest.mark.timeout(90)
def test_torchscript_models_cannot_read_or_write_files(tmp_path):
    reader = hostile.torchscript_reader(tmp_path / "reader.pt")
    writer = hostile.torchscript_writer(tmp_path / "writer.pt")
    outside = tmp_path / "outside"
    outside.mkdir()
    code = """
    import torch
    reader, writer, target, sandboxed = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    if sandboxed:  # as the host: sandbox first, then load the models
        sandbox.apply(read_paths=sandbox.default_read_paths() + [reader, writer])
    r, w = torch.jit.load(reader), torch.jit.load(writer)
    attempt("read", lambda: bytes(r("/etc/hostname", 1).tolist()).decode())
    attempt("write", lambda: int(w(target, 4).sum()))
    attempt("alive", lambda: int(torch.ones(3).sum()))
    done()
    """
    free = run_child(code, reader, writer, str(outside / "free"), "0")
    assert free["read"]["ok"] and free["write"] == {"ok": True, "value": 4 * 65}
    assert (outside / "free").read_bytes() == b"AAAA"
    res = run_child(code, reader, writer, str(outside / "leak"), "1")
    assert not res["read"]["ok"] and "Permission denied" in res["read"]["message"]
    assert not res["write"]["ok"] and "Permission denied" in res["write"]["message"]
    assert res["alive"] == {"ok": True, "value": 3}
    assert not (outside / "leak").exists()


@pytest.fixture(scope="session")
def native_hostile(tmp_path_factory):
    """The hostile AOTInductor package (a C++ compile: about 20-40 s), built once per session."""
    return hostile_native(tmp_path_factory)  # shared with tests/test_sandboxed_models.py


@needs_kernel
@pytest.mark.timeout(240)
def test_native_code_model_cannot_read_write_connect_or_exec(native_hostile, tmp_path):
    pkg, target = native_hostile
    scratch = tmp_path / "scratch"  # the package loader unpacks the .so into $TMPDIR
    scratch.mkdir()
    code = """
    import torch
    from torch._inductor.package.package import AOTICompiledModel
    from tests import hostile
    pkg, scratch, port, sandboxed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    os.environ["TMPDIR"] = scratch
    if sandboxed:
        sandbox.apply(read_paths=sandbox.default_read_paths() + [pkg], read_write_paths=[scratch])
    # torch._inductor.aoti_load_package would first run g++ to check the CPU ISA: load directly.
    m = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(pkg, "model", False, 1, -1))
    for name, mode in (("read", hostile.READ), ("write", hostile.WRITE),
                       ("connect", hostile.CONNECT), ("exec", hostile.EXEC)):
        attempt(name, lambda: hostile.run_native(m, mode, port))
    attempt("alive", lambda: int(torch.ones(3).sum()))
    done()
    """

    def run(sandboxed: str):
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        try:
            res = run_child(code, str(pkg), str(scratch), str(listener.getsockname()[1]), sandboxed,
                            timeout=120)
            res["accepted"] = accepted(listener)
        finally:
            listener.close()
        res["written"] = (target / "written").exists()
        res["marker"] = (target / "marker").exists()
        return res

    free = run("0")
    assert [free[k]["value"] for k in ("read", "write", "connect", "exec")] == [0, 0, 0, 0], free
    assert free["accepted"] and free["written"] and free["marker"]
    (target / "written").unlink()
    (target / "marker").unlink()

    res = run("1")
    assert res["read"]["value"] == 13 and res["write"]["value"] == 13  # Landlock: EACCES
    assert res["connect"]["value"] == 1 and res["exec"]["value"] == 1  # seccomp: EPERM
    assert res["alive"] == {"ok": True, "value": 3}
    assert not res["accepted"] and not res["written"] and not res["marker"]
