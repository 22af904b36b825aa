"""The model host: one per deployment per node. It loads the model once (TorchScript, a
torch.export program or an AOTInductor package: agent/formats.py), never runs it (a forked
child tries the warm-up once before "loaded"), and forks allocation workers that share its
weights copy-on-write; each runs its warm-up passes before it reports ready. It talks to its
agent over stdin/stdout in the protocol's envelope, length-framed (common/protocol.py
``encode_pipe``, ``PipeReader``; the bodies are common/messages.py types), and has no threads of
its own (fork-safe):

    agent -> host  spawn (Spawn) | kill (KillWorker) | exit
    host -> agent  loaded (HostLoaded) | failed (HostFailed) | spawned (WorkerSpawned)
                   | exited (WorkerExited)

stdin closing (the agent died) ends the host and its workers; so does the agent's death signal.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time

from mlfleet.common import messages as m
from mlfleet.common.errors import BadRequest
from mlfleet.common.proc import set_parent_death_signal
from mlfleet.common.protocol import PipeReader, encode_pipe


def probe_warmup(task, threads: int) -> str | None:
    """Runs the warm-up once in a forked child (the host itself never runs the model), so that a
    model whose warm-up fails fails its load with the reason, not a string of worker restarts.
    Returns the reason, or None. Bounded: the warm-up ends its process past its time limit."""
    from mlfleet.agent import formats
    if not formats.warmup_docs(task):
        return None  # nothing to warm up with: nothing to try
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            set_parent_death_signal(signal.SIGKILL)
            import torch
            torch.set_num_threads(threads)
            with torch.inference_mode():
                formats.warm_up(task, passes=1)
            code = 0
        except BaseException as e:  # noqa: BLE001 - the reason goes to the host
            msg = (str(e) if isinstance(e, formats.WarmupFailed)
                   else f"warm-up failed: {type(e).__name__}: {e}")
            os.write(w, msg.encode("utf-8", "replace")[:1000])
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None
    reason = b"".join(chunks).decode("utf-8", "replace")
    if not reason:
        from mlfleet.common.proc import describe_exit
        reason = f"warm-up failed: the process {describe_exit(code)}" + (
            f" (past its {formats.WARMUP_TIMEOUT_S}s limit)" if code == -signal.SIGALRM else "")
    return reason


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.host")
    ap.add_argument("--model", required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--priority", default="normal")
    ap.add_argument("--grace", type=float, default=5.0)
    ap.add_argument("--task", default="pass_through")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--model-config", default="{}")
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--require-sandbox", action="store_true")
    args = ap.parse_args(argv)

    set_parent_death_signal(signal.SIGKILL)
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 1  # the agent died before we could ask to die with it
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no tokenizer threads: we fork
    proto = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints must not corrupt the protocol

    def emit(event: str, **body) -> None:
        proto.write(encode_pipe(event, body))

    # The sandbox goes on before torch is imported and before the model file is read: whatever
    # loading or running the model does, it can read only the Python installation, the system's
    # libraries, the model and its tokenizer; it can write nothing, open no socket but a unix
    # one, run no program. Workers forked later inherit it.
    from mlfleet.agent import formats, sandbox
    # An AOTInductor package unpacks its library before loading it, torch._dynamo (loading an
    # exported program) wants a cache directory: a fresh one, the only place the host may write.
    scratch_dir = formats.make_scratch_dir() if formats.scratch_dir_needed(args.model) else None
    try:
        report = sandbox.apply(
            read_paths=[*sandbox.default_read_paths(), args.model,
                        *([args.tokenizer] if args.tokenizer else [])],
            read_write_paths=[scratch_dir] if scratch_dir else [],
            require_all=args.require_sandbox)
        if report.missing:
            print(f"model host: WARNING: the sandbox is incomplete on this kernel: {report.summary()}",
                  file=sys.stderr)
    except sandbox.SandboxError as e:
        emit(event="failed", reason=f"could not sandbox the model host: {e}"[:1000])
        return 2
    try:
        config = json.loads(args.model_config)
        loaded = formats.load(args.model, config, scratch_dir)
        from mlfleet.agent.tasks import make_task
        from mlfleet.agent.worker import worker_main  # imported before forking: shared by every worker
        task = make_task(args.task, loaded.model, config, args.tokenizer)
        try:
            task.example_inputs = loaded.examples  # pass_through's warm-up inputs (agent/formats.py)
        except AttributeError:  # a task class with __slots__ warms up with its own docs only
            pass
    except formats.ModelLoadError as e:
        emit(event="failed", reason=f"could not load model: {e}"[:1000])
        return 2
    except Exception as e:
        emit(event="failed", reason=f"could not load model: {type(e).__name__}: {e}"[:1000])
        return 2
    try:
        problem = probe_warmup(task, args.threads)
    except Exception as e:  # MemoryError building the warm-up documents, say: a failed load, said so
        problem = f"warm-up failed: {type(e).__name__}: {e}"
    if problem is not None:
        emit(event="failed", reason=problem[:1000])
        return 2
    emit(event="loaded", pid=os.getpid())

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the agent ends us with "exit" or stdin EOF
    workers: dict[int, str] = {}
    host_pid = os.getpid()
    stdin = sys.stdin.buffer
    pipe = PipeReader()

    def spawn(worker_id: str, identity: str) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                os.close(wake_r)
                os.close(wake_w)
                proto.close()
                os.close(0)
                code = worker_main(task, endpoint=args.endpoint, identity=identity.encode(),
                                   threads=args.threads, low_priority=args.priority == "low",
                                   parent_pid=host_pid)
            except BaseException as e:  # noqa: BLE001 - report and leave without unwinding the host
                print(f"worker {worker_id} failed: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                os._exit(code)
        workers[pid] = worker_id
        emit(event="spawned", worker_id=worker_id, pid=pid)

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            wid = workers.pop(pid, None)
            if wid is not None:
                emit(event="exited", worker_id=wid, pid=pid, code=os.waitstatus_to_exitcode(status))

    def stop_all() -> None:
        for pid in list(workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + args.grace
        while workers and time.monotonic() < deadline:
            reap()
            time.sleep(0.01)
        for pid in list(workers):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while workers:
            reap()
            time.sleep(0.01)

    try:
        while True:
            try:
                ready, _, _ = select.select([stdin, wake_r], [], [])
            except InterruptedError:
                continue
            if wake_r in ready:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                reap()
            if stdin in ready:
                chunk = os.read(stdin.fileno(), 65536)
                if not chunk:
                    return 0
                try:
                    cmds = pipe.feed(chunk)
                except BadRequest as e:  # the agent's stream is broken: nothing after it can be read
                    print(f"model host: {e.reason}; exiting", file=sys.stderr)
                    return 2
                for cmd in cmds:
                    try:
                        if cmd.op == "spawn":
                            sp = m.decode(m.Spawn, cmd.body, "spawn")
                            spawn(sp.worker_id, sp.identity)
                        elif cmd.op == "kill":
                            k = m.decode(m.KillWorker, cmd.body, "kill")
                            for pid, wid in list(workers.items()):
                                if wid == k.worker_id:
                                    try:
                                        os.kill(pid, signal.SIGKILL if k.force else signal.SIGTERM)
                                    except ProcessLookupError:
                                        pass
                        elif cmd.op == "exit":
                            return 0
                        else:
                            raise BadRequest(f"unknown command [{cmd.op[:64]}]")
                    except BadRequest as e:
                        print(f"model host: ignoring a malformed command: {e.reason}", file=sys.stderr)
            reap()
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
