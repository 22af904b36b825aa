"""Bring a local Hugging Face model directory into mlfleet, offline: trace it to TorchScript (or
export it with ``torch.export``), keep its ``tokenizer.json``, and write the model config its task
needs. Needs the ``hf`` extra (transformers), as Elasticsearch's eland does.

The task comes from the directory's ``config.json`` unless given: ``architectures`` ending in
``ForTokenClassification`` -> ``ner``, ``ForSequenceClassification`` -> ``text_classification``,
anything else -> ``text_embedding`` (pooling and normalisation read from the sentence-transformers
files ``modules.json`` / ``1_Pooling/config.json``). Classification labels come from ``id2label``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

HF_TASKS = ("text_embedding", "text_classification", "ner")
FORMATS = ("torchscript", "export")


@dataclass(frozen=True)
class ImportedModel:
    path: Path          # the model file: TorchScript (.pt) or a torch.export program (.pt2)
    tokenizer: Path
    config: dict[str, Any]
    task: str = "text_embedding"
    format: str = "torchscript"

    @property
    def torchscript(self) -> Path:  # the name callers used before there were two formats
        return self.path


# Elasticsearch's NER tags when a model config names none
DEFAULT_IOB_TAGS = ("O", "B_MISC", "I_MISC", "B_PER", "I_PER", "B_ORG", "I_ORG", "B_LOC", "I_LOC")


def iob_labels(labels: Any) -> list[tuple[str, str, bool]]:
    """(tag, entity class, starts an entity) per label, as Elasticsearch reads IOB tags: ``O``,
    ``B-X``/``B_X`` and ``I-X``/``I_X`` (any case); raises ValueError naming a bad label."""
    if not isinstance(labels, list) or not labels:
        raise ValueError("[ner] [classification_labels] must be the model's IOB tags in output order")
    out, seen, bad = [], set(), []
    for tag in labels:
        if not isinstance(tag, str):
            bad.append(f"classification label [{tag!r:.40}] is not a string")
            continue
        up = tag.upper()
        if up[:2] in ("B-", "I-", "B_", "I_") and len(up) > 2:
            out.append((tag, up[2:], up.startswith("B")))
        elif up == "O":
            out.append((tag, "O", False))
        else:
            bad.append(f"classification label [{tag}] is not an entity I-O-B tag.")
        if tag in seen:
            bad.append(f"the classification label [{tag}] is duplicated in the list {labels}")
        seen.add(tag)
    if bad:
        raise ValueError("; ".join(bad))
    return out


def model_config_problem(task: str, config: Optional[dict[str, Any]]) -> Optional[str]:
    """What is wrong with a model config for ``task`` (checked when a model is put), or None."""
    labels = (config or {}).get("classification_labels")
    if task == "text_classification" and (not isinstance(labels, list) or len(labels) < 2):
        return (f"[text_classification] requires at least 2 [classification_labels]; "
                f"provided {labels!r:.200}")
    if task == "ner" and labels is not None:
        try:
            iob_labels(labels)
        except ValueError as e:
            return str(e)
    return None


def read_sentence_transformers_config(d: Path, max_sequence_length: Optional[int] = None) -> dict[str, Any]:
    """Pooling, normalisation and the maximum sequence length, as sentence-transformers would use them."""
    pooling, normalize = "mean", False
    modules = d / "modules.json"
    if modules.exists():
        for mod in json.loads(modules.read_text()):
            kind = mod.get("type", "")
            if kind.endswith("Normalize"):
                normalize = True
            elif kind.endswith("Pooling"):
                cfg_path = d / mod.get("path", "1_Pooling") / "config.json"
                if cfg_path.exists():
                    cfg = json.loads(cfg_path.read_text())
                    if cfg.get("pooling_mode_cls_token"):
                        pooling = "cls"
                    elif cfg.get("pooling_mode_max_tokens"):
                        pooling = "max"
    model_cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
    st_cfg_path = d / "sentence_bert_config.json"
    st_cfg = json.loads(st_cfg_path.read_text()) if st_cfg_path.exists() else {}
    limit = position_limit(model_cfg)
    tok_cfg_path = d / "tokenizer_config.json"
    tok_max = json.loads(tok_cfg_path.read_text()).get("model_max_length") if tok_cfg_path.exists() else None
    own_max = int(st_cfg.get("max_seq_length") or 0) or min(
        limit, int(tok_max) if isinstance(tok_max, (int, float)) and 1 <= tok_max < 1_000_000 else limit)
    own_max = min(own_max, limit)
    if max_sequence_length is not None:
        if not 1 <= max_sequence_length <= limit:
            raise ValueError(f"[max_sequence_length] must be between 1 and the {limit} tokens the model's "
                             "position embeddings hold")
        own_max = max_sequence_length
    return {"pooling": pooling, "normalize": normalize, "max_sequence_length": own_max,
            "embedding_size": model_cfg.get("hidden_size"), "source": d.name}


# Models whose position ids start after the padding index (transformers'
# create_position_ids_from_input_ids): pad_token_id + 1 of their max_position_embeddings are not
# tokens' positions (RoBERTa's 514 hold 512 tokens).
_POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                                      "mpnet", "data2vec-text", "roberta-prelayernorm", "ibert"})


def position_limit(model_cfg: dict[str, Any]) -> int:
    """How many tokens a text may have for the model's position embeddings."""
    n = int(model_cfg.get("max_position_embeddings") or 512)
    if model_cfg.get("model_type") in _POSITIONS_AFTER_PADDING:
        n -= int(model_cfg.get("pad_token_id") if model_cfg.get("pad_token_id") is not None else 1) + 1
    return max(1, n)


