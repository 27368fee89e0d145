"""Zero-shot intervals widen for configurations far from every donor: the distance on
configuration descriptors, the widening fit on out-of-experiment errors (or its prior),
normalised conformal scores, round trips and calibration."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.models.conformal import (
    SplitConformal,
    config_descriptors,
    descriptor_distance,
    fit_widening,
    novelty,
)
from blis_model.models.linear import linear_predict
from blis_model.models.picf import PICF
from blis_model.models.synthetic import (
    CONFIGS,
    SyntheticConfig,
    synthetic_frame,
    true_coefficients,
)

LLAMA_H100, LLAMA70_TP4, QWEN_MOE_A100, MIXTRAL_TP2, LLAMA_FP8_L40S = CONFIGS
# the real sample's shape: dense models and one MoE model, all H100 TP 1
LLAMA2 = SyntheticConfig("meta-llama/Llama-2-7b-hf", "H100", 1)
CODELLAMA = SyntheticConfig("codellama/CodeLlama-34b-hf", "H100", 1, 4096)
MIXTRAL = SyntheticConfig("mistralai/Mixtral-8x7B-v0.1", "H100", 1)


def descriptors(configs: tuple) -> dict[str, np.ndarray]:
    return config_descriptors(synthetic_frame(10 * len(configs), seed=0, configs=configs))


def test_distance_axes_dtype_gpu_moe_tp() -> None:
    d = descriptors(CONFIGS)
    keys = list(d)
    llama, llama70, qwen, mixtral, fp8 = (d[k] for k in keys)
    assert descriptor_distance(llama, llama) == {"dtype": 0, "gpu": 0, "moe": 0, "tp": 0}
    assert descriptor_distance(llama, llama70) == {"dtype": 0, "gpu": 0, "moe": 0, "tp": 1}
    assert descriptor_distance(llama, mixtral)["moe"] == 1  # dense vs MoE
    assert descriptor_distance(mixtral, qwen)["moe"] == 1  # 8 top-2 vs 128 top-8 experts
    assert descriptor_distance(llama, fp8) == {"dtype": 1, "gpu": 1, "moe": 0, "tp": 0}
    assert descriptor_distance(llama, qwen)["gpu"] == 1
    # the nearest donor decides
    assert novelty(llama70, [mixtral, llama])[0] == 1.0
    assert novelty(fp8, [llama, llama70, mixtral])[0] == 2.0
    assert novelty(llama, [])[0] == 0.0


def test_widening_is_fit_when_novelties_differ_else_the_prior() -> None:
    gamma, how = fit_widening(np.array([0.0, 0.0, 1.0]), np.array([0.1, 0.1, 0.3]),
                              np.ones(3), prior=1.0)
    assert gamma == pytest.approx(2.0) and how.startswith("fit")
    gamma, how = fit_widening(np.array([0.0, 0.0]), np.array([0.1, 0.3]), np.ones(2), 1.0)
    assert gamma == 1.0 and how.startswith("prior")
    gamma, _ = fit_widening(np.array([0.0, 1.0]), np.array([0.2, 0.1]), np.ones(2), 1.0)
    assert gamma == 0.0  # farther never narrows: non-negative


def law(frame: pd.DataFrame, moe_factor: float, seed: int) -> pd.DataFrame:
    """The physics law, MoE layers ``moe_factor`` × slower (what dense donors cannot
    know), 5% Student-t noise."""
    rng = np.random.default_rng(seed)
    beta = true_coefficients(PHYSICS_FEATURES)
    beta[list(PHYSICS_FEATURES).index("moe_layer_overhead")] *= moe_factor
    clean = linear_predict(frame, PHYSICS_FEATURES, beta)
    return frame.assign(duration_us=clean * (1 + np.clip(
        0.05 * rng.standard_t(3, len(frame)), -0.5, 2.0)))


def test_a_configuration_far_from_every_donor_gets_wider_intervals() -> None:
    """Dense donors on one GPU (as the real sample); a MoE model held out. The donors
    cannot estimate the widening (all equally near each other): the prior doubles the
    MoE target's interval (novelty 1), which then covers more of its steps than the
    dense-only intervals (not all: the MoE layers' cost is 8× what the donors' law says,
    more than one doubling)."""
    dense = (LLAMA2, LLAMA_H100, CODELLAMA)
    donors = pd.concat([law(synthetic_frame(900, seed=s, configs=(c,)), 1.0, s)
                        for s, c in enumerate(dense)], ignore_index=True)
    mixtral = law(synthetic_frame(600, seed=7, configs=(MIXTRAL,)), 8.0, 7)
    plain = SplitConformal(PICF(), widen=False).fit(donors)
    wide = SplitConformal(PICF()).fit(donors)
    assert wide.widening_ == 1.0 and wide.widening_source_.startswith("prior")
    key = mixtral["config_key"].iloc[0]
    assert wide.novelty(mixtral)[key]["novelty"] == 1.0  # MoE axis
    lo0, hi0 = plain.interval(mixtral)
    lo1, hi1 = wide.interval(mixtral)
    pred = wide.predict(mixtral)
    np.testing.assert_allclose((hi1 - pred), 2.0 * (hi0 - pred), rtol=1e-9)
    assert wide.coverage(mixtral) > plain.coverage(mixtral) + 0.1
    # a dense donor configuration keeps its interval: novelty 0
    own = donors[donors["config_key"] == donors["config_key"].iloc[0]]
    np.testing.assert_allclose(wide.interval(own)[1], plain.interval(own)[1], rtol=1e-9)
    # calibrated on the MoE target, it is no longer far
    calibrated = wide.calibrate(mixtral.iloc[:200])
    assert calibrated.novelty(mixtral)[key]["novelty"] == 0.0
    # serialised with its widening, donors and held-out configurations
    again = SplitConformal.from_dict(json.loads(json.dumps(wide.to_dict())))
    np.testing.assert_allclose(again.interval(mixtral)[1], hi1, rtol=1e-12)
    assert again.held_out_ == json.loads(json.dumps(wide.held_out_))


def test_widening_is_estimated_from_donors_at_several_novelties() -> None:
    """Donors: two dense models on one GPU and a MoE model whose MoE layers run 3× the
    dense donors' law — its out-of-experiment errors are larger and it is one axis away,
    so γ > 0 is fit from the data; scores are normalised by it."""
    parts = [law(synthetic_frame(900, seed=s, configs=(c,)), f, s)
             for s, (c, f) in enumerate(((LLAMA2, 1.0), (LLAMA_H100, 1.0), (MIXTRAL, 8.0)))]
    donors = pd.concat(parts, ignore_index=True)
    model = SplitConformal(PICF()).fit(donors)
    far = {h["config_key"].split("|")[0]: h["novelty"] for h in model.held_out_}
    assert far == {"meta-llama/llama-2-7b-hf": 0.0, "meta-llama/llama-3.1-8b": 0.0,
                   "mistralai/mixtral-8x7b-v0.1": 1.0}
    spread = {h["config_key"].split("|")[0]: h["mean_abs_score"] for h in model.held_out_}
    assert spread["mistralai/mixtral-8x7b-v0.1"] > 2 * spread["meta-llama/llama-3.1-8b"]
    assert model.widening_source_.startswith("fit") and model.widening_ > 1.0
