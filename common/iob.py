"""Elasticsearch's reading of a named-entity model's labels (IOB tags): shared by the importer
(common/hf.py, which refuses a model whose labels are not tags) and the ner task (agent/tasks.py)."""

from __future__ import annotations

from typing import Any


def iob_labels(labels: Any) -> list[tuple[str, str, bool]]:
    """(tag, entity class, starts an entity) per label, as Elasticsearch reads IOB tags: ``O``,
    ``B-X``/``B_X`` and ``I-X``/``I_X`` (any case); raises ValueError naming a bad label."""
    if not isinstance(labels, list) or not labels:
        raise ValueError("[ner] requires [classification_labels]: the model's IOB tags in output order")
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
