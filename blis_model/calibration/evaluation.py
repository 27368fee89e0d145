"""How accurate a family is, measured the way it is used: fit it, then score it in-sample,
on a temporal holdout (later steps of the same experiments) and leave one experiment out
(zero-shot: its configuration unseen). The numbers a release, a benchmark and the
family selection report all come from these functions and the splits of
``features.frame`` (``temporal_split``, ``loo_split``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from blis_model.configuration.defaults import TRAIN_FRACTION
from blis_model.features.frame import loo_split, temporal_split
from blis_model.metrics import per_experiment, summary
from blis_model.models.base import StepTimeModel
from blis_model.models.registry import DEFAULT_FAMILY, make_model


def fit_model(frame: pd.DataFrame, family: str = DEFAULT_FAMILY,
              base: StepTimeModel | None = None, **params: Any) -> StepTimeModel:
    """Fit ``family`` on ``frame``; with ``base``, calibrate the base on ``frame`` instead."""
    if base is not None:
        return base.calibrate(frame)
    return make_model(family, **params).fit(frame)


def leave_one_experiment_out(frame: pd.DataFrame, family: str = DEFAULT_FAMILY,
                             **params: Any) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy: for each experiment, fit on the others (its configuration
    unseen) and predict it. Needs ≥ 2 experiments; returns {} otherwise."""
    names = sorted(frame["experiment"].unique())
    if len(names) < 2:
        return {}
    out = {}
    for name in names:
        fold = leave_one_out_fold(frame, name, family, **params)
        if fold is not None:
            out[name] = fold
    return out


def leave_one_out_fold(frame: pd.DataFrame, name: str, family: str = DEFAULT_FAMILY,
                       **params: Any) -> dict[str, float] | None:
    """One fold of :func:`leave_one_experiment_out`: fit on the experiments whose
    configuration differs from ``name``'s (``features.frame.loo_split``), predict
    ``name``. None when nothing is left to train on."""
    train, test = loo_split(frame, name)
    if train.empty:
        return None
    model = make_model(family, **params).fit(train)
    return summary(model.predict(test), test["duration_us"].to_numpy())


def temporal_holdout(frame: pd.DataFrame, family: str = DEFAULT_FAMILY,
                     train_fraction: float = TRAIN_FRACTION, **params: Any
                     ) -> dict[str, dict[str, float]]:
    """Within-experiment accuracy: fit on the first ``train_fraction`` of every
    experiment's steps (by step id), predict the rest."""
    train, test = temporal_split(frame, train_fraction)
    if train.empty or test.empty:
        return {}
    model = make_model(family, **params).fit(train)
    return per_experiment(test, model.predict(test))


def mean_metric(results: dict[str, dict[str, float]], key: str = "mape") -> float:
    values = [r[key] for r in results.values() if r.get("n")]
    return float(np.mean(values)) if values else float("nan")


def evaluate(frame: pd.DataFrame, model: StepTimeModel, family: str = DEFAULT_FAMILY, *,
             loo: dict[str, dict[str, float]] | None = None,
             temporal: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """The accuracy report stored in a release: in-sample, temporal and LOO per experiment,
    and how each configuration's terms were chosen (:func:`calibration_report`).
    ``loo``/``temporal`` are computed here unless given (the flow runs them as tasks)."""
    in_sample = per_experiment(frame, model.predict(frame))
    loo = leave_one_experiment_out(frame, family) if loo is None else loo
    temporal = temporal_holdout(frame, family) if temporal is None else temporal
    out = {
        "in_sample": in_sample,
        "temporal_holdout": temporal,
        "leave_one_experiment_out": loo,
        "summary": {"in_sample_mape": mean_metric(in_sample),
                    "temporal_mape": mean_metric(temporal),
                    "loo_mape": mean_metric(loo), "loo_median_ape": mean_metric(loo, "median_ape"),
                    "steps": int(len(frame))},
    }
    report = calibration_report(model)
    if report is not None:
        out["calibration"] = report
    return out


def calibration_report(model: StepTimeModel) -> dict[str, Any] | None:
    """How the release chose each configuration's terms (``models.config_terms``), for
    the manifest (``metrics.calibration``): the method, and per configuration the choice
    (none / host / scale / terms@λ), why, every candidate's time-ordered CV error (RMS
    relative error, %), the host factor, scale or prior strength, the host effect (host
    share of its steps over the global terms'), and which terms moved and which sit at a
    bound of their physical range; for a family with a host part, the machine host
    factors (per machine: the factor a configuration never seen there predicts with).
    None for a model without per-configuration terms."""
    block = model.to_dict().get("calibration")
    if not block:
        return None
    per = {}
    for key, rec in sorted((block.get("per_config") or {}).items()):
        moved = rec.get("moved") or []
        per[key] = {"choice": rec["choice"], "reason": rec["reason"], "steps": rec["steps"],
                    "folds": rec["folds"],
                    "cv_rmsre_pct": {c["candidate"]: c["cv_rmsre_pct"]
                                     for c in rec.get("candidates", [])},
                    **({"scale": rec["scale"]} if "scale" in rec else {}),
                    **({k: rec[k] for k in ("host_factor", "host_effect",
                                            "machine_host_factor") if k in rec}),
                    **({"prior_steps": rec["prior_steps"]} if "prior_steps" in rec else {}),
                    "terms_moved": len(moved),
                    "at_bound": [f"{m['term']} ({m['at_bound']})" for m in moved
                                 if m.get("at_bound")]}
    counts: dict[str, int] = {}
    for rec in per.values():
        kind = rec["choice"].split("@")[0]
        counts[kind] = counts.get(kind, 0) + 1
    out = {"method": block.get("method", {}), "choices": counts, "per_config": per}
    if "machine_host_factors" in block:
        out["host_terms"] = block.get("host_terms", [])
        out["machine_host_factors"] = {m: {k: v for k, v in entry.items()
                                           if k != "configurations"}
                                       | {"configurations": len(entry.get("configurations", {}))}
                                       for m, entry in block["machine_host_factors"].items()}
    return out


LEARNING_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


def learning_curve(frame: pd.DataFrame, family: str,
                   fractions: Sequence[float] = LEARNING_FRACTIONS,
                   base: StepTimeModel | None = None) -> list[dict[str, float]]:
    """Temporal-holdout MAPE (%) when training on the first ``f`` of each experiment's
    temporal train part, for each ``f``; scored on the held-out later steps. With
    ``base`` the curve is that of calibrating ``base`` (what a ``--base`` release does),
    else of fitting ``family`` afresh. Costs one fit per fraction: the calibration recipe
    runs it once per release, never the release builder."""
    train, test = temporal_split(frame)
    points = []
    truth = test["duration_us"].to_numpy(dtype=np.float64)
    for f in fractions:
        parts = [g.sort_values("step_id").iloc[: max(1, int(round(f * len(g))))]
                 for _, g in train.groupby("experiment", sort=True)]
        part = pd.concat(parts, ignore_index=True)
        model = fit_model(part, family, base=base)
        result = summary(np.asarray(model.predict(test), dtype=np.float64), truth)
        points.append({"fraction": float(f), "train_steps": int(len(part)),
                       "mape": result["mape"], "median_ape": result["median_ape"]})
    return points
