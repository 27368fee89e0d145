"""Markdown output shared by the benchmark scripts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def table(rows: list[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) over ``columns``; floats to 3 significant
    digits (1 decimal from 10 up), NaN as n/a."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
