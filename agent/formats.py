"""Loading a model by its format, and warming a worker up, in the model host (``agent/host.py``).

The format comes from the file's contents (``common.formats``), never its name:

* ``torchscript``: ``torch.jit.load`` (a ScriptModule; warm-up input: the ``example_input``
  given at upload, if any);
* ``export``: ``torch.export.load(...).module()`` (a GraphModule that checks its inputs against
  the exported shapes; warm-up inputs: the example inputs stored in the program, and the
  upload's ``example_input``);
* ``aoti``: an AOTInductor package, loaded with ``torch._C._aoti.AOTIModelPackageLoader``
  directly: ``torch._inductor.aoti_load_package`` first runs g++ to check the CPU, and the
  sandbox runs no program. The loader unpacks the package's shared library into ``$TMPDIR``,
  so the host gives it a fresh scratch directory (the only place it may write; exported
  programs get one too, for torch._dynamo's cache directory) and empties it once loaded.
  The package's CPU features are checked against this CPU's first (a library built for
  AVX-512 would die of SIGILL on a CPU without it), and input shapes and dtypes are checked
  on every call (``AOTI_RUNTIME_CHECK_INPUTS``): a compiled kernel given the wrong shape
  would read out of bounds. Warm-up input: the upload's ``example_input``.

Every loaded model is callable like a module (``model(*tensors)``), so the tasks need not know
its format. Weights are loaded once, in the host, before it forks its workers: every format
keeps one copy per node, shared copy-on-write.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from mlfleet.common import formats as cf

WARMUP_PASSES = 3  # TorchScript's profiling executor settles after its second call
WARMUP_TIMEOUT_S = 120  # a warm-up that runs longer ends the worker (SIGALRM): a start never hangs
# An exported program's stored example inputs are used for warm-up only up to this size, all
# together, as their shapes say (a tensor expanded with stride 0 claims its shape in a few bytes of
# file, and warm-up would materialise it in the host and in every worker).
MAX_STORED_EXAMPLE_BYTES = 16 << 20
SCRATCH_PREFIX = "mlfleet-host-"
# AOTI_CPU_ISA tokens -> the /proc/cpuinfo flag each needs
_ISA_FLAGS = {"AVX2": "avx2", "AVX512": "avx512f", "AVX512_VNNI": "avx512_vnni",
              "AVX512_BF16": "avx512_bf16", "AVX512_FP16": "avx512_fp16", "AMX": "amx_tile",
              "AMX_FP16": "amx_fp16", "NEON": None, "SVE256": None}


class ModelLoadError(RuntimeError):
    """The model file cannot be served here; the message says why."""


class WarmupFailed(RuntimeError):
    """A warm-up pass failed; the worker must not report ready."""


@dataclass
class Loaded:
    model: Any  # callable like a module: model(*tensors)
    format: str
    examples: list[tuple] = field(default_factory=list)  # positional tensors, one tuple a call


def scratch_dir_needed(model_path: str) -> bool:
    """True if loading this file needs a writable directory: an AOTInductor package unpacks its
    library, and loading an exported program imports torch._dynamo, which wants a cache
    directory (``tempfile.gettempdir()`` fails when no temporary directory is writable)."""
    try:
        return cf.detect(model_path) in (cf.EXPORT, cf.AOTI)
    except cf.UnknownFormat:
        return False


def make_scratch_dir() -> str:
    """A fresh scratch directory for loading (see ``scratch_dir_needed``), named after this process.
    Directories left by hosts that are gone are removed first (the host cannot remove its own
    once sandboxed: that needs a right on the parent directory)."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        names = []
    for name in names:
        if not name.startswith(SCRATCH_PREFIX):
            continue
        pid = name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=base)


def remove_scratch_dirs(host_pid: int) -> None:
    """Remove the scratch directories of a model host that has ended (the agent calls it: a
    sandboxed host cannot remove its own, and its pid names them)."""
    base = tempfile.gettempdir()
    prefix = f"{SCRATCH_PREFIX}{host_pid}-"
    try:
        names = [n for n in os.listdir(base) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(model_path: str, config: Optional[dict], scratch_dir: Optional[str] = None) -> Loaded:
    """Loads the model at ``model_path`` by the format its contents show (a config that says
    otherwise is an error: the file was replaced, or the config is wrong). ``scratch_dir``:
    where loading may write (needed for exported programs and AOTInductor packages); it is
    emptied once the model is loaded."""
    try:
        fmt, aoti_name = cf.inspect(model_path)
    except cf.UnknownFormat as e:
        raise ModelLoadError(str(e)) from None
    stated = (config or {}).get("format")
    if stated is not None and stated != fmt:
        raise ModelLoadError(f"the model's config says [{stated}] but the file is [{fmt}]")
    if fmt != cf.TORCHSCRIPT:
        if scratch_dir is None:
            raise ModelLoadError(f"a model in format [{fmt}] needs a scratch directory to load")
        os.environ["TMPDIR"] = scratch_dir  # where the AOTI loader unpacks the library
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = scratch_dir  # torch._dynamo's cache, at import
        tempfile.tempdir = None  # gettempdir() looks again
    import torch

    if fmt == cf.TORCHSCRIPT:
        with warnings.catch_warnings():  # serving TorchScript has no non-deprecated way to load it
            warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated",
                                    category=DeprecationWarning)
            model = torch.jit.load(model_path, map_location="cpu")
        model.eval()
        examples: list[tuple] = []
    elif fmt == cf.EXPORT:
        ep = torch.export.load(model_path)
        model = ep.module()
        examples = _stored_examples(ep)
    else:
        model = _load_aoti(model_path, aoti_name or "model", scratch_dir)
        examples = []
    try:
        ex = cf.example_input(config)
    except cf.UnknownFormat as e:
        raise ModelLoadError(str(e)) from None
    if ex is not None:
        examples.append((torch.from_numpy(ex),))
    return Loaded(model, fmt, examples)