def task_of(model_cfg: dict[str, Any]) -> str:
    """The mlfleet task a Hugging Face config.json describes."""
    archs = model_cfg.get("architectures") or []
    if any(str(a).endswith("ForTokenClassification") for a in archs):
        return "ner"
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        return "text_classification"
    return "text_embedding"


def labels_of(model_cfg: dict[str, Any]) -> list[str]:
    """``id2label`` in output order."""
    id2label = model_cfg.get("id2label") or {}
    try:
        pairs = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        raise ValueError("config.json [id2label] must map output indices to label names") from None
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise ValueError("config.json [id2label] must name every output index from 0")
    return [v for _, v in pairs]


def model_config_for(d: Path, task: str, max_sequence_length: Optional[int] = None) -> dict[str, Any]:
    """The mlfleet model config of a Hugging Face directory for ``task``."""
    base = read_sentence_transformers_config(d, max_sequence_length)
    if task == "text_embedding":
        return base
    model_cfg = json.loads((d / "config.json").read_text())
    labels = labels_of(model_cfg)
    config = {"classification_labels": labels}
    if (p := model_config_problem(task, config)):
        raise ValueError(f"{p} (from config.json [id2label])")
    return {"classification_labels": labels, "max_sequence_length": base["max_sequence_length"],
            "source": base["source"]}


# the Hugging Face classes whose forward ``_unpadded`` reproduces
_UNPADDED_CLASSES = ("BertModel", "BertForTokenClassification", "BertForSequenceClassification")


def can_unpad(model: Any) -> bool:
    """True for a BERT encoder (absolute positions, no decoder, no cross-attention) that
    ``_unpadded`` computes the same as transformers does."""
    cfg = getattr(model, "config", None)
    return (type(model).__name__ in _UNPADDED_CLASSES and getattr(cfg, "model_type", None) == "bert"
            and getattr(cfg, "position_embedding_type", "absolute") in (None, "absolute")
            and not getattr(cfg, "is_decoder", False) and not getattr(cfg, "add_cross_attention", False))


