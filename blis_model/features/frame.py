"""Feature frames: step tables of many experiments joined with their configuration and
turned into the feature frame every model family consumes.

A frame has one row per step and these columns:

* identity: ``experiment`` (path relative to the corpus), ``config_key`` (model, GPU, TP,
  quantization, scheduler knobs), ``step_id``, ``duration_us`` (the label, µs);
* every physics feature of ``features.physics`` (µs or counts, see the registry);
* ``blis_0`` … ``blis_10``: BLIS's trained-physics basis in beta order;
* the raw composition and queue columns of the step table (for regimes and ARD
  candidates), plus per-experiment constants (``hw_*``, ``arch_*``, ``tp``) used by
  configuration embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from blis_model.configuration.defaults import TRAIN_FRACTION
from blis_model.configuration.experiment import Experiment
from blis_model.features import candidates, physics  # noqa: F401 - registers the features
from blis_model.features.blis_parity import BETA_NAMES, blis_basis
from blis_model.features.context import FeatureContext
from blis_model.features.registry import REGISTRY, compute

BLIS_COLUMNS: tuple[str, ...] = tuple(f"blis_{i}" for i in range(len(BETA_NAMES)))


def feature_context(exp: Experiment) -> FeatureContext:
    return FeatureContext(exp.arch, exp.hardware, exp.server.tensor_parallelism,
                          exp.server.data_parallelism)


def experiment_constants(exp: Experiment) -> dict[str, float]:
    """Per-experiment numbers describing the configuration (for embeddings and reports)."""
    a, hw, s = exp.arch, exp.hardware, exp.server
    return {
        "tp": float(s.tensor_parallelism),
        "max_num_batched_tokens": float(s.max_num_batched_tokens),
        "max_num_seqs": float(s.max_num_seqs),
        "hw_tflops": hw.peak_flops_per_us(a.weight_bytes_per_param) / 1e6,
        "hw_hbm_tbs": hw.hbm_tbs,
        "hw_interconnect_gbs": hw.interconnect_gbs, "arch_layers": float(a.num_layers),
        "arch_hidden": float(a.hidden_size), "arch_gqa_ratio": a.num_heads / a.num_kv_heads,
        "arch_experts": float(a.num_experts), "arch_top_k": float(a.experts_per_token),
        "arch_weight_bytes": a.weight_bytes_per_param,
    }


def feature_frame(exp: Experiment, table: pa.Table,
                  feature_names: Sequence[str] | None = None) -> pd.DataFrame:
    """The feature frame of one experiment's step table (see module docstring)."""
    names = list(feature_names or REGISTRY)
    cols = {name: table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            for name in table.column_names if name not in ("experiment", "composition")}
    ctx = feature_context(exp)
    n = table.num_rows
    # columns are gathered first and the frame built once (inserting ~85 columns one by
    # one into a DataFrame costs more than computing every feature)
    data: dict[str, object] = {"experiment": [exp.name] * n, "config_key": [exp.config_key] * n}
    data.update(cols)
    data["step_id"] = cols["step_id"].astype(np.int64)
    if n:
        feats = compute(names, cols, ctx)
        basis = blis_basis(cols, ctx)
    else:
        feats, basis = np.zeros((0, len(names))), np.zeros((0, len(BLIS_COLUMNS)))
    for j, name in enumerate(names):
        data[name] = feats[:, j]
    for j, name in enumerate(BLIS_COLUMNS):
        data[name] = basis[:, j]
    for key, value in experiment_constants(exp).items():
        data[key] = np.full(n, value)
    return pd.DataFrame(data)


def concat_frames(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def temporal_split(frame: pd.DataFrame, train_fraction: float = TRAIN_FRACTION
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Within each experiment: earliest ``train_fraction`` of steps (by step_id) to train,
    the rest to test. Never random rows: steps are autocorrelated."""
    train, test = [], []
    for _, group in frame.groupby("experiment", sort=False):
        group = group.sort_values("step_id")
        k = int(round(train_fraction * len(group)))
        train.append(group.iloc[:k])
        test.append(group.iloc[k:])
    return concat_frames(train), concat_frames(test)


def loo_split(frame: pd.DataFrame, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leave one experiment out, zero-shot: ``(train, test)`` where test is experiment
    ``name`` and train every experiment of ANOTHER configuration (an experiment sharing
    its configuration key would leak its coefficients)."""
    test = frame[frame["experiment"] == name]
    if test.empty:
        return frame.iloc[:0], test
    train = frame[(frame["experiment"] != name)
                  & (frame["config_key"] != test["config_key"].iloc[0])]
    return train, test
