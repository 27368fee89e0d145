"""Request-level accuracy (TTFT, ITL, E2E), teacher-forced on the observed schedule.

Steps run one after another, so a request's engine time is the sum of the durations of
the steps from its SCHEDULED step to its FIRST_TOKEN / FINISHED step — including steps it
sat out while preempted. Given a predicted duration for every step (traced or not: the
composition of untraced steps comes from ``ingest.reconstruct``), per request:

* TTFT = α0(prompt) + observed queue wait (queued → scheduled) + Σ predicted steps
  [scheduled .. first token];
* ITL (mean per request) = Σ predicted steps (first token .. finished] / (outputs − 1),
  engine side (α2 is not added: it is a post-decode cost);
* E2E = α0 + wait + Σ predicted steps [scheduled .. finished] + α1 + α2·outputs.

Observed values come from the same request table (µs). Prefix sums make it O(S + N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from blis_model.configuration.defaults import TRAIN_FRACTION
from blis_model.configuration.experiment import Experiment
from blis_model.features.frame import feature_frame
from blis_model.ingest.reader import read_tables
from blis_model.ingest.reconstruct import ReconstructionReport, fill_compositions, reconstruct_steps
from blis_model.ingest.requests import RequestValidation, validate_requests
from blis_model.ingest.steps import COMPOSITION_COLUMNS, STEP_SCHEMA
from blis_model.metrics import summary
from blis_model.models.base import StepTimeModel
from blis_model.models.registry import make_model
from blis_model.requests.alphas import AlphaFit, fit_alphas

METRICS = ("ttft", "itl", "e2e")


def _lookup(sorted_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, found) of each ``query`` id in ``sorted_ids``."""
    if not len(sorted_ids):
        return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, query), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == query


def full_step_table(steps: pa.Table, rebuilt: pa.Table, experiment: str) -> pa.Table:
    """A STEP_SCHEMA table with a row for every step of ``steps`` and ``rebuilt``: traced
    rows keep their columns (``summary`` compositions replaced by the rebuilt ones);
    untraced rows get the rebuilt composition, batch counts derived from it,
    ``duration_us`` NaN and ``composition = "journey"``."""
    traced_ids = steps.column("step_id").to_numpy()
    rebuilt_ids = rebuilt.column("step_id").to_numpy()
    ids = np.union1d(traced_ids, rebuilt_ids)
    n = len(ids)
    pos_t, traced = _lookup(traced_ids, ids)
    pos_r, known = _lookup(rebuilt_ids, ids)
    is_snapshot = pc.fill_null(pc.equal(steps.column("composition"), "snapshot"), False)
    snapshot = traced.copy()
    snapshot[traced] = np.asarray(is_snapshot.to_numpy(zero_copy_only=False), bool
                                  )[pos_t[traced]]
    composition = {}
    for c in COMPOSITION_COLUMNS:
        values = np.zeros(n)
        values[known] = rebuilt.column(c).to_numpy()[pos_r[known]]
        values[snapshot] = steps.column(c).to_numpy()[pos_t[snapshot]]
        composition[c] = values
    derived = {"num_prefill_reqs": composition["pf_count"],
               "num_decode_reqs": composition["dc_count"],
               "prefill_tokens": composition["pf_tokens"],
               "decode_tokens": composition["dc_count"],
               "running_depth": composition["pf_count"] + composition["dc_count"]}
    arrays: dict[str, Any] = {"experiment": pa.repeat(pa.scalar(experiment, pa.string()), n),
                              "step_id": pa.array(ids, pa.int64())}
    for f in STEP_SCHEMA:
        if f.name in arrays or f.name in composition or f.name == "composition":
            continue
        values = (np.full(n, np.nan) if f.name == "duration_us"
                  else np.array(derived.get(f.name, np.zeros(n)), np.float64))
        values[traced] = steps.column(f.name).to_numpy()[pos_t[traced]]
        arrays[f.name] = pa.array(values, pa.float64())
    for c, values in composition.items():
        arrays[c] = pa.array(values, pa.float64())
    arrays["composition"] = pc.if_else(snapshot, "snapshot", "journey")
    return pa.table(arrays, schema=STEP_SCHEMA)


