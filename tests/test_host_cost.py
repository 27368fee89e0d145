"""Host cost as a machine-level quantity (``models.config_terms``: the ``host`` candidate
and machine host factors), for the families with a host part (PICF, OVERLAP, HFD-TL,
BSR-ARD): a configuration whose host terms differ from the base's is calibrated by ONE
factor on them; a configuration never seen on a machine with calibrated configurations
predicts with that machine's factor on the global host part; the factors round-trip."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.metrics import summary
from blis_model.models import config_terms
from blis_model.models.config_terms import (
    host_factor,
    machine_host_factors,
    machine_of,
    record_host_effect,
)
from blis_model.models.conformal import SplitConformal
from blis_model.models.registry import FAMILIES, make_model, model_from_dict
from blis_model.models.synthetic import CONFIGS, SyntheticConfig, synthetic_frame

HOST_FAMILIES = ("picf", "overlap", "hfd_tl", "bsr_ard")
OTHER_FAMILIES = tuple(sorted(set(FAMILIES) - set(HOST_FAMILIES)))
CAL_STEPS = 150
NOISE = 0.02
H200_A = SyntheticConfig("meta-llama/Llama-3.1-8B", "H200", 1)
H200_B = SyntheticConfig("Qwen/Qwen2.5-7B-Instruct", "H200", 1, 16384, 512)
L40S_C = CONFIGS[4]  # a machine with nothing calibrated on it


def mape(pred: np.ndarray, frame: pd.DataFrame) -> float:
    return summary(pred, frame["duration_us"].to_numpy())["mape"]


@pytest.fixture(scope="module")
def donors() -> pd.DataFrame:
    return synthetic_frame(2400, seed=1, configs=CONFIGS[:4], features=PHYSICS_FEATURES)


@pytest.fixture(scope="module")
def bases(donors: pd.DataFrame) -> dict[str, object]:
    return {f: make_model(f).fit(donors) for f in HOST_FAMILIES}


def parts(model: object, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(device µs, host µs) of the model's global terms on ``X``."""
    return model._terms_host_split(X, model._global_terms())  # type: ignore[attr-defined]


def combined(model: object, device: np.ndarray, host: np.ndarray) -> np.ndarray:
    combine = config_terms.host_combine(model)
    return device + host if combine is None else combine(device, host)


def steps_of(cfg: SyntheticConfig, n: int = 900, seed: int = 7) -> pd.DataFrame:
    frame = synthetic_frame(n, seed=seed, configs=[cfg], features=PHYSICS_FEATURES)
    return frame.sort_values("step_id").reset_index(drop=True)


def relabel(model: object, frame: pd.DataFrame, host: float = 1.0, device: float = 1.0,
            seed: int = 3) -> pd.DataFrame:
    """Durations of the model's own global law with its device part × ``device`` and its
    host part × ``host`` (Gaussian relative noise :data:`NOISE`)."""
    d, c = parts(model, frame)
    rng = np.random.default_rng(seed)
    clean = combined(model, device * d, host * c)
    return frame.assign(duration_us=clean * (1.0 + NOISE * rng.standard_normal(len(frame))))


# -- the host candidate -----------------------------------------------------------------
@pytest.mark.parametrize("family", HOST_FAMILIES)
def test_host_twice_the_base_chooses_one_host_factor_of_two(family: str, bases: dict) -> None:
    base = bases[family]
    frame = relabel(base, steps_of(CONFIGS[4]), host=2.0)
    key = frame["config_key"].iloc[0]
    cal, rest = frame.iloc[:CAL_STEPS], frame.iloc[CAL_STEPS:]
    calibrated = base.calibrate(cal)
    rec = calibrated.config_choice_[key]
    assert [c["candidate"] for c in rec["candidates"]][:3] == ["none", "host", "scale"]
    assert rec["choice"] == "host", rec["reason"]
    assert rec["host_factor"] == pytest.approx(2.0, rel=0.05)
    assert rec["host_effect"] == pytest.approx(rec["host_factor"], rel=1e-6)
    before, after = mape(base.predict(rest), rest), mape(calibrated.predict(rest), rest)
    assert after < before
    assert after < 2.0 * NOISE * 100  # the noise floor (MAPE of 2% Gaussian noise: 1.6%)
    cv = {c["candidate"]: c["cv_rmsre_pct"] for c in rec["candidates"]}
    assert cv["host"] < cv["scale"] < cv["none"]
    # the device part is the base's: only the host terms moved
    d, c = parts(base, rest)
    np.testing.assert_allclose(calibrated.predict(rest),
                               combined(base, d, rec["host_factor"] * c), rtol=1e-9)


