"""Request latencies of one replay, and their accuracy against the measured ones.

:func:`run_replay` replays a measured experiment (``requests.measured``) with any
step-time function and BLIS's alphas, and composes the latencies as BLIS does:
``TTFT = first-token step end + α2 − arrival`` (the request entered the engine queue α0
after arrival), ``E2E = finish end − arrival + α1 + α2·n``, ``ITL = (E2E − TTFT)/(n − 1)``
— plus, optionally, the API server's contention: its one process streams every running
request's tokens each step, so a token reaches the client ``γ`` µs later per request
running when it was produced (``per_running_us``; BLIS has no such term).
With ``features`` it also returns, for every fit target that finished, the sums of those
features over its decode window and its prefill window — what the replay fit solves on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from blis_model.features.frame import feature_context
from blis_model.features.registry import compute
from blis_model.metrics import summary
from blis_model.requests.measured import MeasuredExperiment
from blis_model.requests.replay import replay
from blis_model.requests.scheduler import AGGREGATES, StepTime

Alphas = tuple[float, float, float]  # BLIS order: α0 µs, α1 µs, α2 µs per output token
LATENCIES = ("ttft", "itl", "e2e")
NO_SUMS = np.zeros((0, 0))


@dataclass(frozen=True)
class Replayed:
    """One experiment replayed with one law: the replay's requests (``requests.replay``
    REQUEST_SCHEMA), predicted TTFT / ITL / E2E (µs) per request, and the per-request
    feature sums of the fit targets that finished (decode window ``xd``, prefill window
    ``xt``, queue ``wait`` µs, output tokens ``n``, requests running when the first and
    the last token were produced ``nf``/``nl``; measured ``yd = E2E − TTFT`` and
    ``yt = TTFT − wait`` µs)."""

    name: str
    config_key: str
    steps: int
    seconds: float
    requests: pa.Table
    predicted: dict[str, np.ndarray]
    xd: np.ndarray
    xt: np.ndarray
    n: np.ndarray
    yd: np.ndarray
    yt: np.ndarray
    wait: np.ndarray
    nf: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nl: np.ndarray = field(default_factory=lambda: np.zeros(0))


def step_features(steps: pa.Table, item: MeasuredExperiment, features: Sequence[str]
                  ) -> np.ndarray:
    """The (steps × features) matrix of a replay's step table."""
    cols = {c: steps.column(c).to_numpy() for c in AGGREGATES}
    return compute(list(features), cols, feature_context(item.experiment))