def _wrapper(task: str, d: Path, unpad: bool = True):
    """The model of ``d`` for ``task`` as a module ``(input_ids, attention_mask) -> tensor``, and
    whether it is unpadded (see ``_unpadded``)."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification
    cls = {"ner": AutoModelForTokenClassification,
           "text_classification": AutoModelForSequenceClassification}.get(task, AutoModel)
    model = cls.from_pretrained(str(d), attn_implementation="eager").eval()
    field = "last_hidden_state" if task == "text_embedding" else "logits"
    if unpad and can_unpad(model):
        return _unpadded(model, task).eval(), True

    class Wrapped(torch.nn.Module):
        """input_ids, attention_mask -> last hidden state [batch, seq, hidden] (text_embedding),
        or logits ([batch, labels] for text_classification, [batch, seq, labels] for ner)."""

        def __init__(self, m: torch.nn.Module, field: str) -> None:
            super().__init__()
            self.m = m
            self.field = field

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.m(input_ids=input_ids, attention_mask=attention_mask)
            return out.logits if self.field == "logits" else out.last_hidden_state

    return Wrapped(model, field).eval(), False


def _unpadded(model: Any, task: str):
    """A BERT model's forward with the padding taken out of every per-token layer.

    Same inputs and outputs as the model (``input_ids``, ``attention_mask`` ``[batch, seq]``, right
    padded) and the same weights and arithmetic (transformers' own embedding, linear, LayerNorm
    and activation modules; its eager attention: ``softmax(q k^T * scale + mask) v``), but the
    embeddings, the Q/K/V projections, the attention output, the feed-forward layers and the
    classifier run on the real tokens only, packed ``[tokens, hidden]``: a batch of texts of
    different lengths costs the tokens it holds, not rows x its longest. Only attention runs per
    document, padded to the batch's longest (its cost grows with the padding, but it is a small
    part of the whole at these lengths). Padding positions of a ``[batch, seq, ...]`` output are
    zeros (transformers computes values there that nothing reads)."""
    import torch

    bert = model.base_model
    cfg = bert.config
    heads, hidden = int(cfg.num_attention_heads), int(cfg.hidden_size)
    head_size = hidden // heads

    class Unpadded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            b, s = input_ids.shape[0], input_ids.shape[1]
            where = attention_mask.reshape(-1).nonzero().squeeze(1)  # the real tokens in [b * s]
            ids = input_ids.reshape(-1).index_select(0, where)
            pos = torch.arange(s, device=input_ids.device).expand(b, s).reshape(-1).index_select(0, where)
            x = bert.embeddings(input_ids=ids.unsqueeze(0), position_ids=pos.unsqueeze(0),
                                token_type_ids=torch.zeros_like(ids).unsqueeze(0)).squeeze(0)
            # transformers' additive mask: the dtype's minimum where a key is padding
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min

            def padded(t: torch.Tensor) -> torch.Tensor:  # [tokens, hidden] -> [b, heads, s, head]
                full = t.new_zeros((b * s, hidden)).index_copy(0, where, t)
                return full.view(b, s, heads, head_size).transpose(1, 2)

            for layer in bert.encoder.layer:
                att = layer.attention.self
                q, k, v = padded(att.query(x)), padded(att.key(x)), padded(att.value(x))
                scores = torch.matmul(q, k.transpose(2, 3)) * att.scaling + mask
                w = torch.nn.functional.softmax(scores, dim=-1)
                ctx = torch.matmul(w, v).transpose(1, 2).reshape(b * s, hidden).index_select(0, where)
                a = layer.attention.output(ctx, x)
                x = layer.output(layer.intermediate(a), a)
            if task == "text_classification":  # the pooler reads each text's first token
                first = x.new_zeros((b * s, hidden)).index_copy(0, where, x).view(b, s, hidden)
                return self.m.classifier(self.m.dropout(bert.pooler(first)))
            if task == "ner":
                x = self.m.classifier(self.m.dropout(x))
            return x.new_zeros((b * s, x.shape[1])).index_copy(0, where, x).view(b, s, x.shape[1])

    return Unpadded()


def _example_inputs():
    import torch
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    return ids, (ids != 0).long()


def trace_hf_model(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                   max_sequence_length: Optional[int] = None, task: Optional[str] = None,
                   format: str = "torchscript", unpad: bool = True) -> ImportedModel:
    """Write the model of a local Hugging Face directory into ``out_dir``: ``model.pt``
    (TorchScript, ``torch.jit.trace``) or ``model.pt2`` (``torch.export`` with dynamic batch and
    sequence dimensions, ``torch.export.save``). A BERT model is written unpadded (``_unpadded``;
    its config says ``"unpadded": true``) unless ``unpad`` is False."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise RuntimeError("import-hf needs the 'hf' extra: pip install 'mlfleet[hf]'") from e
    if format not in FORMATS:
        raise ValueError(f"invalid [format] [{format}]; must be one of [{','.join(FORMATS)}]")
    d = Path(model_dir)
    tokenizer = d / "tokenizer.json"
    if not (d / "config.json").exists() or not tokenizer.exists():
        raise ValueError(f"{d} is not a Hugging Face model directory (needs config.json and tokenizer.json)")
    if task is None:
        task = task_of(json.loads((d / "config.json").read_text()))
    if task not in HF_TASKS:
        raise ValueError(f"invalid [task] [{task}]; must be one of [{','.join(HF_TASKS)}]")
    config = model_config_for(d, task, max_sequence_length)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wrapped, unpadded = _wrapper(task, d, unpad)
    if unpadded:
        config = {**config, "unpadded": True}
    ids, mask = _example_inputs()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if format == "export":
            dyn = {"input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},
                   "attention_mask": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}
            program = torch.export.export(wrapped, (ids, mask), dynamic_shapes=dyn)
            path = out / "model.pt2"
            torch.export.save(program, str(path))
        else:
            traced = torch.jit.trace(wrapped, (ids, mask), strict=False, check_trace=False)
            path = out / "model.pt"
            torch.jit.save(traced, str(path))
    return ImportedModel(path, tokenizer, config, task, format)


def import_hf(client: Any, model_id: str, model_dir: str | os.PathLike[str], task: Optional[str] = None,
              max_sequence_length: Optional[int] = None, format: str = "torchscript") -> dict[str, Any]:
    """Trace (or export) a local Hugging Face directory and put it through ``client``."""
    with tempfile.TemporaryDirectory(prefix="mlfleet-hf-") as tmp:
        imported = trace_hf_model(model_dir, tmp, max_sequence_length, task=task, format=format)
        return client.put_model(model_id, imported.path, task=imported.task,
                                tokenizer=imported.tokenizer, model_config=imported.config)
