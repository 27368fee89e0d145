"""OVERLAP family: smooth max of a GPU expert and a CPU expert."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import clone

from blis_model.models.overlap import Overlap, overlap_time

GPU = ("gemm_compute_us", "decode_attention_us")
CPU = ("layer_overhead", "step_overhead")


def synthetic(n: int, theta: np.ndarray, key: str, seed: int, power: float = 3.0,
              noise: float = 0.01) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "gemm_compute_us": rng.uniform(0, 30000, n),
        "decode_attention_us": rng.uniform(0, 20000, n),
        "layer_overhead": rng.choice([32.0, 48.0, 80.0], n),
        "step_overhead": np.ones(n),
    })
    g = frame[list(GPU)].to_numpy() @ theta[:2]
    c = frame[list(CPU)].to_numpy() @ theta[2:]
    frame["duration_us"] = overlap_time(g, c, power) * (1 + noise * rng.standard_normal(n))
    frame["config_key"] = key
    frame["experiment"] = key
    return frame


def test_smooth_max_limits() -> None:
    g, c = np.array([100.0, 0.0, 50.0]), np.array([0.0, 100.0, 50.0])
    np.testing.assert_allclose(overlap_time(g, c, 1.0), g + c)
    np.testing.assert_allclose(overlap_time(g, c, 200.0), np.maximum(g, c), rtol=0.01)


def test_recovers_known_coefficients() -> None:
    theta = np.array([1.3, 1.6, 150.0, 3000.0])
    frame = synthetic(3000, theta, "a", 0)
    model = Overlap(gpu_features=GPU, cpu_features=CPU, ridge=0.0).fit(frame)
    np.testing.assert_allclose(model.coef_, theta, rtol=0.05)
    rel = np.abs(model.predict(frame) / frame["duration_us"] - 1)
    assert rel.mean() < 0.02


def test_unexercised_feature_keeps_its_prior() -> None:
    frame = synthetic(500, np.array([1.2, 1.0, 100.0, 2000.0]), "a", 1)
    frame["moe_layer_overhead"] = 0.0  # a dense-only corpus never exercises MoE layers
    model = Overlap(gpu_features=GPU, cpu_features=(*CPU, "moe_layer_overhead")).fit(frame)
    assert model.coef_[-1] == 0.0


def test_calibration_round_trip_and_clone() -> None:
    donor = synthetic(1500, np.array([1.0, 1.0, 100.0, 2000.0]), "donor", 2)
    model = Overlap(gpu_features=GPU, cpu_features=CPU).fit(donor)
    target = synthetic(200, np.array([1.5, 1.0, 100.0, 2000.0]), "target", 3)
    calibrated = model.calibrate(target)
    before = np.abs(model.predict(target) / target["duration_us"] - 1).mean()
    after = np.abs(calibrated.predict(target) / target["duration_us"] - 1).mean()
    assert after < before / 2 and "target" not in model.config_coef_
    again = Overlap.from_dict(calibrated.to_dict())
    np.testing.assert_allclose(again.predict(target), calibrated.predict(target), rtol=1e-12)
    assert clone(model).get_params() == model.get_params()