@pytest.mark.parametrize("family", HOST_FAMILIES)
def test_a_device_difference_is_not_taken_for_host_cost(family: str, bases: dict) -> None:
    base = bases[family]
    frame = relabel(base, steps_of(CONFIGS[4]), device=1.5)
    key = frame["config_key"].iloc[0]
    calibrated = base.calibrate(frame.iloc[:CAL_STEPS])
    rec = calibrated.config_choice_[key]
    assert rec["choice"] == "scale" or rec["choice"].startswith("terms@"), rec["reason"]
    rest = frame.iloc[CAL_STEPS:]
    assert mape(calibrated.predict(rest), rest) < mape(base.predict(rest), rest)


def test_host_factor_closed_form_and_bounded_minimisation_agree() -> None:
    rng = np.random.default_rng(0)
    device, host = rng.uniform(100, 1000, 500), rng.uniform(50, 400, 500)
    y = (device + 1.7 * host) * (1 + 0.01 * rng.standard_normal(500))
    closed = host_factor(device, host, y)
    searched = host_factor(device, host, y, combine=lambda d, c: d + c)
    assert closed == pytest.approx(1.7, rel=0.01)
    assert searched == pytest.approx(closed, rel=1e-6)
    assert host_factor(device, host, device + 9.0 * host) == pytest.approx(4.0)  # κ bound
    assert host_factor(device, np.zeros(500), y) == 1.0  # no host time: nothing to learn


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_families_without_a_host_part_have_no_host_candidate(family: str) -> None:
    model = make_model(family).fit(synthetic_frame(600, seed=2, configs=CONFIGS[:2]))
    block = model.to_dict()["calibration"]
    assert "host" not in block["method"]["candidates"]
    assert "machine_host_factors" not in block
    assert all("host" not in [c["candidate"] for c in r["candidates"]]
               for r in block["per_config"].values())


# -- machine host factors ----------------------------------------------------------------
def test_machine_of_a_configuration_is_its_gpu_field() -> None:
    assert machine_of("meta-llama/llama-3.1-8b|H200|tp1|bf16|mnbt8192|mns256") == "H200"
    assert machine_of("t") is None and machine_of(None) is None


def test_machine_factor_is_the_median_effect_unless_the_scatter_explains_it() -> None:
    def rec(choice: str, **extra: float) -> dict:
        return {"choice": choice, "folds": 5, **extra}

    records = {"a|M|1": rec("host", host_factor=1.6, host_effect=1.6),
               "b|M|1": rec("terms@50", host_effect=1.8),
               "c|N|1": rec("none", host_effect=1.0), "d|N|1": rec("scale", scale=1.1),
               "e|N|1": rec("terms@50", host_effect=0.93),
               "f|N|1": {"choice": "none", "folds": 0},  # too few steps: no evidence
               "g|N|1": rec("terms@50")}  # an old record: host effect unknown
    assert record_host_effect(records["d|N|1"]) == 1.1
    assert record_host_effect(records["f|N|1"]) is None
    assert record_host_effect(records["g|N|1"]) is None
    factors = machine_host_factors(records)
    assert factors["M"]["median"] == pytest.approx(1.7)
    assert factors["M"]["factor"] == pytest.approx(1.7)  # far beyond the scatter
    assert set(factors["N"]["configurations"]) == {"c|N|1", "d|N|1", "e|N|1"}
    assert factors["N"]["median"] == pytest.approx(1.0)
    assert factors["N"]["factor"] == 1.0
    near = {k: v for k, v in records.items() if k.startswith(("c", "e"))}
    near["e|N|1"] = rec("terms@50", host_effect=0.9)
    near["h|N|1"] = rec("scale", scale=0.99)
    assert machine_host_factors(near)["N"]["median"] == pytest.approx(0.99)
    assert machine_host_factors(near)["N"]["factor"] == 1.0  # within one standard error


def test_one_machine_of_pooled_data_changes_nothing(donors: pd.DataFrame) -> None:
    """Every configuration of the pooled data on one machine: its factor is 1 and a
    configuration never seen there predicts with the global set."""
    h100 = synthetic_frame(2400, seed=4, configs=[c for c in CONFIGS if c.gpu == "H100"],
                           features=PHYSICS_FEATURES)
    model = make_model("picf").fit(h100)
    assert model.machine_host_["H100"]["factor"] == 1.0
    unseen = steps_of(SyntheticConfig("Qwen/Qwen2.5-7B-Instruct", "H100", 1), n=50)
    np.testing.assert_array_equal(model.predict(unseen), model._predict_with(unseen,
                                                                             model.coef_))


@pytest.fixture(scope="module")
def h200_calibrated(bases: dict) -> dict[str, tuple[object, float]]:
    """Per family: the base calibrated on configuration A of H200 whose host terms are
    1.6× the base's, and A's host effect."""
    out = {}
    for family, base in bases.items():
        frame = relabel(base, steps_of(H200_A, n=400, seed=11), host=1.6, seed=12)
        calibrated = base.calibrate(frame)
        out[family] = calibrated, calibrated.config_choice_[frame["config_key"].iloc[0]]
    return out