def _stored_examples(ep: Any) -> list[tuple]:
    import torch
    got = getattr(ep, "example_inputs", None)
    if not got:
        return []
    args, kwargs = got
    if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
        return []  # only what a pass_through document can carry: positional tensors
    if sum(a.numel() * a.element_size() for a in args) > MAX_STORED_EXAMPLE_BYTES:
        return []  # the allocation starts cold rather than the node running out of memory
    return [tuple(args)]


def _load_aoti(model_path: str, name: str, scratch_dir: str) -> Any:
    import torch
    os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"  # shapes and dtypes checked on every call
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(model_path, name, False, 1, -1)
    finally:
        _empty(scratch_dir)  # the library is mapped: its files are no longer needed
    meta = loader.get_metadata()
    device = meta.get("AOTI_DEVICE_KEY", "cpu")
    if device != "cpu":
        raise ModelLoadError(f"the AOTInductor package was compiled for [{device}]; models run on CPU here")
    missing = missing_cpu_features(meta.get("AOTI_CPU_ISA", ""))
    if missing:
        raise ModelLoadError(f"the AOTInductor package was compiled for CPU features this CPU lacks: "
                             f"[{', '.join(missing)}]; compile it on (or for) this kind of machine")
    return AotiModule(loader)


def _empty(d: str) -> None:
    for entry in os.listdir(d):
        p = os.path.join(d, entry)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


def missing_cpu_features(isa: str, cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The AOTI_CPU_ISA tokens whose CPU flag this machine lacks (unknown tokens are ignored)."""
    try:
        with open(cpuinfo) as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), None)
    except OSError:
        return []
    if flags is None:
        return []
    have = set(flags)
    return [tok for tok in isa.split() if _ISA_FLAGS.get(tok) and _ISA_FLAGS[tok] not in have]


class AotiModule:
    """An AOTInductor model callable like a module (what ``AOTICompiledModel`` does, without
    importing torch._inductor)."""

    def __init__(self, loader: Any) -> None:
        import torch.utils._pytree as pytree
        self.loader = loader
        self._pytree = pytree
        in_spec, out_spec = loader.get_call_spec()
        self._out_spec = pytree.treespec_loads(out_spec)

    def __call__(self, *args: Any) -> Any:
        import torch
        flat = [x for x in self._pytree.tree_flatten((args, {}))[0] if isinstance(x, torch.Tensor)]
        return self._pytree.tree_unflatten(self.loader.boxed_run(flat), self._out_spec)

    def eval(self) -> AotiModule:
        return self


# ---- warm-up ------------------------------------------------------------------------------------

def warmup_docs(task: Any) -> Optional[list]:
    """The documents a task warms up with: its own ``warmup_docs()`` (text tasks), else one
    pass_through document per example input the model came with; None when there are none."""
    own = getattr(task, "warmup_docs", None)
    if callable(own):
        docs = own()
        if docs:
            return list(docs)
    examples = getattr(task, "example_inputs", None)
    if not examples:
        return None
    from mlfleet.common.protocol import encode_array
    docs = []
    for ex in examples:
        arrays = [encode_array(t.detach().cpu().numpy()) for t in ex]
        docs.append({"input": arrays[0]} if len(arrays) == 1 else {"inputs": arrays})
    return docs


def warm_up(task: Any, passes: int = WARMUP_PASSES, timeout_s: int = WARMUP_TIMEOUT_S) -> int:
    """Runs the task's warm-up documents ``passes`` times, each alone, as requests run (the caller holds
    ``torch.inference_mode()`` and has set the thread count). Returns the documents run per
    pass (0: nothing to warm up with). A document that fails raises WarmupFailed naming why; a
    warm-up past ``timeout_s`` ends the process (SIGALRM, default action).

    Then what exists is frozen for the cyclic garbage collector (``gc.freeze``): a worker is a fork
    of its model host, and each full collection would walk the whole inherited heap (torch, the
    model, the tokenizer), writing to its copy-on-write pages, to free nothing. Measured in
    ``bench.minilm`` (batching on): workers 10.3 -> 9.6 CPU ms a document, 5% of their time was
    the collector."""
    docs = warmup_docs(task)
    if not docs:
        gc.freeze()
        return 0
    from mlfleet.common.errors import ApiError
    old = signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(timeout_s)
    t0 = time.perf_counter()
    try:
        for _ in range(passes):
            try:  # each alone: one forward pass a length, however the task would batch them
                outcomes = [o for d in docs for o in task.run([d])]
            except Exception as e:  # noqa: BLE001 - reported as the warm-up's failure
                raise WarmupFailed(f"warm-up failed: {type(e).__name__}: {e}"[:1000]) from None
            bad = next((o for o in outcomes if isinstance(o, ApiError)), None)
            if bad is not None:
                raise WarmupFailed(f"warm-up failed: {bad.reason}"[:1000])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    print(f"pid {os.getpid()}: warm-up: {len(docs)} documents x {passes} passes in "
          f"{(time.perf_counter() - t0) * 1000:.0f} ms", file=sys.stderr, flush=True)
    gc.freeze()
    return len(docs)
