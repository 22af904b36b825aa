"""Bring a local Hugging Face model directory (sentence-transformers layout) into mlfleet, offline:
trace it to TorchScript, keep its ``tokenizer.json``, and read its pooling and normalisation
from ``modules.json`` / ``1_Pooling/config.json``. Needs the ``hf`` extra (transformers), as
Elasticsearch's eland does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class ImportedModel:
    torchscript: Path
    tokenizer: Path
    config: dict[str, Any]


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
    own_max = int(st_cfg.get("max_seq_length") or model_cfg.get("max_position_embeddings") or 512)
    if max_sequence_length is not None:
        if not 1 <= max_sequence_length <= int(model_cfg.get("max_position_embeddings") or own_max):
            raise ValueError(f"[max_sequence_length] must be between 1 and the model's "
                             f"{model_cfg.get('max_position_embeddings') or own_max}")
        own_max = max_sequence_length
    return {"pooling": pooling, "normalize": normalize, "max_sequence_length": own_max,
            "embedding_size": model_cfg.get("hidden_size"), "source": d.name}


def trace_hf_model(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                   max_sequence_length: Optional[int] = None) -> ImportedModel:
    try:
        import torch
        from transformers import AutoModel
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise RuntimeError("import-hf needs the 'hf' extra: pip install 'mlfleet[hf]'") from e
    d = Path(model_dir)
    tokenizer = d / "tokenizer.json"
    if not (d / "config.json").exists() or not tokenizer.exists():
        raise ValueError(f"{d} is not a Hugging Face model directory (needs config.json and tokenizer.json)")
    config = read_sentence_transformers_config(d, max_sequence_length)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModel.from_pretrained(str(d), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        """input_ids, attention_mask -> last hidden state [batch, seq, hidden]."""

        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    enc = Encoder(model).eval()
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        traced = torch.jit.trace(enc, (ids, mask), strict=False, check_trace=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.pt"
    torch.jit.save(traced, str(path))
    return ImportedModel(path, tokenizer, config)