@pytest.mark.parametrize("family", HOST_FAMILIES)
def test_an_unseen_configuration_on_a_calibrated_machine_takes_its_host_factor(
        family: str, bases: dict, h200_calibrated: dict) -> None:
    base = bases[family]
    calibrated, rec_a = h200_calibrated[family]
    assert rec_a["host_effect"] == pytest.approx(1.6, rel=0.05)
    factor = calibrated.machine_host_["H200"]["factor"]
    assert factor == pytest.approx(rec_a["host_effect"], rel=1e-12)
    assert "H200" not in base.machine_host_
    b = steps_of(H200_B, n=60, seed=13)
    key_b = b["config_key"].iloc[0]
    assert calibrated.machine_factor_for(key_b) == factor
    d, c = parts(base, b)
    np.testing.assert_allclose(calibrated.predict(b), combined(base, d, factor * c),
                               rtol=1e-9)
    np.testing.assert_allclose(base.predict(b), combined(base, d, c), rtol=1e-9)
    # another machine, nothing calibrated on it: unchanged
    other = steps_of(L40S_C, n=60, seed=14)
    np.testing.assert_array_equal(calibrated.predict(other), base.predict(other))


@pytest.mark.parametrize("family", HOST_FAMILIES)
def test_calibrating_on_the_machine_starts_from_its_factor(family: str, bases: dict,
                                                           h200_calibrated: dict) -> None:
    """B's reference is the machine-scaled global set (its zero-shot): calibrating B on
    steps of that law keeps it — stored, so B predicts as before whatever the machine's
    factor becomes — and is never worse than the zero-shot prediction on later steps."""
    calibrated, _ = h200_calibrated[family]
    factor = calibrated.machine_host_["H200"]["factor"]
    frame = relabel(bases[family], steps_of(H200_B, n=600, seed=15), host=factor, seed=16)
    key = frame["config_key"].iloc[0]
    cal, rest = frame.iloc[:CAL_STEPS], frame.iloc[CAL_STEPS:]
    again = calibrated.calibrate(cal)
    rec = again.config_choice_[key]
    assert rec["machine_host_factor"] == factor
    assert mape(again.predict(rest), rest) <= mape(calibrated.predict(rest), rest) + 0.1
    if rec["choice"] == "none":
        np.testing.assert_allclose(again.predict(rest), calibrated.predict(rest), rtol=1e-12)
        assert rec["host_effect"] == pytest.approx(factor, rel=1e-9)


@pytest.mark.parametrize("family", HOST_FAMILIES)
def test_machine_factors_round_trip_and_older_releases_load_without_them(
        family: str, bases: dict, h200_calibrated: dict) -> None:
    calibrated, _ = h200_calibrated[family]
    data = json.loads(json.dumps(calibrated.to_dict(), allow_nan=False))
    block = data["calibration"]
    assert "host" in block["method"]["candidates"] and block["host_terms"]
    assert block["machine_host_factors"]["H200"]["factor"] == \
        calibrated.machine_host_["H200"]["factor"]
    again = model_from_dict(data)
    assert again.machine_host_ == calibrated.machine_host_
    b = steps_of(H200_B, n=60, seed=13)
    np.testing.assert_allclose(again.predict(b), calibrated.predict(b), rtol=1e-12)
    del block["machine_host_factors"]  # a release made before machine factors
    old = model_from_dict(data)
    assert old.machine_host_ == {}
    np.testing.assert_allclose(old.predict(b), bases[family].predict(b), rtol=1e-12)


def test_a_machine_factor_does_not_narrow_the_zero_shot_interval(donors: pd.DataFrame) -> None:
    """Conformal intervals of a configuration never seen on a calibrated machine: the
    prediction carries the factor, the relative width (novelty, scores) is the one
    without it — the ``gpu`` axis still compares descriptors with the nearest donor."""
    conformal = SplitConformal(make_model("picf")).fit(donors)
    a = relabel(conformal.estimator_, steps_of(H200_A, n=400, seed=11), host=1.6, seed=12)
    calibrated = conformal.calibrate(a)
    assert calibrated.estimator_.machine_host_["H200"]["factor"] != 1.0
    b = steps_of(H200_B, n=200, seed=13)
    plain = copy.deepcopy(calibrated)
    plain.estimator_.machine_host_ = {}
    (lo, hi), (plo, phi) = calibrated.interval(b), plain.interval(b)
    assert not np.allclose(calibrated.predict(b), plain.predict(b))
    np.testing.assert_allclose((hi - lo) / calibrated.predict(b), (phi - plo) / plain.predict(b),
                               rtol=1e-9)
    key = b["config_key"].iloc[0]
    assert calibrated.novelty(b)[key] == plain.novelty(b)[key]
