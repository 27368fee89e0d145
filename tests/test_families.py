"""The model families: known coefficients recovered from synthetic linear-per-regime data,
failure modes (empty regime, single experiment, collinear features), the scikit-learn
contract, serialisation round trips, the transfer check and conformal coverage."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from blis_model.configuration.architecture import arch_from_hf_config
from blis_model.configuration.hardware import hardware_spec
from blis_model.features.candidates import CANDIDATE_FEATURES, EXTRA_FEATURES
from blis_model.features.context import FeatureContext
from blis_model.features.registry import REGISTRY
from blis_model.models.bsr_ard import BSRARD, transfer_check, z_score_check
from blis_model.models.conformal import SplitConformal
from blis_model.models.hfd_tl import HFDTL, learning_curve
from blis_model.models.hybrid import Hybrid
from blis_model.models.mole_rd import MoLERD, boundary_jumps
from blis_model.models.overlap import Overlap
from blis_model.models.picf import PICF
from blis_model.models.rece import RECE
from blis_model.models.regimes import REGIMES
from blis_model.models.registry import FAMILIES, model_from_dict
from blis_model.models.synthetic import synthetic_frame

FEATURES = ("gemm_compute_us", "weight_read_us", "decode_attention_us", "step_overhead")
NOISE_FEATURES = ("kv_blocks", "queue_waiting")  # candidates the truth does not use
BETA = np.array([1.3, 0.9, 1.6, 2500.0])
# truth per regime (REGIMES order): saturation, kv_pressure, launch, compute, memory
REGIME_BETA = np.array([[1.5, 1.0, 1.6, 3000.0],
                        [1.3, 1.4, 2.2, 2500.0],
                        [1.0, 1.0, 1.0, 1000.0],
                        [1.1, 0.9, 1.6, 2500.0],
                        [1.6, 0.8, 1.3, 2000.0]])


def steps(n: int, key: str, seed: int, *, experiment: str | None = None,
          compute_bound: bool = True) -> pd.DataFrame:
    """Plausible positive features (µs, counts) and the columns the regime rules read."""
    rng = np.random.default_rng(seed)
    gemm_hi = 12000 if compute_bound else 100
    frame = pd.DataFrame({
        "gemm_compute_us": rng.uniform(0, gemm_hi, n),
        "weight_read_us": rng.uniform(1500, 4000, n),
        "decode_attention_us": rng.uniform(0, 8000, n),
        "step_overhead": np.ones(n),
        "kv_blocks": rng.uniform(0, 5000, n),
        "queue_waiting": rng.poisson(1.0, n).astype(float),
        "kv_usage_ratio": rng.uniform(0, 1, n),
        "dc_count": rng.integers(0, 257, n).astype(float),
        "max_num_seqs": 256.0,
        "arch_layers": 16.0,  # launch floor 1000 + 25·16 µs < every GPU time
        "hw_tflops": 989.5,
    })
    frame["config_key"] = key
    frame["experiment"] = experiment or key
    frame["step_id"] = np.arange(n)
    return frame


def label(frame: pd.DataFrame, beta: np.ndarray, seed: int, noise: float = 0.02,
          regimes: np.ndarray | None = None) -> pd.DataFrame:
    """duration = x·β (per regime when ``regimes`` given) · (1 + noise·N(0,1))."""
    rng = np.random.default_rng(seed)
    X = frame[list(FEATURES)].to_numpy()
    coef = beta if regimes is None else REGIME_BETA[regimes]
    clean = (X * coef).sum(axis=1) if coef.ndim == 2 else X @ coef
    return frame.assign(duration_us=clean * (1 + noise * rng.standard_normal(len(frame))))


def donors(n: int = 1500, scales: tuple[float, ...] = (1.0, 1.0)) -> pd.DataFrame:
    return pd.concat([label(steps(n, f"cfg{i}", i), BETA * s, 100 + i)
                      for i, s in enumerate(scales)], ignore_index=True)


def make(family: str) -> object:
    """Each family configured for the small test frames."""
    return {
        "picf": lambda: PICF(features=FEATURES),
        # power 1 (sum of the two experts): the contract tests label data additively
        "overlap": lambda: Overlap(gpu_features=FEATURES[:3], cpu_features=FEATURES[3:],
                                   power=1.0),
        "mole_rd": lambda: MoLERD(features=FEATURES),
        "hfd_tl": lambda: HFDTL(features=FEATURES, residual_features=("step_overhead",)),
        "bsr_ard": lambda: BSRARD(features=FEATURES + NOISE_FEATURES),
        "rece": lambda: RECE(features=FEATURES, quantiles=(0.5, 0.9)),
        "hybrid": lambda: Hybrid(features=FEATURES + NOISE_FEATURES,
                                 residual_features=("step_overhead",), quantiles=(0.5, 0.9)),
    }[family]()


ALL = sorted(FAMILIES)


# -- recovery of known coefficients ----------------------------------------------------
def test_mole_rd_recovers_per_regime_coefficients() -> None:
    frame = steps(12000, "a", 0)
    # the rules that labelled the data (fixed launch floor: nothing is launch-bound)
    model = MoLERD(features=FEATURES, gate_width=0.0, regime_prior_steps=1.0, per_config=False,
                   learn_launch_floor=False)
    frame = label(frame, BETA, 1, regimes=model.regimes(frame))
    model.fit(frame)
    counts = model.regime_steps_
    assert counts["launch_bound"] == 0 and min(counts[r] for r in REGIMES if r != "launch_bound"
                                               ) > 500
    for k, regime in enumerate(REGIMES):
        if regime != "launch_bound":
            np.testing.assert_allclose(model.regime_coef_[k], REGIME_BETA[k], rtol=0.06)
    # the empty regime is exactly the global fit
    np.testing.assert_allclose(model.regime_coef_[REGIMES.index("launch_bound")], model.coef_)


def test_mole_rd_learns_its_launch_floor_from_the_host_cost_it_fits() -> None:
    """Host cost 6 ms per step: steps whose roofline GPU time is below it are routed to the
    launch-bound expert once fitted (the fixed 1.4 ms default floor sees none), the floor
    is stored in the release, and a release without one keeps the fixed rule."""
    frame = steps(3000, "a", 0, compute_bound=False)
    frame = label(frame, np.array([1.0, 1.0, 1.0, 6000.0]), 1)
    fixed = MoLERD(features=FEATURES, learn_launch_floor=False).fit(frame)
    learned = MoLERD(features=FEATURES).fit(frame)
    assert fixed.regime_steps_["launch_bound"] == 0
    assert learned.launch_coef_["step_overhead"] == pytest.approx(6000.0, rel=0.05)
    hard = learned.regimes(frame)
    gpu = np.maximum(frame["gemm_compute_us"],
                     frame[["weight_read_us", "decode_attention_us"]].sum(axis=1))
    expected = (gpu < learned.launch_coef_["step_overhead"]) & (hard >= 2)  # after 2 gates
    assert expected.sum() > 300 and np.array_equal(hard == 2, expected)
    data = learned.to_dict()
    assert data["launch_floor"] == [{"feature": "step_overhead",
                                     "value": learned.launch_coef_["step_overhead"],
                                     "unit": "µs per unit"}]
    np.testing.assert_allclose(model_from_dict(data).predict(frame), learned.predict(frame))
    old = model_from_dict({**data, "launch_floor": []})
    np.testing.assert_array_equal(old.regimes(frame), fixed.regimes(frame))


def test_mole_rd_soft_gating_shrinks_the_boundary_jump() -> None:
    frame = steps(6000, "a", 0)
    hard = MoLERD(features=FEATURES, gate_width=0.0)
    frame = label(frame, BETA, 1, regimes=hard.regimes(frame))
    hard_jump = boundary_jumps(hard.fit(frame), frame)["compute_bound"]
    soft_jump = boundary_jumps(MoLERD(features=FEATURES, gate_width=0.3).fit(frame),
                               frame)["compute_bound"]
    assert hard_jump["steps_near"] > 50
    assert hard_jump["hard_median_pct"] > 3.0  # hard experts really differ at the boundary
    assert soft_jump["soft_median_pct"] < 0.2 * hard_jump["hard_median_pct"]


def test_hfd_tl_recovers_base_and_configuration_terms() -> None:
    a = label(steps(3000, "a", 0), BETA, 1)
    truth_b = BETA * 1.3 + np.array([0, 0, 0, 500.0])
    b = label(steps(3000, "b", 2), truth_b, 3)
    model = HFDTL(features=FEATURES, residual_features=("step_overhead",), ridge=0.0)
    model.fit(pd.concat([a, b], ignore_index=True))
    for key, truth in (("a", BETA), ("b", truth_b)):
        eff = model.effective_coefficients(key)
        np.testing.assert_allclose([eff[n] for n in FEATURES], truth, rtol=0.05)
    gpu_ratio = model.config_scale_["b"][0] / model.config_scale_["a"][0]
    assert gpu_ratio == pytest.approx(1.3, rel=0.05)  # the GPU (corrections) scale group


def test_hfd_tl_calibrates_a_target_from_few_steps() -> None:
    base = HFDTL(features=FEATURES, residual_features=("step_overhead",)).fit(donors())
    target = label(steps(600, "t", 9), BETA * 1.4, 10)
    curve = learning_curve(base, target, sizes=(0, 25, 100))
    assert [r["target_steps"] for r in curve] == [0, 25, 100]
    assert curve[0]["mape"] > 25 and curve[1]["mape"] < 5 and curve[2]["mape"] < 5
    scale_only = HFDTL(features=FEATURES, residual_features=(), scale_groups="single")
    scale_only.fit(donors())
    assert scale_only.calibrate(target.iloc[:25]).config_scale_["t"][0] == pytest.approx(
        1.4, rel=0.03)


def test_bsr_ard_prunes_irrelevant_candidates_and_recovers_the_rest() -> None:
    model = BSRARD(features=FEATURES + NOISE_FEATURES, per_config=False).fit(donors(3000))
    assert model.selected_features == list(FEATURES)
    np.testing.assert_allclose(model.coef_[:4], BETA, rtol=0.03)
    assert (model.coef_[4:] == 0).all()
    mean, std = model.predict(donors(200), return_std=True)
    rel = std / mean
    assert 0.01 < np.median(rel) < 0.04  # the 2% noise, plus a little coefficient doubt


def test_bsr_ard_configuration_update_is_sequential_bayes() -> None:
    """The full-terms candidate is a conjugate update: two halves in a row (the second
    with the first's posterior as its prior) equal the whole at once."""
    base = BSRARD(features=FEATURES, per_config=False).fit(donors())
    target = label(steps(400, "t", 11), BETA * 1.2, 12)
    y = target["duration_us"].to_numpy()
    steps_ = base.config_prior_steps
    reference = base._reference_terms("t", target)
    once = base._terms_fit(target, y, reference, steps_)
    first = base._terms_fit(target.iloc[:200], y[:200], reference, steps_)
    twice = base._terms_fit(target.iloc[200:], y[200:], first, steps_)
    np.testing.assert_allclose(twice[0], once[0], rtol=1e-6)
    np.testing.assert_allclose(twice[1], once[1], rtol=1e-6)
    calibrated = base.calibrate(target)  # a 20% slower target: calibration moves it
    assert calibrated.config_choice_["t"]["choice"] != "none"


def test_rece_recovers_quantile_coefficients_and_specialists() -> None:
    rng = np.random.default_rng(5)
    frames = []
    for key, scale, layers in (("a", 1.0, 32.0), ("b", 1.5, 80.0)):
        f = steps(4000, key, int(layers)).assign(arch_layers=layers)
        eps = rng.uniform(-0.05, 0.05, len(f))  # quantile q of (1 + ε) is 0.95 + 0.1·q
        frames.append(f.assign(duration_us=f[list(FEATURES)].to_numpy() @ (BETA * scale)
                               * (1 + eps)))
    frame = pd.concat(frames, ignore_index=True)
    model = RECE(features=FEATURES, quantiles=(0.5, 0.9, 0.99), global_weight=0.0,
                 n_neighbors=1).fit(frame)
    for key, scale in (("a", 1.0), ("b", 1.5)):
        coefs = model.specialists_[key]
        for i, q in enumerate((0.5, 0.9, 0.99)):
            np.testing.assert_allclose(coefs[i], BETA * scale * (0.95 + 0.1 * q),
                                       rtol=0.03 if q < 0.99 else 0.06)
    # a new configuration whose embedding matches "b" borrows b's specialist
    new = frames[1].assign(config_key="new", experiment="new")
    np.testing.assert_allclose(model.predict(new), model.predict(frames[1]), rtol=1e-9)
    p50, p90 = model.predict_quantile(new, 0.5), model.predict_quantile(new, 0.9)
    assert (p90 >= p50).all()
    with pytest.raises(ValueError):
        model.predict_quantile(new, 0.75)


def test_hybrid_selects_features_and_recovers_configuration_scale() -> None:
    model = Hybrid(features=FEATURES + NOISE_FEATURES, residual_features=("step_overhead",))
    model.fit(donors(2000, scales=(1.0, 1.25)))
    assert not set(NOISE_FEATURES) & set(model.selected_)
    assert (model.coef_[len(FEATURES):] == 0).all()
    ratio = model.config_scale_["cfg1"] / model.config_scale_["cfg0"]
    assert ratio == pytest.approx(1.25, rel=0.03)


# -- transfer check ----------------------------------------------------------------------
def test_transfer_check_flags_the_case_built_to_fail() -> None:
    model = BSRARD(features=FEATURES, per_config=False).fit(donors())
    same = label(steps(60, "t", 20), BETA, 21)
    slower = label(steps(60, "t", 20), BETA * 1.4, 21)  # the target runs 40% slower
    assert transfer_check(model, same).passed
    failed = transfer_check(model, slower)
    assert not failed.passed and "bias" in failed.reason and failed.mean_z > 2
    # heavy tails alone also fail the check
    y = np.ones(100)
    assert not z_score_check(y + np.r_[np.full(15, 5.0), np.zeros(85)], y, np.ones(100)).passed


def test_hybrid_calibration_records_the_check_and_trusts_a_failed_target_more() -> None:
    base = Hybrid(features=FEATURES, residual_features=("step_overhead",)).fit(donors())
    slower = label(steps(40, "t", 30), BETA * 1.5, 31)
    calibrated = base.calibrate(slower)
    assert calibrated.transfer_checks_["t"]["passed"] is False
    strict = Hybrid(features=FEATURES, residual_features=("step_overhead",),
                    failed_prior_factor=1.0).fit(donors()).calibrate(slower)

    def offered(model: Hybrid) -> list[str]:
        return [c["candidate"] for c in model.config_choice_["t"]["candidates"]]

    # the failed check offers weaker priors (× failed_prior_factor) to the CV ...
    assert offered(calibrated) == ["none", "scale", "terms@1.6", "terms@0.4", "terms@0.1"]
    assert offered(strict) == ["none", "scale", "terms@8", "terms@2", "terms@0.5"]
    # ... which, the target being the base × 1.5 exactly, picks one scale of 1.5 anyway
    for model in (calibrated, strict):
        assert model.config_choice_["t"]["choice"] == "scale"
        assert model.config_scale_["t"] == pytest.approx(1.5, rel=0.01)
    assert "t" not in base.config_scale_


# -- conformal ---------------------------------------------------------------------------
def test_conformal_intervals_cover_a_held_out_experiment() -> None:
    rng = np.random.default_rng(7)
    frames = [label(steps(800, f"e{i}", 40 + i), BETA * rng.uniform(0.9, 1.1), 50 + i,
                    noise=0.05) for i in range(5)]
    model = SplitConformal(PICF(features=FEATURES))
    cloned = clone(model).get_params()["estimator"]
    assert cloned.get_params() == PICF(features=FEATURES).get_params()
    model.fit(pd.concat(frames[:4], ignore_index=True))
    coverage = model.coverage(frames[4], alpha=0.1)
    assert 0.8 <= coverage <= 0.99
    lo, hi = model.interval(frames[4], alpha=0.5)
    lo90, hi90 = model.interval(frames[4], alpha=0.1)
    assert (lo90 <= lo).all() and (hi <= hi90).all()
    again = SplitConformal.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_allclose(again.interval(frames[4])[1], model.interval(frames[4])[1])


def test_conformal_with_one_experiment_and_empty_regimes_uses_pooled_scores() -> None:
    frame = label(steps(500, "a", 3, compute_bound=False), BETA, 4)
    model = SplitConformal(PICF(features=FEATURES), min_regime_steps=30).fit(frame)
    assert model.regime_scores_["compute_bound"]["n"] == 0
    assert model.score_bounds("compute_bound", 0.1) == model.score_bounds("launch_bound", 0.1)
    assert 0.7 <= model.coverage(frame) <= 1.0


# -- contract and failure modes, every family -------------------------------------------
@pytest.mark.parametrize("family", ALL)
def test_contract_clone_and_round_trip(family: str) -> None:
    frame = donors(400, scales=(1.0, 1.2))
    model = make(family)
    params = model.get_params()
    assert clone(model).get_params() == params
    model.fit(frame)
    assert model.get_params() == params  # fit leaves the parameters alone
    before = json.dumps(model.to_dict(), allow_nan=False)
    pred = model.predict(frame)
    assert json.dumps(model.to_dict(), allow_nan=False) == before  # predict mutates nothing
    again = model_from_dict(json.loads(before))
    np.testing.assert_allclose(again.predict(frame), pred, rtol=1e-9)
    calibrated = model.calibrate(label(steps(50, "t", 60), BETA * 1.2, 61))
    text = json.dumps(calibrated.to_dict(), allow_nan=False)
    unseen = label(steps(30, "t", 62), BETA * 1.2, 63)
    np.testing.assert_allclose(model_from_dict(json.loads(text)).predict(unseen),
                               calibrated.predict(unseen), rtol=1e-9)
    assert "\"t\"" not in json.dumps(model.to_dict())  # calibrate returned a new model
    assert np.mean(np.abs(pred / frame["duration_us"] - 1)) < 0.05


@pytest.mark.parametrize("family", ALL)
def test_single_experiment_and_unseen_configuration(family: str) -> None:
    frame = label(steps(300, "only", 70), BETA, 71)
    model = make(family).fit(frame)
    unseen = label(steps(50, "never-seen", 72), BETA, 73)
    pred = model.predict(unseen)
    assert np.isfinite(pred).all() and (pred > 0).all()
    assert np.mean(np.abs(pred / unseen["duration_us"] - 1)) < 0.1


@pytest.mark.parametrize("family", ALL)
def test_collinear_and_all_zero_features(family: str) -> None:
    frame = donors(400)
    frame["decode_attention_us"] = 2.0 * frame["gemm_compute_us"]  # exactly collinear
    frame["kv_blocks"] = 0.0  # an all-zero candidate (an empty regime of the data)
    frame = label(frame, BETA, 80)
    model = make(family).fit(frame)
    pred = model.predict(frame)
    assert np.isfinite(pred).all()
    assert np.mean(np.abs(pred / frame["duration_us"] - 1)) < 0.05
    coefs = json.dumps(model.to_dict(), allow_nan=False)
    assert '"value": -' not in coefs  # every native coefficient stays non-negative


@pytest.mark.parametrize("family", ALL)
def test_empty_frame_is_an_error(family: str) -> None:
    with pytest.raises(ValueError):
        make(family).fit(donors(10).iloc[:0])


def test_empty_regime_falls_back_to_the_global_fit() -> None:
    frame = label(steps(3000, "a", 90, compute_bound=False), BETA, 91)
    model = MoLERD(features=FEATURES).fit(frame)
    k = REGIMES.index("compute_bound")
    assert model.regime_steps_["compute_bound"] == 0
    np.testing.assert_allclose(model.regime_coef_[k], model.coef_, rtol=1e-3)
    compute_step = label(steps(20, "a", 92), BETA, 93).assign(gemm_compute_us=50000.0)
    assert np.isfinite(model.predict(compute_step)).all()


# -- candidate features and the synthetic generator -----------------------------------
def test_candidate_features_are_registered_with_units_and_stay_non_negative() -> None:
    assert len(CANDIDATE_FEATURES) >= 18 and len(EXTRA_FEATURES) >= 18
    for name in ("tp_comm_us", "cpu_offload_us", "moe_dispatch_us", "kv_pressure",
                 "preemptions", "queue_waiting"):
        assert name in CANDIDATE_FEATURES
    for name in CANDIDATE_FEATURES:
        assert REGISTRY[name].unit and REGISTRY[name].description
    frame = synthetic_frame(1000, seed=3)
    values = frame[list(CANDIDATE_FEATURES)].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all()
    tp = frame[frame["tp"] > 1]
    assert (tp["tp_comm_us"] > 0).any() and (frame.loc[frame["tp"] == 1, "tp_comm_us"] == 0).all()
    assert ((frame["moe_dispatch_us"] > 0) == (frame["arch_experts"] > 0)).all()


def test_tp_communication_by_hand() -> None:
    cfg = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256}
    ctx = FeatureContext(arch_from_hf_config(cfg, "m"), hardware_spec("H100"), 2)
    cols = {"pf_tokens": np.array([96.0]), "dc_count": np.array([4.0])}
    expected = 2 * 32 * (2 - 1) * 100 * 4096 * 2 / 450e3  # (TP−1)·tokens·d·2 B per exchange
    assert REGISTRY["tp_comm_us"].fn(cols, ctx)[0] == pytest.approx(expected)
