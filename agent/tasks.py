"""What a worker does with documents, per task. Every task takes a batch of documents (from one or
several requests) and returns one result or one error per document, in order:
``task.run(docs, overrides=None)``. ``overrides``, when given, holds one infer-time
``inference_config`` (a map, or None) per document, with Elasticsearch's names (``results_field``,
``num_top_classes``...); a bad one fails its own document with a 400 naming the field.

* ``pass_through``: ``{"input": array}`` or ``{"inputs": [array, ...]}``; each document runs on
  its own (arrays reach the model unchanged, no batch dimension added).
* text tasks, ``{"text_field": str}``: the documents are tokenized (truncated to
  ``max_sequence_length``), ordered by token length and cut into sub-batches of similar length,
  each under the ``max_batch_tokens`` budget (rows x padded length) and padded only to its own
  longest (see :func:`plan_batches`); outcomes go back in the documents' order.

  * ``text_embedding``: the model gives ``[batch, seq, hidden]`` (or ``[batch, hidden]``, taken as
    pooled); pooled with the attention mask (mean, cls or max, from the sentence-transformers
    config) and L2-normalized when the config says so.
  * ``text_classification``: the model gives logits ``[batch, labels]``; softmax; the result is
    Elasticsearch's: ``predicted_value`` (the top class name), ``prediction_probability`` and,
    when ``num_top_classes`` is not 0 (-1: all), ``top_classes`` of ``{class_name,
    class_probability, class_score}``.
  * ``ner``: the model gives logits ``[batch, seq, labels]`` over IOB tags (``O``, ``B-X``,
    ``I-X``); softmax per token, the tokens of one word averaged, the word tagged with the best
    tag, words grouped into entities as Elasticsearch does (a ``B-`` tag or another class starts a
    new entity; an entity's probability is its words' mean). The result: ``predicted_value`` as
    annotated text (``[Elastic](ORG&Elastic) is ...``) and ``entities`` of ``{entity, class_name,
    class_probability, start_pos, end_pos}`` (character offsets into the text; ``entity`` is
    lower-cased when the tokenizer lower-cases, as in Elasticsearch). Without
    ``classification_labels`` the tags are Elasticsearch's default: ``O, B_MISC, I_MISC, B_PER,
    I_PER, B_ORG, I_ORG, B_LOC, I_LOC``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import numpy as np
import torch

from mlfleet.common.errors import ApiError, BadRequest
from mlfleet.common.hf import DEFAULT_IOB_TAGS, iob_labels
from mlfleet.common.protocol import INLINE_ARRAY_MAX, decode_array, encode_array, is_array

DEFAULT_RESULTS_FIELD = "predicted_value"
# Hugging Face text-embeddings-inference's default max_batch_tokens.
DEFAULT_MAX_BATCH_TOKENS = 16384
# What one more forward pass costs, in padded tokens: measured for MiniLM on one CPU thread (batch
# 1 at 32 tokens 17.9 ms, batch 8 at 32 tokens 83 ms: about 8.6 ms fixed, 0.29 ms a token).
# plan_batches splits a sorted batch where the padding saved is worth more than a pass.
BATCH_OVERHEAD_TOKENS = 32
# An unpadded model's attention still runs padded, per document: 2 x seq^2 x hidden multiply-adds a
# layer for each row, against 12 x hidden^2 a token in its linear layers; for MiniLM (hidden 384)
# a row of a pass padded to ``longest`` costs longest^2 / 2304 tokens.
ATTENTION_TOKENS = 2304


def _tensor(obj: Any, where: str) -> torch.Tensor:
    if not is_array(obj):
        raise BadRequest(f"[{where}] must be an array {{dtype, shape, data}}")
    arr = decode_array(obj, where)
    try:
        if arr.flags.writeable:
            return torch.from_numpy(arr)
        if arr.nbytes < INLINE_ARRAY_MAX:  # small, inside the request's tree (a bytes object): copied
            return torch.from_numpy(arr.copy())
        # a view of the request's own frame, received by this process alone: used in place, not
        # copied (torch warns that the buffer is read-only; a model that writes to its input
        # writes to that private frame, which nothing reads after it)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
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

# ---- infer-time inference_config -------------------------------------------------------------

TASK_NAMES = ("pass_through", "text_embedding", "text_classification", "ner")
# the infer-time keys each task takes, as Elasticsearch's config updates do
_OVERRIDABLE = {"pass_through": ("results_field",), "text_embedding": ("results_field",),
                "ner": ("results_field",),
                "text_classification": ("results_field", "num_top_classes", "classification_labels")}
MAX_TOP_CLASSES = 10_000


def check_inference_config(task: str, cfg: Any, labels: Optional[list[str]] = None) -> dict[str, Any]:
    """An infer-time ``inference_config`` for ``task``, checked: the keys the task takes, each
    with its rule (400 naming the field). Elasticsearch's form ``{"<task>": {...}}`` is accepted
    too. Returns the flat map."""
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise BadRequest("[inference_config] must be a map")
    if len(cfg) == 1 and next(iter(cfg)) in TASK_NAMES:
        (name, inner), = cfg.items()
        if name != task:
            raise BadRequest(f"Inference config of type [{task}] can not be updated with a request "
                             f"of type [{name}]")
        if not isinstance(inner, dict):
            raise BadRequest(f"[inference_config.{name}] must be a map")
        cfg = inner
    unknown = sorted(str(k) for k in cfg if k not in _OVERRIDABLE.get(task, ()))
    if unknown:
        raise BadRequest(f"Unrecognized fields [{', '.join(u[:80] for u in unknown[:10])}] in "
                         f"[inference_config] for task [{task}]; it takes "
                         f"[{', '.join(_OVERRIDABLE.get(task, ()))}]")
    if "results_field" in cfg:
        v = cfg["results_field"]
        if not isinstance(v, str) or not 1 <= len(v) <= 256:
            raise BadRequest("[results_field] must be a string of 1 to 256 characters")
    if "num_top_classes" in cfg:
        v = cfg["num_top_classes"]
        if isinstance(v, bool) or not isinstance(v, int) or not -1 <= v <= MAX_TOP_CLASSES:
            raise BadRequest(f"[num_top_classes] must be an integer from -1 (all classes) to "
                             f"{MAX_TOP_CLASSES}, got [{v!r:.80}]")
    if "classification_labels" in cfg:
        v = cfg["classification_labels"]
        if not isinstance(v, list) or not all(isinstance(x, str) and 0 < len(x) <= 256 for x in v):
            raise BadRequest("[classification_labels] must be a list of strings of 1 to 256 characters")
        if labels is not None and len(v) != len(labels):
            raise BadRequest(f"The number of [classification_labels] the model is defined with "
                             f"[{len(labels)}] does not match the number in the update [{len(v)}]")
    return dict(cfg)


def _overrides_for(task: str, docs: list[Any], overrides: Optional[list[Any]],
                   labels: Optional[list[str]] = None) -> list[Any]:
    """One checked map or ApiError per document."""
    if overrides is None:
        return [{}] * len(docs)
    if not isinstance(overrides, list) or len(overrides) != len(docs):
        raise BadRequest("[overrides] must be a list with one entry per document")
    out: list[Any] = []
    for o in overrides:
        try:
            out.append(check_inference_config(task, o, labels))
        except ApiError as e:
            out.append(e)
    return out


def _rename(result: dict[str, Any], opts: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    field = opts.get("results_field") or config.get("results_field")
    if field and field != DEFAULT_RESULTS_FIELD:
        result = {(field if k == DEFAULT_RESULTS_FIELD else k): v for k, v in result.items()}
    return result


# ---- pass_through ----------------------------------------------------------------------------

class PassThrough:
    task = "pass_through"

    def __init__(self, model: Any, config: Optional[dict] = None) -> None:
        self.model = model
        self.config = config or {}

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

    def run(self, docs: list[Any], overrides: Optional[list[Any]] = None) -> list[Outcome]:
        opts = _overrides_for(self.task, docs, overrides)
        out: list[Outcome] = []
        for doc, o in zip(docs, opts, strict=True):
            if isinstance(o, ApiError):
                out.append(o)
                continue
            try:
                out.append(_rename(self.one(doc), o, self.config))
            except ApiError as e:
                out.append(e)
            except Exception as e:  # anything else fails this document only
                out.append(ApiError(f"inference failed: {type(e).__name__}: {e}"[:1000]))
        return out

    def warmup_docs(self) -> Optional[list[dict[str, Any]]]:
        """The model config's ``example_input`` (an array, or nested lists of numbers with
        ``example_input_dtype``, default float32) as one document; None without one."""
        ex = self.config.get("example_input")
        if ex is None:
            return None
        if is_array(ex):
            return [{"input": ex}]
        try:
            arr = np.asarray(ex, dtype=np.dtype(str(self.config.get("example_input_dtype") or "float32")))
        except (TypeError, ValueError):
            return None
        return [{"input": encode_array(arr)}]


# ---- text tasks ------------------------------------------------------------------------------

def plan_batches(lengths: list[int], max_batch_tokens: int,
                 overhead_tokens: int = BATCH_OVERHEAD_TOKENS, unpadded: bool = False) -> list[list[int]]:
    """Cut documents of these token lengths into sub-batches: indices sorted by length, each
    sub-batch a run of that order with rows x its longest <= ``max_batch_tokens`` (a single
    document may exceed it), chosen to minimise the cost of the passes (dynamic programming over
    the sorted order): ``overhead_tokens`` per forward pass plus the tokens it computes, rows x its
    longest for a padded model; for an ``unpadded`` one (``common.hf._unpadded``) the real tokens
    plus its padded attention (rows x longest^2 / ``ATTENTION_TOKENS``)."""
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: lengths[i])
    ls = np.array([max(1, lengths[i]) for i in order], dtype=np.int64)
    before = np.concatenate(([0], np.cumsum(ls)))  # before[i]: tokens of the first i sorted documents
    best = np.zeros(n + 1, dtype=np.float64)  # best[j]: cost of the first j sorted documents
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        longest = int(ls[j - 1])
        rows_max = max(1, max_batch_tokens // longest)
        lo = max(0, j - rows_max)
        starts = np.arange(lo, j)
        if unpadded:
            tokens = (before[j] - before[lo:j]) + (j - starts) * (longest * longest / ATTENTION_TOKENS)
        else:
            tokens = (j - starts) * longest
        costs = best[lo:j] + overhead_tokens + tokens
        k = int(np.argmin(costs))
        best[j], cut[j] = costs[k], starts[k]
    groups: list[list[int]] = []
    j = n
    while j > 0:
        i = int(cut[j])
        groups.append(order[i:j])
        j = i
    groups.reverse()
    return groups


def _lowercases(tokenizer: Any) -> bool:
    import json
    try:
        norm = json.loads(tokenizer.to_str()).get("normalizer") or {}
    except Exception:
        return False
    stack = [norm]
    while stack:
        n = stack.pop()
        if not isinstance(n, dict):
            continue
        if n.get("type") == "Lowercase" or (n.get("type") == "BertNormalizer" and n.get("lowercase")):
            return True
        stack.extend(n.get("normalizers") or [])
    return False


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


WARMUP_WORDS = ("the quick brown fox jumps over the lazy dog while model servers warm their "
                "caches before the first users arrive").split()


class _TextTask:
    """Tokenizing, length-aware batching and per-document outcomes; subclasses turn one
    document's model output into its result."""
    task = "text"

    def __init__(self, model: Any, config: Optional[dict], tokenizer_path: str) -> None:
        from tokenizers import Tokenizer
        cfg = config or {}
        self.model = model
        self.config = cfg
        self.max_len = int(cfg.get("max_sequence_length") or 512)
        self.max_batch_tokens = int(cfg.get("max_batch_tokens") or DEFAULT_MAX_BATCH_TOKENS)
        self.tok = Tokenizer.from_file(tokenizer_path)
        self.tok.enable_truncation(self.max_len)
        self.tok.no_padding()
        pad_id = self.tok.token_to_id("[PAD]")
        self.pad_id = pad_id if pad_id is not None else 0
        self.lowercase = _lowercases(self.tok)
        self.labels: Optional[list[str]] = None
        self.overhead_tokens = BATCH_OVERHEAD_TOKENS
        # import-hf's BERT models compute only the real tokens (common.hf._unpadded)
        self.unpadded = bool(cfg.get("unpadded", False))
        self.batches_run = 0  # forward passes, for tests and benchmarks

    # subclasses: one document's result from its row of the model output
    def _result(self, text: str, enc: Any, row: torch.Tensor, opts: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _forward(self, encs: list[Any]) -> torch.Tensor:
        width = max(len(e.ids) for e in encs)
        ids = torch.full((len(encs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        for r, e in enumerate(encs):
            ids[r, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[r, :len(e.ids)] = 1
        self.batches_run += 1
        out = self.model(ids, mask)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif isinstance(out, dict):
            out = out.get("logits", out.get("last_hidden_state", next(iter(out.values()))))
        return self._batch_post(out, mask)

    def _batch_post(self, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return out

    def _encode(self, texts: list[str], where: list[int], out: list[Outcome]) -> list[Any]:
        """The texts' encodings; if the tokenizer refuses the batch, each text is encoded alone
        and one it refuses fails its own document (400) and is None here."""
        try:
            return list(self.tok.encode_batch(texts))
        except Exception:
            encs: list[Any] = []
            for k, text in enumerate(texts):
                try:
                    encs.append(self.tok.encode(text))
                except Exception as e:
                    out[where[k]] = BadRequest(f"[text_field] cannot be tokenized: {type(e).__name__}: "
                                               f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                    encs.append(None)
            return encs

    def run(self, docs: list[Any], overrides: Optional[list[Any]] = None) -> list[Outcome]:
        opts = _overrides_for(self.task, docs, overrides, self.labels)
        out: list[Outcome] = [None] * len(docs)
        texts: list[str] = []
        where: list[int] = []
        for i, doc in enumerate(docs):
            if isinstance(opts[i], ApiError):
                out[i] = opts[i]
            elif isinstance(doc, dict) and isinstance(doc.get("text_field"), str):
                texts.append(doc["text_field"])
                where.append(i)
            else:
                out[i] = BadRequest("each doc must be a map with [text_field] (a string)")
        if not texts:
            return out
        encs = self._encode(texts, where, out)
        if any(e is None for e in encs):  # a text the tokenizer refused failed alone: plan the rest
            keep = [k for k, e in enumerate(encs) if e is not None]
            texts, where, encs = [texts[k] for k in keep], [where[k] for k in keep], [encs[k] for k in keep]
            if not texts:
                return out
        for group in plan_batches([len(e.ids) for e in encs], self.max_batch_tokens, self.overhead_tokens,
                                  self.unpadded):
            try:
                rows = self._forward([encs[k] for k in group])
                parts = [(k, rows[r]) for r, k in enumerate(group)]
            except Exception as e:
                if len(group) == 1:
                    out[where[group[0]]] = _model_error(e)
                    continue
                parts = []  # one document broke the pass: run each alone, so it fails alone
                for k in group:
                    alone = self._one_alone(encs[k])
                    if isinstance(alone, ApiError):
                        out[where[k]] = alone
                    else:
                        parts.append((k, alone))
            for k, row in parts:
                i = where[k]
                try:
                    out[i] = _rename(self._result(texts[k], encs[k], row, opts[i]), opts[i], self.config)
                except ApiError as e:
                    out[i] = e
                except Exception as e:  # a bug in post-processing fails this document only
                    out[i] = ApiError(f"inference failed: {type(e).__name__}: {e}"[:1000])
        return out

    def _one_alone(self, enc: Any) -> Any:
        try:
            return self._forward([enc])[0]
        except Exception as e:
            return _model_error(e)

    def warmup_docs(self) -> list[dict[str, Any]]:
        """A few texts of different lengths (about 8, 48, 192 and the maximum tokens, at most
        max_sequence_length), far enough apart that ``run`` gives each its own forward pass."""
        docs = []
        for n in sorted({min(self.max_len, n) for n in (8, 48, 192, self.max_len)}):
            words = [WARMUP_WORDS[i % len(WARMUP_WORDS)] for i in range(max(1, n - 2))]
            docs.append({"text_field": " ".join(words)})
        return docs

    def _truncated(self, enc: Any, result: dict[str, Any]) -> dict[str, Any]:
        if enc.overflowing:
            result["is_truncated"] = True
        return result


class TextEmbedding(_TextTask):
    task = "text_embedding"

    def __init__(self, model: Any, config: Optional[dict], tokenizer_path: str) -> None:
        super().__init__(model, config, tokenizer_path)
        self.pooling = self.config.get("pooling", "mean")
        self.normalize = bool(self.config.get("normalize", False))

    def _batch_post(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if h.dim() == 3:
            m = mask.unsqueeze(-1).to(h.dtype)
            if self.pooling == "cls":
                h = h[:, 0]
            elif self.pooling == "max":
                h = h.masked_fill(m == 0, float("-inf")).max(dim=1).values
            else:
                h = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            h = torch.nn.functional.normalize(h, p=2.0, dim=1)
        return h

    def _result(self, text: str, enc: Any, row: torch.Tensor, opts: dict[str, Any]) -> dict[str, Any]:
        return self._truncated(enc, {"predicted_value": row.tolist()})


class TextClassification(_TextTask):
    task = "text_classification"

    def __init__(self, model: Any, config: Optional[dict], tokenizer_path: str) -> None:
        super().__init__(model, config, tokenizer_path)
        labels = self.config.get("classification_labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"[text_classification] requires at least 2 [classification_labels]; "
                             f"provided {labels!r:.200}")
        self.labels = labels
        self.num_top_classes = int(self.config.get("num_top_classes") or 0)

    def _result(self, text: str, enc: Any, row: torch.Tensor, opts: dict[str, Any]) -> dict[str, Any]:
        labels = opts.get("classification_labels") or self.labels
        logits = row.detach().float().numpy().reshape(-1)
        if logits.shape[0] != len(labels):
            raise ApiError(f"Expected exactly [{len(labels)}] values in text classification result; "
                           f"got [{logits.shape[0]}]")
        p = _softmax(logits)
        order = sorted(range(len(p)), key=lambda i: -p[i])
        k = opts.get("num_top_classes", self.num_top_classes)
        k = len(labels) if k < 0 else k
        result: dict[str, Any] = {"predicted_value": labels[order[0]]}
        if k:
            result["top_classes"] = [{"class_name": labels[i], "class_probability": float(p[i]),
                                      "class_score": float(p[i])} for i in order[:k]]
        result["prediction_probability"] = float(p[order[0]])
        return self._truncated(enc, result)


def annotate(text: str, entities: list[dict[str, Any]]) -> str:
    """Elasticsearch's annotated text: each entity ``[text](CLASS&text+with+pluses)``."""
    parts, pos = [], 0
    for e in entities:
        s, t = e["start_pos"], e["end_pos"]
        seq = text[s:t]
        parts.append(text[pos:s])
        parts.append(f"[{seq}]({e['class_name']}&{seq.replace(' ', '+')})")
        pos = t
    parts.append(text[pos:])
    return "".join(parts)


class Ner(_TextTask):
    task = "ner"

    def __init__(self, model: Any, config: Optional[dict], tokenizer_path: str) -> None:
        super().__init__(model, config, tokenizer_path)
        self.iob = iob_labels(self.config.get("classification_labels") or list(DEFAULT_IOB_TAGS))

    def _result(self, text: str, enc: Any, row: torch.Tensor, opts: dict[str, Any]) -> dict[str, Any]:
        n = len(enc.ids)
        scores = row[:n].detach().float().numpy()
        if scores.ndim != 2 or scores.shape[1] != len(self.iob):
            raise ApiError(f"Expected [{len(self.iob)}] values per token in ner result; got shape "
                           f"{list(scores.shape)}")
        probs = _softmax(scores)
        words: list[tuple[int, float, int, int]] = []  # (label index, probability, start, end)
        word_ids, offsets = enc.word_ids, enc.offsets
        t = 0
        while t < n:
            w = word_ids[t]
            if w is None:
                t += 1
                continue
            end = t
            while end + 1 < n and word_ids[end + 1] == w:
                end += 1
            avg = probs[t:end + 1].mean(axis=0)
            best = int(np.argmax(avg))
            words.append((best, float(avg[best]), offsets[t][0], offsets[end][1]))
            t = end + 1
        entities: list[dict[str, Any]] = []
        i = 0
        while i < len(words):
            label, score, start, stop = words[i]
            cls = self.iob[label][1]
            if cls == "O":
                i += 1
                continue
            j, total = i + 1, score
            while j < len(words) and not self.iob[words[j][0]][2] and self.iob[words[j][0]][1] == cls:
                total += words[j][1]
                stop = words[j][3]
                j += 1
            span = text[start:stop]
            entities.append({"entity": span.lower() if self.lowercase else span, "class_name": cls,
                             "class_probability": total / (j - i), "start_pos": start, "end_pos": stop})
            i = j
        return self._truncated(enc, {"predicted_value": annotate(text, entities), "entities": entities})


TEXT_TASKS = {"text_embedding": TextEmbedding, "text_classification": TextClassification, "ner": Ner}


def make_task(task: str, model: Any, config: Optional[dict], tokenizer_path: Optional[str]):
    if task in TEXT_TASKS:
        if not tokenizer_path:
            raise ValueError(f"task [{task}] needs a tokenizer")
        return TEXT_TASKS[task](model, config, tokenizer_path)
    return PassThrough(model, config)
