"""Shared by the benchmarks: a real cluster on loopback, percentiles and a table printer."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import Cluster, running_cluster


@contextlib.contextmanager
def cluster(processors: int = 2) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="mlfleet-bench-") as d:
        with running_cluster(Path(d), {"node-a": processors}) as c:
            yield c


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    out = [f"\n{title}", "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(out)


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


__all__ = ["cluster", "pct", "table", "fmt", "statistics"]
