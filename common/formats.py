"""Which kind of PyTorch model a file holds, decided from its contents (never its name).

All three formats are zip archives written by PyTorch, each under one top-level folder:

* ``torchscript``: ``torch.jit.save``: ``<top>/data.pkl``, ``<top>/constants.pkl`` and
  compiled code under ``<top>/code/``;
* ``export``: ``torch.export.save`` (a ``.pt2`` archive): ``<top>/archive_format`` says
  ``pt2`` and the program is ``<top>/models/<name>.json`` (older archives:
  ``serialized_exported_program.json``), weights under ``<top>/data/weights/``;
* ``aoti``: ``torch._inductor.aoti_compile_and_package`` (also a ``pt2`` archive): a compiled
  shared library under ``<top>/data/aotinductor/<model name>/``.

``detect(path)`` reads only the zip's central directory and at most a few bytes of
``archive_format``; anything else (not a zip, a ``torch.save`` state dict, a truncated file, a
zip of something else) raises :class:`UnknownFormat` with a message that says why. Nothing
here imports torch.

``stored_config`` and ``example_input`` carry a model's optional warm-up input (for
``pass_through``) from the upload's array encoding to the JSON the coordinator stores and back.
"""

from __future__ import annotations

import base64
import binascii
import os
import zipfile
from typing import Optional, Union

import numpy as np

TORCHSCRIPT, EXPORT, AOTI = "torchscript", "export", "aoti"
FORMATS = (TORCHSCRIPT, EXPORT, AOTI)
MAX_ENTRIES = 100_000  # a model archive has tens of entries; a zip bomb of names is refused


class UnknownFormat(ValueError):
    """The file is none of the model formats mlfleet can serve."""


def _top(name: str) -> str:
    return name.split("/", 1)[0]


def detect_names(names: list[str], archive_format: Optional[bytes]) -> tuple[str, Optional[str]]:
    """The format and, for AOTInductor, the model's name in the package, from the archive's
    entry names and the contents of its ``archive_format`` entry (None if it has none). Pure."""
    if not names:
        raise UnknownFormat("the model file is an empty zip archive")
    tops = {_top(n) for n in names}
    if len(tops) != 1:
        raise UnknownFormat("the model file is a zip archive but not one written by PyTorch "
                            f"(entries under {len(tops)} top-level folders, not one)")
    top = tops.pop()
    inner = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    if archive_format is not None and archive_format.strip() == b"pt2":
        aoti = sorted({p.split("/")[2] for p in inner
                       if p.startswith("data/aotinductor/") and p.count("/") >= 3
                       and p.endswith(".so")})
        if aoti:
            return AOTI, aoti[0]
        if any(p.startswith("models/") and p.endswith(".json") for p in inner):
            return EXPORT, None
        raise UnknownFormat("the model file is a pt2 archive with neither an exported program "
                            "(models/*.json) nor an AOTInductor library (data/aotinductor/*/*.so)")
    if "serialized_exported_program.json" in inner:
        return EXPORT, None
    if "data.pkl" in inner and "constants.pkl" in inner and any(p.startswith("code/") for p in inner):
        return TORCHSCRIPT, None
    if "data.pkl" in inner:
        raise UnknownFormat("the model file is a torch.save archive (weights or a pickled object), "
                            "not a model: save it with torch.jit.save, torch.export.save or "
                            "torch._inductor.aoti_compile_and_package")
    raise UnknownFormat("the model file is a zip archive but not a TorchScript module, a "
                        "torch.export program or an AOTInductor package")


def inspect(path: Union[str, os.PathLike]) -> tuple[str, Optional[str]]:
    """(format, AOTInductor model name or None) of the model file at ``path``."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if len(infos) > MAX_ENTRIES:
                raise UnknownFormat(f"the model file has {len(infos)} entries (at most {MAX_ENTRIES})")
            names = [i.filename for i in infos]
            fmt = next((i for i in infos if i.filename.count("/") == 1
                        and i.filename.endswith("/archive_format")), None)
            archive_format = None
            if fmt is not None and fmt.file_size <= 64:
                with z.open(fmt) as f:
                    archive_format = f.read(64)
    except zipfile.BadZipFile as e:
        raise UnknownFormat(f"the model file is not a PyTorch model (not a zip archive: {e})") from None
    except (OSError, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
        if isinstance(e, UnknownFormat):
            raise
        raise UnknownFormat(f"the model file cannot be read as a zip archive: {e}") from None
    return detect_names(names, archive_format)


def detect(path: Union[str, os.PathLike]) -> str:
    """The format of the model file at ``path``: one of FORMATS."""
    return inspect(path)[0]


EXAMPLE_CHUNK = 4096  # characters of base64 per stored string (model configs bound strings)


def stored_config(model_config: Optional[dict], detected: str) -> dict:
    """The model's config as stored (JSON), from the one given at upload (already checked by
    ``messages.PutModel``): ``format`` set to what the file is (a config naming a different
    format is refused: the file decides, and a mismatch is a mistake worth saying), and
    ``example_input`` turned from the wire's array encoding ``{dtype, shape, data: bytes}`` into
    ``{dtype, shape, data_base64: [str, ...]}``. Raises UnknownFormat (a 400) on a problem."""
    cfg = dict(model_config or {})
    given = cfg.get("format")
    if given is not None and given != detected:
        raise UnknownFormat(f"[model_config.format] is [{given}] but the model file is [{detected}]")
    cfg["format"] = detected
    ex = cfg.get("example_input")
    if ex is not None:
        arr = _wire_array(ex)
        text = base64.b64encode(arr.tobytes()).decode("ascii")
        cfg["example_input"] = {"dtype": arr.dtype.str, "shape": list(arr.shape),
                                "data_base64": [text[i:i + EXAMPLE_CHUNK]
                                                for i in range(0, len(text), EXAMPLE_CHUNK)]}
    for key, value in cfg.items():
        if key != "example_input" and _has_bytes(value):
            raise UnknownFormat(f"[model_config.{key}] must not hold bytes (only [example_input] may)")
    return cfg


def _wire_array(ex: dict) -> np.ndarray:
    try:
        dtype = np.dtype(ex["dtype"])
        if dtype.hasobject or dtype.kind not in "biuf":
            raise ValueError(f"dtype [{ex['dtype']}] is not a number type")
        return np.frombuffer(ex["data"], dtype=dtype).reshape(tuple(ex["shape"]))
    except (TypeError, ValueError, KeyError) as e:
        raise UnknownFormat(f"[model_config.example_input] is not a valid array: {e}") from None


def _has_bytes(value: object) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (bytes, bytearray, memoryview)):
            return True
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return False


def example_input(cfg: Optional[dict]) -> Optional[np.ndarray]:
    """The stored example input of a model's config (see ``stored_config``), or None."""
    ex = (cfg or {}).get("example_input")
    if not isinstance(ex, dict):
        return None
    try:
        data = base64.b64decode("".join(ex["data_base64"]), validate=True)
        return np.frombuffer(data, dtype=np.dtype(ex["dtype"])).reshape(tuple(ex["shape"])).copy()
    except (TypeError, ValueError, KeyError, binascii.Error) as e:
        raise UnknownFormat(f"[model_config.example_input] is not a valid stored array: {e}") from None
