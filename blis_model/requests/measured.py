"""Client-side request measurements turned into what a replay needs: the workload the
server saw, its scheduler limits, and which requests may serve as fit targets.

What the server saw is not always what the client recorded (``request-measurements.md``):

* **output length** — with ``ignore_eos`` the server generated the profile's
  ``output_len`` for every request it completed, whatever the client counted; the
  reader's ``output_tokens`` column is that count (``ingest.measurements``);
* **prompts of failed requests** — client errors record 0 input tokens; they still
  loaded the server, so they get the experiment's median prompt (noted);
* **prefix caching** — vLLM caches every full KV block of a prompt it has computed
  (prefix caching is on by default); a ``shared_prefix`` workload sends a fixed set of
  prompts again and again, so a repeated prompt is served from the cache except its last
  partial block. Requests carry no prompt id: identical prompts are grouped by their
  token length (prompts of equal length share a group — only their very first
  occurrences can be mistaken for hits);
* **client timeouts** — a streaming client that gives up disconnects, and vLLM aborts a
  request whose client went away (``AsyncLLM.generate`` is cancelled and aborts it): a
  request still unfinished when the client's timeout (:func:`client_timeout_us`) expires
  is aborted then, freeing its KV blocks and its batch slot. Timed-out requests loaded
  the server until then, so they stay in the workload; they are never fit targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blis_model.configuration.experiment import Experiment, load_experiment
from blis_model.errors import ConfigError, CorpusError
from blis_model.ingest.measurements import Measurements, load_measurements
from blis_model.requests.workload import ServerLimits, Workload

#: An experiment is overloaded when this share of its requests timed out at the client,
OVERLOAD_ERROR_SHARE = 0.05
#: or when the median TTFT of its last third of requests exceeds this many seconds.
OVERLOAD_TTFT_S = 5.0


@dataclass(frozen=True)
class MeasuredExperiment:
    """One measurement experiment ready to replay. ``workload`` has no pre-queue delay
    (α0 is a fitted parameter: :meth:`workload_with`); ``targets`` marks the requests
    whose measured TTFT and E2E are fit targets (valid — flagged counts are replaced by
    what the server generated — with at least 2 output tokens);
    ``overloaded``: its queue never drained (client timeouts or minutes of TTFT)."""

    experiment: Experiment
    measurements: Measurements
    workload: Workload
    limits: ServerLimits
    targets: np.ndarray
    overloaded: bool
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.experiment.name

    @property
    def config_key(self) -> str:
        return self.experiment.config_key

    @property
    def client_timeout_us(self) -> float | None:
        """The client's request timeout, µs (:func:`client_timeout_us`)."""
        return client_timeout_us(self.measurements)

    @property
    def ttft_us(self) -> np.ndarray:
        return _float(self.measurements, "ttft_us")

    @property
    def e2e_us(self) -> np.ndarray:
        return _float(self.measurements, "e2e_us")

    def workload_with(self, alpha0_us: float) -> Workload:
        """The workload with every request entering the engine queue α0 after arrival."""
        w = self.workload
        return Workload(arrival_us=w.arrival_us, prompt_tokens=w.prompt_tokens,
                        output_tokens=w.output_tokens, prefix_group=w.prefix_group,
                        prefix_tokens=w.prefix_tokens, abort_us=w.abort_us,
                        pre_queue_us=np.full(len(w), max(float(alpha0_us), 0.0)))


def _float(m: Measurements, column: str) -> np.ndarray:
    col = m.requests.column(column)
    values = col.to_numpy(zero_copy_only=False).astype(np.float64)
    if col.null_count:
        values[np.asarray(col.is_null())] = np.nan
    return values


def _ints(m: Measurements, column: str) -> np.ndarray:
    return np.nan_to_num(_float(m, column), nan=0.0).astype(np.int64)


def server_limits(experiment: Experiment) -> ServerLimits:
    """The scheduler limits of the experiment's server (``num_gpu_blocks`` required)."""
    s = experiment.server
    if not s.num_gpu_blocks:
        raise ConfigError("missing required key (KV blocks the server reported; needed to "
                          "replay its scheduler)", file=f"{experiment.name}/exp-config.yaml",
                          key="num_gpu_blocks", experiment=experiment.name)
    return ServerLimits(s.max_num_batched_tokens, s.max_num_seqs, s.block_size,
                        int(s.num_gpu_blocks), s.max_model_len)


#: Client errors whose E2E lie within this relative spread of each other, all at or above
#: the longest completed request, are one timeout (aiohttp's default: 300 s).
TIMEOUT_SPREAD = 0.01


