"""Linear-algebra helpers shared by the families: chunked relative-error statistics,
column-wise prediction and per-configuration grouping.

Everything here is linear in rows: statistics are accumulated over row chunks (memory
O(chunk · p)), predictions are accumulated column by column (memory O(rows)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.linalg import cho_factor, cho_solve

from blis_model.models.solvers import RelativeGram

CHUNK_ROWS = 131_072

Rows = slice | np.ndarray
RowsFn = Callable[[Rows], np.ndarray]  # rows → (rows, p) design block (unscaled, µs/counts)


def columns_fn(X: pd.DataFrame, names: Sequence[str], idx: np.ndarray | None = None) -> RowsFn:
    """Row blocks of the named frame columns as float64 matrices (of rows ``idx`` only,
    renumbered from 0, when given)."""
    arrays = [X[n].to_numpy(dtype=np.float64) for n in names]
    if idx is not None:
        arrays = [a[idx] for a in arrays]

    def rows(sl: Rows) -> np.ndarray:
        return np.column_stack([a[sl] for a in arrays]) if arrays else np.zeros((0, 0))

    return rows


def relative_stats(rows: RowsFn, y: np.ndarray, offset: np.ndarray | None = None,
                   w: np.ndarray | None = None, chunk: int = CHUNK_ROWS) -> RelativeGram:
    """Statistics of Σ w·(x·β/y − t)² with t = (y − offset)/y (t = 1 without offset).

    ``rows`` yields the design in row blocks, so a million rows cost O(chunk·p) memory.
    """
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    stats: RelativeGram | None = None
    for start in range(0, max(n, 1), chunk):
        sl = slice(start, min(start + chunk, n))
        Xc = rows(sl)
        yc = y[sl]
        A = Xc / yc[:, None]
        wc = np.ones(len(yc)) if w is None else np.asarray(w[sl], dtype=np.float64)
        t = np.ones(len(yc)) if offset is None else (yc - offset[sl]) / yc
        Aw = A * wc[:, None]
        part = RelativeGram(A.T @ Aw, Aw.T @ t, float(wc.sum()), (Aw * A).sum(axis=0))
        stats = part if stats is None else stats + part
    assert stats is not None
    return stats


def linear_predict(X: pd.DataFrame, names: Sequence[str], beta: np.ndarray,
                   idx: np.ndarray | None = None) -> np.ndarray:
    """Σ_k β_k·X[name_k] (rows ``idx`` only when given), accumulated column by column."""
    n = len(X) if idx is None else len(idx)
    out = np.zeros(n)
    for name, b in zip(names, beta, strict=True):
        if b:
            col = X[name].to_numpy(dtype=np.float64)
            out += b * (col if idx is None else col[idx])
    return out


def spd_inverse(H: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive (semi)definite matrix, jittered when singular."""
    d = np.sqrt(np.maximum(np.diag(H), 1e-300))
    Hn = H / np.outer(d, d)
    jitter = 1e-12
    for _ in range(10):
        try:
            factor = cho_factor(Hn + jitter * np.eye(len(H)))
            return cho_solve(factor, np.eye(len(H))) / np.outer(d, d)
        except np.linalg.LinAlgError:
            jitter *= 100
    return np.linalg.pinv(H)  # pragma: no cover


def config_groups(X: pd.DataFrame) -> dict[str, np.ndarray]:
    """Row indices of each configuration (``config_key``), sorted by key."""
    if "config_key" not in X or not len(X):
        return {}
    return {str(k): v for k, v in X.groupby("config_key", sort=True).indices.items()}


def frame_column(X: pd.DataFrame, name: str, default: float = 0.0) -> np.ndarray:
    """A frame column as float64, ``default`` everywhere when the frame lacks it."""
    if name in X:
        return X[name].to_numpy(dtype=np.float64)
    return np.full(len(X), float(default))