def _depth_at(running: np.ndarray, step: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Running requests at each finished request's ``step`` (0 for the others: an aborted
    request may end at the boundary after the last step)."""
    out = np.zeros(len(step))
    out[done] = running[step[done].astype(np.int64)]
    return out


def run_replay(item: MeasuredExperiment, step_time: StepTime, alphas: Alphas,
               features: Sequence[str] | None = None, per_running_us: float = 0.0
               ) -> Replayed:
    """Replay ``item`` with ``step_time`` (µs per step), ``alphas`` and the API server's
    contention ``per_running_us`` (µs per running request); with ``features``, the fit
    targets' per-request feature sums too."""
    result = replay(item.workload_with(alphas[0]), item.limits, step_time,
                    experiment=item.name)
    req = result.requests
    status = np.asarray(req.column("status").to_numpy(zero_copy_only=False))
    done = status == "finished"
    n_out = req.column("output_tokens").to_numpy().astype(np.float64)
    arrival = req.column("arrival_us").to_numpy()
    first = req.column("first_token_us").to_numpy()
    finish = req.column("finished_us").to_numpy()
    _, a1, a2 = alphas
    running = result.steps.column("running_depth").to_numpy()
    f_step = req.column("first_token_step").to_numpy(zero_copy_only=False)
    l_step = req.column("finished_step").to_numpy(zero_copy_only=False)
    n_first, n_last = _depth_at(running, f_step, done), _depth_at(running, l_step, done)
    g = float(per_running_us)
    ttft = np.where(done, first + a2 + g * n_first - arrival, np.nan)
    e2e = np.where(done, finish - arrival + a1 + a2 * n_out + g * n_last, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        itl = np.where(n_out > 1, (e2e - ttft) / (n_out - 1), np.nan)
    predicted = {"ttft": ttft, "itl": itl, "e2e": e2e}
    use = item.targets & done
    if features is None:
        empty = np.zeros(0)
        return Replayed(item.name, item.config_key, result.stats.steps, result.stats.seconds,
                        req, predicted, NO_SUMS, NO_SUMS, empty, empty, empty, empty)
    F = step_features(result.steps, item, features)
    C = np.vstack([np.zeros(F.shape[1]), np.cumsum(F, axis=0)])
    s = req.column("scheduled_step").to_numpy(zero_copy_only=False)[use].astype(np.int64)
    f = req.column("first_token_step").to_numpy(zero_copy_only=False)[use].astype(np.int64)
    e = req.column("finished_step").to_numpy(zero_copy_only=False)[use].astype(np.int64)
    wait = (req.column("scheduled_us").to_numpy() - req.column("queued_us").to_numpy())[use]
    m_ttft, m_e2e = item.ttft_us[use], item.e2e_us[use]
    return Replayed(item.name, item.config_key, result.stats.steps, result.stats.seconds, req,
                    predicted, xd=C[e + 1] - C[f + 1], xt=C[f + 1] - C[s], n=n_out[use],
                    yd=m_e2e - m_ttft, yt=m_ttft - wait, wait=wait, nf=n_first[use],
                    nl=n_last[use])


def measured_latencies(item: MeasuredExperiment) -> dict[str, np.ndarray]:
    """Measured TTFT / ITL / E2E per request, µs (ITL over the generated tokens)."""
    n = item.workload.output_tokens.astype(np.float64)
    ttft, e2e = item.ttft_us, item.e2e_us
    with np.errstate(invalid="ignore", divide="ignore"):
        itl = np.where(n > 1, (e2e - ttft) / (n - 1), np.nan)
    return {"ttft": ttft, "itl": itl, "e2e": e2e}


def accuracy(item: MeasuredExperiment, replayed: Replayed, cap: float | None = None
             ) -> dict[str, dict[str, float]]:
    """TTFT / ITL / E2E: MAPE, median and p90 APE (%) over the fit targets; a target the
    replay never finished counts ``cap`` % (excluded when ``cap`` is None)."""
    measured = measured_latencies(item)
    out = {}
    for m in LATENCIES:
        pred, truth = replayed.predicted[m][item.targets], measured[m][item.targets]
        if cap is not None:
            pred = np.where(np.isfinite(pred), pred, truth * (1 + cap / 100.0))
        keep = np.isfinite(pred) & np.isfinite(truth) & (truth > 0)
        out[m] = summary(pred[keep], truth[keep])
    return out


def latency_table(item: MeasuredExperiment, replayed: Replayed) -> dict[str, Any]:
    """One experiment's request-level report: TTFT / ITL / E2E accuracy over the fit
    targets, simulated vs measured mean / p50 / p90 / p99 (ms) over the requests both
    completed, and completion counts (simulated: within the client's timeout when it had
    one — :func:`~blis_model.requests.measured.client_timeout_us`)."""
    measured = measured_latencies(item)
    status = np.asarray(replayed.requests.column("status").to_numpy(zero_copy_only=False))
    completed = ~np.asarray(item.measurements.requests.column("has_error").to_numpy(
        zero_copy_only=False), bool)
    both = completed & (status == "finished")
    stats: dict[str, Any] = {}
    for m in LATENCIES:
        sim, meas = replayed.predicted[m][both], measured[m][both]
        ok = np.isfinite(sim) & np.isfinite(meas)
        stats[m] = {f"{who}_{k}": (float(np.mean(v[ok])) if k == "mean" else
                                   float(np.percentile(v[ok], int(k[1:])))) / 1e3
                    if ok.any() else None
                    for who, v in (("simulated", sim), ("measured", meas))
                    for k in ("mean", "p50", "p90", "p99")}
    timeout = item.client_timeout_us
    finished = status == "finished"
    if timeout is not None:  # what the client would have seen complete
        finished = finished & (replayed.predicted["e2e"] <= timeout)
    return {"accuracy": accuracy(item, replayed), "distribution_ms": stats,
            "requests": len(status), "targets": int(item.targets.sum()),
            "client_timeout_s": None if timeout is None else timeout / 1e6,
            "completed_simulated": int(finished.sum()),
            "completed_measured": int(completed.sum()), "overloaded": item.overloaded,
            "steps": replayed.steps}


__all__ = ["LATENCIES", "Alphas", "Replayed", "accuracy", "latency_table", "measured_latencies",
           "run_replay", "step_features"]