def client_timeout_us(m: Measurements) -> float | None:
    """The client's request timeout, µs: the load generator's ``request_timeout`` when it
    records one; else the time at which its errored requests gave up, when they all gave
    up after the same time (within :data:`TIMEOUT_SPREAD`) and no completed request took
    longer — a timeout nobody configured (the HTTP client's default). None otherwise."""
    profile = m.workload
    if profile is not None and profile.request_timeout_s:
        return float(profile.request_timeout_s) * 1e6
    errors = np.asarray(m.requests.column("has_error").to_numpy(zero_copy_only=False), bool)
    e2e = _float(m, "e2e_us")
    gave_up = e2e[errors & np.isfinite(e2e)]
    if len(gave_up) < 2:
        return None
    low, high = float(gave_up.min()), float(gave_up.max())
    done = e2e[~errors & np.isfinite(e2e)]
    if high - low > TIMEOUT_SPREAD * high or (len(done) and float(done.max()) > low):
        return None
    return low


def is_overloaded(m: Measurements) -> bool:
    """Client timeouts on more than 5% of requests, or a last-third median TTFT above
    5 s: the queue kept growing (an overloaded run)."""
    errors = np.asarray(m.requests.column("has_error").to_numpy(zero_copy_only=False))
    if len(errors) and errors.mean() > OVERLOAD_ERROR_SHARE:
        return True
    ttft = _float(m, "ttft_us")
    last = ttft[-max(len(ttft) // 3, 1):]
    last = last[np.isfinite(last)]
    return bool(len(last) and np.median(last) > OVERLOAD_TTFT_S * 1e6)


def measured_experiment(experiment: Experiment, m: Measurements) -> MeasuredExperiment:
    """The replay inputs of one measurement experiment (see the module docstring)."""
    if m.requests.num_rows == 0:
        raise CorpusError(f"experiment {experiment.name}: no requests to replay")
    notes: list[str] = []
    prompt = _ints(m, "input_tokens")
    if (prompt <= 0).any():
        positive = prompt[prompt > 0]
        if not len(positive):
            raise CorpusError(f"experiment {experiment.name}: no request records its prompt "
                              "length")
        fill = int(np.median(positive))
        notes.append(f"{int((prompt <= 0).sum())} request(s) recorded no prompt tokens "
                     f"(client errors): replayed with the median prompt, {fill} tokens")
        prompt = np.where(prompt > 0, prompt, fill)
    output = _ints(m, "output_tokens")
    if (output <= 0).any():
        positive = output[output > 0]
        fill = int(np.median(positive)) if len(positive) else 1
        notes.append(f"{int((output <= 0).sum())} request(s) without an output count: "
                     f"replayed with the median, {fill} tokens")
        output = np.where(output > 0, output, fill)
    profile = m.workload
    shared = profile is not None and profile.data_type == "shared_prefix"
    group = prompt.copy() if shared else np.full(len(prompt), -1)
    prefix = prompt.copy() if shared else np.zeros(len(prompt), np.int64)
    if shared:
        notes.append(f"shared-prefix workload: {len(np.unique(prompt))} distinct prompt "
                     "lengths; a repeated prompt is served from vLLM's prefix cache")
    arrival = _float(m, "arrival_us")
    timeout = client_timeout_us(m)
    abort = None if timeout is None else arrival + timeout
    if timeout is not None:
        notes.append(f"client timeout {timeout / 1e6:.0f} s: a request unfinished by then is "
                     "aborted (the client disconnected)")
    workload = Workload(arrival_us=arrival, prompt_tokens=prompt, output_tokens=output,
                        prefix_group=group, prefix_tokens=prefix, abort_us=abort)
    valid = np.asarray(m.requests.column("valid").to_numpy(zero_copy_only=False), bool)
    ttft, e2e = _float(m, "ttft_us"), _float(m, "e2e_us")
    targets = valid & np.isfinite(ttft) & np.isfinite(e2e) & (e2e > ttft) & (ttft > 0) & (
        output >= 2)
    return MeasuredExperiment(experiment, m, workload, server_limits(experiment), targets,
                              is_overloaded(m), tuple(notes))


def load_measured(corpus_url: str, name: str, options: dict | None = None,
                  default_hardware: str | None = None) -> MeasuredExperiment:
    """Experiment ``name`` of a corpus (its configuration and its measurements) ready to
    replay."""
    experiment = load_experiment(corpus_url, name, options, default_hardware)
    measurements = load_measurements(corpus_url, name, options,
                                     default_hardware=default_hardware)
    return measured_experiment(experiment, measurements)


__all__ = ["MeasuredExperiment", "client_timeout_us", "is_overloaded", "load_measured",
           "measured_experiment", "server_limits"]
