"""PICF: recovers known coefficients, stays non-negative, shrinks configs to the global fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import clone

from blis_model.models.picf import PICF

FEATURES = ("gemm_compute_us", "weight_read_us", "decode_attention_us", "step_overhead")


def synthetic(n: int, beta: np.ndarray, key: str, seed: int, noise: float = 0.02
              ) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.uniform(0, 5000, n), rng.uniform(1000, 4000, n),
                         rng.uniform(0, 8000, n), np.ones(n)])
    y = X @ beta * (1 + noise * rng.standard_normal(n))
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["duration_us"] = y
    frame["config_key"] = key
    frame["experiment"] = key
    return frame


def test_recovers_known_coefficients() -> None:
    beta = np.array([1.3, 0.9, 1.6, 2500.0])
    frame = synthetic(4000, beta, "a", 0)
    model = PICF(features=FEATURES, ridge=0.0).fit(frame)
    np.testing.assert_allclose(model.coef_, beta, rtol=0.03)
    assert (model.coef_ >= 0).all()


def test_coefficients_never_negative() -> None:
    beta = np.array([1.0, 0.0, 1.0, 100.0])
    frame = synthetic(500, beta, "a", 1, noise=0.3)
    frame["weight_read_us"] *= -1  # an anti-correlated column must be clipped, not negative
    model = PICF(features=FEATURES).fit(frame)
    assert (model.coef_ >= 0).all()


def test_few_config_steps_stay_near_global_and_many_follow_data() -> None:
    donor = synthetic(3000, np.array([1.0, 1.0, 1.0, 1000.0]), "donor", 2)
    target_beta = np.array([1.5, 1.0, 1.0, 1000.0])
    model = PICF(features=FEATURES, ridge=0.0).fit(donor)
    few = model.calibrate(synthetic(5, target_beta, "target", 3))
    many = model.calibrate(synthetic(3000, target_beta, "target", 4))
    assert abs(few.coefficients_for("target")[0] - 1.0) < abs(
        many.coefficients_for("target")[0] - 1.0)
    np.testing.assert_allclose(many.coefficients_for("target"), target_beta, rtol=0.05)
    assert "target" not in model.config_coef_  # calibrate leaves the base untouched


def test_round_trip_and_clone() -> None:
    frame = pd.concat([synthetic(300, np.array([1.2, 0.8, 1.1, 500.0]), k, i)
                       for i, k in enumerate("ab")], ignore_index=True)
    model = PICF(features=FEATURES).fit(frame)
    again = PICF.from_dict(model.to_dict())
    np.testing.assert_allclose(again.predict(frame), model.predict(frame), rtol=1e-12)
    assert clone(model).get_params() == model.get_params()
    unseen = frame.assign(config_key="never-seen")
    global_only = unseen[list(FEATURES)].to_numpy() @ model.coef_
    np.testing.assert_allclose(model.predict(unseen), global_only)