def teacher_forced(requests: pa.Table | pd.DataFrame, step_ids: np.ndarray,
                   predicted_us: np.ndarray, alphas: AlphaFit) -> pd.DataFrame:
    """Observed and predicted TTFT / ITL / E2E (µs) per request with a complete lifecycle
    whose steps all have a prediction. ``step_ids`` sorted; ``predicted_us`` aligned."""
    frame = requests.to_pandas() if isinstance(requests, pa.Table) else requests
    ids = np.asarray(step_ids, np.int64)
    pred = np.asarray(predicted_us, np.float64)
    need = ["arrival_ns", "queued_ns", "scheduled_ns", "first_token_ns", "finished_ns",
            "departed_ns", "scheduled_step", "first_token_step", "finished_step",
            "prompt_tokens", "output_tokens"]
    frame = frame.dropna(subset=need)
    if frame.empty or not len(ids):
        return pd.DataFrame(columns=["experiment", "request_id", "scheduled_step"]
                            + [f"{m}_{k}_us" for m in METRICS for k in ("obs", "pred")])
    contiguous = len(ids) == ids[-1] - ids[0] + 1 and np.isfinite(pred).all()
    if not contiguous:
        raise ValueError("predicted_us must cover a contiguous range of step ids without NaN")
    cum = np.concatenate([[0.0], np.cumsum(pred)])

    def steps_sum(first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Σ predicted durations over steps first..last (inclusive); NaN outside range."""
        lo, hi = first - ids[0], last - ids[0]
        ok = (lo >= 0) & (hi < len(ids)) & (hi >= lo - 1)
        out = np.full(len(first), np.nan)
        out[ok] = cum[hi[ok] + 1] - cum[lo[ok]]
        return out

    s0 = frame["scheduled_step"].to_numpy(np.int64)
    f = frame["first_token_step"].to_numpy(np.int64)
    e = frame["finished_step"].to_numpy(np.int64)
    out_tok = frame["output_tokens"].to_numpy(np.float64)
    wait_us = (frame["scheduled_ns"] - frame["queued_ns"]).to_numpy(np.float64) / 1e3
    pre_us = alphas.predict_pre_queue_us(frame["prompt_tokens"].to_numpy(np.float64))
    post_us = alphas.predict_post_finish_us(out_tok)
    arrival = frame["arrival_ns"].to_numpy(np.float64)
    decodes = np.where(out_tok > 1, out_tok - 1, np.nan)
    result = pd.DataFrame({
        "experiment": frame["experiment"].to_numpy(),
        "request_id": frame["request_id"].to_numpy(),
        "scheduled_step": s0,
        "ttft_obs_us": (frame["first_token_ns"].to_numpy(np.float64) - arrival) / 1e3,
        "ttft_pred_us": pre_us + wait_us + steps_sum(s0, f),
        "itl_obs_us": (frame["finished_ns"] - frame["first_token_ns"]).to_numpy(np.float64)
        / 1e3 / decodes,
        "itl_pred_us": steps_sum(f + 1, e) / decodes,
        "e2e_obs_us": (frame["departed_ns"].to_numpy(np.float64) - arrival) / 1e3,
        "e2e_pred_us": pre_us + wait_us + steps_sum(s0, e) + post_us,
    })
    return result.reset_index(drop=True)


def request_accuracy(per_request: pd.DataFrame, min_step: int | None = None
                     ) -> dict[str, dict[str, float]]:
    """MAPE / median / p90 APE (%) and count of each metric, over requests scheduled at or
    after ``min_step`` (a temporal holdout) with a positive observation."""
    rows = per_request if min_step is None else per_request[
        per_request["scheduled_step"] >= min_step]
    out = {}
    for m in METRICS:
        obs, pred = rows[f"{m}_obs_us"].to_numpy(), rows[f"{m}_pred_us"].to_numpy()
        keep = np.isfinite(obs) & np.isfinite(pred) & (obs > 0)
        out[m] = summary(pred[keep], obs[keep])
    return out


def request_accuracy_per_experiment(per_request: pd.DataFrame,
                                    min_step: dict[str, int] | None = None
                                    ) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`request_accuracy` per experiment; ``min_step`` maps experiment → the first
    step of its holdout (experiments not in it are evaluated on all requests)."""
    min_step = min_step or {}
    return {str(name): request_accuracy(group, min_step.get(str(name)))
            for name, group in per_request.groupby("experiment", sort=True)}


# -- from an experiment to request-level accuracy -------------------------------------
@dataclass(frozen=True)
class RequestData:
    """Everything request-level about one experiment: traced steps (``summary`` rows
    filled from journeys), the request table and its validation, and every step's
    composition (``full_steps``, untraced steps rebuilt from journeys)."""

    experiment: Experiment
    steps: pa.Table
    requests: pa.Table
    full_steps: pa.Table
    validation: RequestValidation
    reconstruction: ReconstructionReport


def load_request_data(experiment: Experiment, options: dict | None = None) -> RequestData:
    """Read steps and requests of ``experiment`` (one pass) and rebuild every step's batch."""
    steps, _, requests = read_tables(experiment, options)
    mnbt = experiment.server.max_num_batched_tokens
    rebuilt, report = reconstruct_steps(requests, mnbt, block_size=experiment.server.block_size)
    steps = fill_compositions(steps, rebuilt)
    return RequestData(experiment, steps, requests,
                       full_step_table(steps, rebuilt, experiment.name),
                       validate_requests(requests, experiment.name,
                                         max_num_batched_tokens=mnbt), report)


def _split_step(data: RequestData, train_fraction: float) -> int:
    """First step id of the holdout: the step at ``train_fraction`` of the traced steps."""
    ids = np.sort(data.steps.column("step_id").to_numpy())
    return int(ids[min(int(round(train_fraction * len(ids))), len(ids) - 1)]) if len(ids) else 0


def predict_requests(data: RequestData, model: StepTimeModel, alphas: AlphaFit
                     ) -> pd.DataFrame:
    """Teacher-forced per-request predictions of ``model`` + ``alphas`` on ``data``."""
    frame = feature_frame(data.experiment, data.full_steps)
    return teacher_forced(data.requests, frame["step_id"].to_numpy(),
                          np.asarray(model.predict(frame), np.float64), alphas)


def temporal_request_holdout(items: list[RequestData], family: str = "picf",
                             train_fraction: float = TRAIN_FRACTION, **params: Any
                             ) -> dict[str, dict[str, Any]]:
    """Fit ``family`` on the first ``train_fraction`` of every experiment's traced steps
    and the alphas (median fit) on the requests scheduled before that point; report,
    per experiment, step MAPE on the remaining steps and TTFT / ITL / E2E accuracy of the
    requests scheduled after it."""
    splits = {d.experiment.name: _split_step(d, train_fraction) for d in items}
    frames = []
    for d in items:
        frame = feature_frame(d.experiment, d.steps)
        frames.append(frame[frame["step_id"] < splits[d.experiment.name]])
    model = make_model(family, **params).fit(pd.concat(frames, ignore_index=True))
    out: dict[str, dict[str, Any]] = {}
    for d in items:
        split = splits[d.experiment.name]
        scheduled = d.requests.column("scheduled_step").to_numpy(zero_copy_only=False)
        train_requests = d.requests.filter(pa.array(np.nan_to_num(scheduled, nan=split) < split))
        alphas = fit_alphas(train_requests if train_requests.num_rows else d.requests)
        steps = feature_frame(d.experiment, d.steps)
        test_steps = steps[steps["step_id"] >= split]
        per_request = predict_requests(d, model, alphas)
        out[d.experiment.name] = {
            "split_step": split,
            "steps": summary(model.predict(test_steps), test_steps["duration_us"].to_numpy()),
            **request_accuracy(per_request, split),
            "alphas": alphas.to_dict(),
        }
    return out
