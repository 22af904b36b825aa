"""What a worker does with documents, per task. Both take a batch of documents (from one or
several requests) and return one result or one error per document, in order.

* ``pass_through``: ``{"input": array}`` or ``{"inputs": [array, ...]}``; each document runs on
  its own (arrays reach the model unchanged, no batch dimension added).
* ``text_embedding``: ``{"text_field": str}``; the batch is tokenized together (padded to the
  longest, truncated to ``max_sequence_length``), run as one forward pass, pooled with the
  attention mask (mean, cls or max, from the model's sentence-transformers config) and
  L2-normalized when the config says so. A model that already returns ``[batch, hidden]`` is
  taken as pooled.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from mlfleet.common.errors import ApiError, BadRequest
from mlfleet.common.protocol import decode_array, encode_array, is_array


def _tensor(obj: Any, where: str) -> torch.Tensor:
    if not is_array(obj):
        raise BadRequest(f"[{where}] must be an array {{dtype, shape, data}}")
    arr = decode_array(obj, where)
    if not arr.flags.writeable:
        arr = arr.copy()
    try:
        return torch.from_numpy(arr)
    except (TypeError, RuntimeError, ValueError) as e:
        raise BadRequest(f"[{where}] has dtype [{arr.dtype}], which a model cannot take: "
                         f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def _output(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return encode_array(out.detach().cpu().numpy())
    if isinstance(out, (list, tuple)):
        return [_output(o) for o in out]
    if isinstance(out, dict):
        return {str(k): _output(v) for k, v in out.items()}
    if isinstance(out, (int, float, bool, str)) or out is None:
        return out
    return encode_array(np.asarray(out))


def _model_error(e: Exception) -> BadRequest:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return BadRequest(f"the model rejected the input: {(lines[-1] if lines else type(e).__name__)[:500]}")


Outcome = Any  # a result dict, or an ApiError


class PassThrough:
    def __init__(self, model: torch.jit.ScriptModule, config: Optional[dict] = None) -> None:
        self.model = model

    def one(self, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise BadRequest("each doc must be a map with [input] or [inputs]")
        if "input" in doc:
            args = [_tensor(doc["input"], "input")]
        elif "inputs" in doc and isinstance(doc["inputs"], list):
            args = [_tensor(x, f"inputs.{i}") for i, x in enumerate(doc["inputs"])]
        else:
            raise BadRequest("each doc must carry [input] (an array) or [inputs] (a list of arrays)")
        try:
            out = self.model(*args)
        except Exception as e:  # the model's own complaint about shape or dtype
            raise _model_error(e) from None
        return {"predicted_value": _output(out)}

    def run(self, docs: list[Any]) -> list[Outcome]:
        out: list[Outcome] = []
        for doc in docs:
            try:
                out.append(self.one(doc))
            except ApiError as e:
                out.append(e)
            except Exception as e:  # anything else fails this document only
                out.append(ApiError(f"inference failed: {type(e).__name__}: {e}"[:1000]))
        return out


class TextEmbedding:
    def __init__(self, model: torch.jit.ScriptModule, config: Optional[dict], tokenizer_path: str) -> None:
        from tokenizers import Tokenizer
        cfg = config or {}
        self.model = model
        self.pooling = cfg.get("pooling", "mean")
        self.normalize = bool(cfg.get("normalize", False))
        self.max_len = int(cfg.get("max_sequence_length") or 512)
        self.tok = Tokenizer.from_file(tokenizer_path)
        self.tok.enable_truncation(self.max_len)
        pad_id = self.tok.token_to_id("[PAD]")
        self.tok.enable_padding(pad_id=pad_id if pad_id is not None else 0)

    def _pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if h.dim() == 2:
            return h
        m = mask.unsqueeze(-1).to(h.dtype)
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "max":
            return h.masked_fill(m == 0, float("-inf")).max(dim=1).values
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def run(self, docs: list[Any]) -> list[Outcome]:
        out: list[Outcome] = [None] * len(docs)
        texts, where = [], []
        for i, doc in enumerate(docs):
            if isinstance(doc, dict) and isinstance(doc.get("text_field"), str):
                texts.append(doc["text_field"])
                where.append(i)
            else:
                out[i] = BadRequest("each doc must be a map with [text_field] (a string)")
        if texts:
            enc = self.tok.encode_batch(texts)
            ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
            mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
            try:
                h = self.model(ids, mask)
                if isinstance(h, (tuple, list)):
                    h = h[0]
                emb = self._pool(h, mask)
                if self.normalize:
                    emb = torch.nn.functional.normalize(emb, p=2.0, dim=1)
            except Exception as e:  # the caller runs each request alone to isolate the bad one
                raise _model_error(e) from None
            for row, i in enumerate(where):
                out[i] = {"predicted_value": emb[row].tolist()}
        return out


def make_task(task: str, model: torch.jit.ScriptModule, config: Optional[dict],
              tokenizer_path: Optional[str]):
    if task == "text_embedding":
        if not tokenizer_path:
            raise ValueError("task [text_embedding] needs a tokenizer")
        return TextEmbedding(model, config, tokenizer_path)
    return PassThrough(model, config)
