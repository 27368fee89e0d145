"""The client view of a synthetic run: what a load generator would have measured.

One :func:`~blis_model.synth.simulator.simulate` run can be written as step/journey/API
traces (the server's view, ``synth.truth``), as client-side request measurements
(``request-measurements.md``, through :func:`~blis_model.ingest.measurements.
write_measurements`), or both in one experiment folder (a corpus mixing kinds). The
measurements are the run's own, composed as BLIS composes latencies
(``blis-latency-model.md``), with the generator's per-request overheads (lognormal, plus
Pareto spikes when ``overhead_spike_prob`` > 0):

* arrival: the API arrival, µs from the first request's; the request entered the engine
  queue α0·noise later (``SimRequest.queued_ns``);
* ``TTFT = first-token step end + α2·f − arrival``;
* ``E2E = finish step end + (α1 + α2·n)·f − arrival`` (the API span's DEPARTED time),

with ``f`` the request's post-processing noise factor and ``n`` its output tokens.
Input / output tokens are the prompt and the tokens the server generated (the client
counts them exactly: ``ignore_eos`` false). A request the run did not finish is a client
error with no timing.

:func:`physics_step_time` makes the run's step law a compiled β · physics-features law
(``requests.step_time.compile_part``), the model class ``requests.replay_fit`` fits, so
fitting the client view is an inverse problem with a known answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from blis_model.configuration.architecture import arch_from_hf_config, bundled_model_config
from blis_model.configuration.experiment import EXP_CONFIG, Experiment, ServerConfig
from blis_model.configuration.hardware import hardware_spec
from blis_model.configuration.kinds import GROUND_TRUTH_FILES, REQUEST_FILES
from blis_model.errors import ConfigError
from blis_model.features.frame import feature_context
from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.features.registry import compute
from blis_model.ingest.inference_perf import LoadProfile, LoadStage, SharedPrefix
from blis_model.ingest.measurements import (
    EXPANDED_CONFIG_FILE,
    PROFILE_FILE,
    SUMMARY_FILE,
    write_measurements,
)
from blis_model.requests.scheduler import AGGREGATES, StepAggregates
from blis_model.requests.step_time import CompiledPart, compile_part
from blis_model.storage import join, write_bytes_atomic
from blis_model.synth.simulator import SimResult, SynthConfig, simulate
from blis_model.synth.truth import (
    SynthTruth,
    exp_config,
    requests_table,
    steps_table,
    write_traces,
)

MIN_STEP_US = 1.0  # no GPU step is shorter (a law may price a tiny step at 0)
INFERENCE_PERF = "inference-perf"
MEASUREMENT_FILES = (f"{INFERENCE_PERF}/{EXPANDED_CONFIG_FILE}", "config.json",
                     REQUEST_FILES[0], GROUND_TRUTH_FILES[0],
                     f"{INFERENCE_PERF}/{PROFILE_FILE}", f"{INFERENCE_PERF}/{SUMMARY_FILE}",
                     f"{INFERENCE_PERF}/stage_0_lifecycle_metrics.json", EXP_CONFIG)


# ------------------------------------------------------------------ physics step law


def synth_experiment(config: SynthConfig, name: str = "synth", url: str = "") -> Experiment:
    """The :class:`Experiment` of a synthetic configuration (bundled model config, catalog
    GPU), as ``load_experiment`` would read the folder the client view writes."""
    hf = bundled_model_config(config.model)
    if hf is None:
        raise ConfigError(f"model '{config.model}' is not in the bundled catalog", key="model")
    hardware = hardware_spec(config.hardware)
    server = ServerConfig(model=config.model, hardware=hardware.name,
                          tensor_parallelism=config.tensor_parallelism,
                          max_num_batched_tokens=config.max_num_batched_tokens,
                          max_num_seqs=config.max_num_seqs, block_size=config.block_size,
                          num_gpu_blocks=config.num_gpu_blocks)
    arch = arch_from_hf_config(hf, config.model,
                               source=f"bundled catalog entry for {config.model}")
    return Experiment(name=name, url=url, server=server, arch=arch, hardware=hardware,
                      trace_url=None)


@dataclass(frozen=True, eq=False)
class PhysicsStepTime:
    """Ground-truth step time (µs) ``max(1, β · physics features(step))`` of one
    configuration, compiled (exact, a few µs a step), times heavy-tailed noise:
    lognormal(0, ``noise_sigma``) and, with probability ``spike_prob``, a
    1 + ``spike_scale``·Pareto(``spike_shape``) slowdown. Noise is a pure function of
    (``seed``, step id). Called with the replay's :class:`StepAggregates`."""

    features: tuple[str, ...]
    beta: tuple[float, ...]
    experiment: Experiment
    part: CompiledPart
    max_tokens: int
    noise_sigma: float = 0.02
    spike_prob: float = 0.0
    spike_shape: float = 2.5
    spike_scale: float = 0.2
    seed: int = 0

    @property
    def config_key(self) -> str:
        return self.experiment.config_key

    def coefficients(self) -> dict[str, float]:
        """β by feature name."""
        return dict(zip(self.features, self.beta, strict=True))

    def mean_us(self, agg: StepAggregates) -> float:
        """The noise-free step time (µs) of one step's aggregates."""
        return max(self.part(agg), MIN_STEP_US)

    def mean_of(self, steps: pa.Table) -> np.ndarray:
        """The noise-free step times (µs) of a replay step table (``requests.replay``)."""
        cols = {c: steps.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                for c in AGGREGATES if c in steps.column_names}
        values = compute(list(self.features), cols, feature_context(self.experiment))
        return np.maximum(values @ np.asarray(self.beta), MIN_STEP_US)

    def __call__(self, agg: StepAggregates) -> float:
        mean = self.mean_us(agg)
        if self.noise_sigma <= 0 and self.spike_prob <= 0:
            return mean
        rng = np.random.default_rng([self.seed, int(agg.step_id)])
        factor = math.exp(self.noise_sigma * rng.standard_normal())
        if rng.random() < self.spike_prob:
            factor *= 1.0 + self.spike_scale * rng.pareto(self.spike_shape)
        return mean * factor

    def check(self, config: SynthConfig) -> None:
        """Raise ConfigError when ``config`` is not the configuration this law was
        compiled for (another model, GPU, TP or a larger token budget)."""
        ours = synth_experiment(config).config_key.rsplit("|mnbt", 1)[0]
        mine = self.config_key.rsplit("|mnbt", 1)[0]
        if ours != mine:
            raise ConfigError(f"the step law was compiled for {mine}, the experiment is "
                              f"{ours}", key="step_time_us")
        if config.max_num_batched_tokens > self.max_tokens:
            raise ConfigError(f"the step law covers steps of at most {self.max_tokens} "
                              f"tokens, the experiment allows {config.max_num_batched_tokens}",
                              key="step_time_us")


PHYSICS_LAW: dict[str, float] = {
    "gemm_roofline_us": 1.25, "gemm_ridge_us": 0.2, "prefill_attention_us": 1.5,
    "decode_attention_us": 1.2, "decode_attention_tail_us": 0.1, "lm_head_us": 1.1,
    "activation_io_us": 1.2, "tp_allreduce_us": 1.0, "layer_kernels": 5.0,
    "request_overhead": 8.0, "step_overhead": 300.0,
}
"""A plausible H100 law over the physics features (``synth --step-law physics``):
corrections (× the roofline µs) 1.0–1.5, 5 µs per kernel launch, 8 µs per request and
300 µs per step of host time. Fitting by replay on its client view must recover it."""


def physics_step_time(beta: Mapping[str, float] | Sequence[float],
                      experiment_like: Experiment | SynthConfig, noise: float = 0.02,
                      seed: int = 0, *, features: Sequence[str] | None = None,
                      spike_prob: float = 0.0, spike_shape: float = 2.5,
                      spike_scale: float = 0.2, max_tokens: int | None = None
                      ) -> PhysicsStepTime:
    """A :class:`PhysicsStepTime` for ``experiment_like``'s configuration (model, GPU, TP;
    steps up to its ``max_num_batched_tokens`` unless ``max_tokens``).

    ``beta``: coefficient by feature name (features not named are 0), or values over
    ``features`` (default: ``features.physics.PHYSICS_FEATURES``, the replay fit's
    basis). ``noise``: lognormal σ of each step's duration."""
    names = tuple(features) if features is not None else PHYSICS_FEATURES
    if isinstance(beta, Mapping):
        unknown = sorted(set(beta) - set(names))
        if unknown:
            if features is not None:
                raise ConfigError(f"coefficients for features not in the basis: {unknown}",
                                  key="beta")
            names = names + tuple(unknown)
        coef = np.array([float(beta.get(n, 0.0)) for n in names])
    else:
        coef = np.asarray(beta, np.float64)
        if coef.shape != (len(names),):
            raise ConfigError(f"{coef.size} coefficients for {len(names)} features", key="beta")
    if not np.all(np.isfinite(coef)):
        raise ConfigError("coefficients must be finite", key="beta")
    experiment = (experiment_like if isinstance(experiment_like, Experiment)
                  else synth_experiment(experiment_like))
    limit = int(max_tokens or experiment.server.max_num_batched_tokens)
    part = compile_part(names, coef, experiment, limit)
    return PhysicsStepTime(features=names, beta=tuple(map(float, coef)), experiment=experiment,
                           part=part, max_tokens=limit, noise_sigma=float(noise),
                           spike_prob=float(spike_prob), spike_shape=float(spike_shape),
                           spike_scale=float(spike_scale), seed=int(seed))


# --------------------------------------------------------------------- the client view


def client_requests(result: SimResult) -> pa.Table:
    """The client's per-request measurements of a run, in arrival order (module doc):
    ``index``, ``arrival_us`` (µs from the first arrival), ``input_tokens``,
    ``output_tokens``, ``has_error`` (not finished), ``ttft_us``, ``e2e_us`` (µs, whole;
    null for errors)."""
    cfg = result.config
    reqs = sorted(result.requests, key=lambda r: r.arrival_ns)  # the workload's order
    t0 = reqs[0].arrival_ns
    rows: dict[str, list[Any]] = {k: [] for k in ("index", "arrival_us", "input_tokens",
                                                 "output_tokens", "has_error", "ttft_us",
                                                 "e2e_us")}
    for i, r in enumerate(reqs):
        done = r.first_token_ns is not None and r.departed_ns is not None
        nominal = cfg.alpha1_us + cfg.alpha2_us * r.target_output
        factor = r.post_finish_us / nominal if nominal > 0 else 1.0
        rows["index"].append(i)
        rows["arrival_us"].append(round((r.arrival_ns - t0) / 1e3))
        rows["input_tokens"].append(r.prompt)
        rows["output_tokens"].append(r.output)
        rows["has_error"].append(not done)
        rows["ttft_us"].append(round((r.first_token_ns - r.arrival_ns) / 1e3
                                     + cfg.alpha2_us * factor) if done else None)
        rows["e2e_us"].append(round((r.departed_ns - r.arrival_ns) / 1e3) if done else None)
    types = {"has_error": pa.bool_()}
    return pa.table({k: pa.array(v, types.get(k, pa.int64())) for k, v in rows.items()})


def load_profile(config: SynthConfig) -> LoadProfile:
    """The load generator's run facts: one stage at ``arrival_rate`` requests/s for
    ``num_requests / arrival_rate`` s (Poisson arrivals; ``constant`` load type when the
    gaps are gamma with another coefficient of variation), streaming completions,
    ``ignore_eos`` false; a ``shared_prefix`` data section (``num_prefixes`` system
    prompts of ``prefix_tokens`` tokens) when prefix caching is on, else ``random``."""
    shared = (SharedPrefix(num_unique_system_prompts=config.num_prefixes,
                           system_prompt_len=config.prefix_tokens)
              if config.prefix_caching else None)
    return LoadProfile(
        api_type="completion", streaming=True, ignore_eos=False, model_name=config.model,
        data_type="shared_prefix" if config.prefix_caching else "random",
        load_type="poisson" if config.arrival_cv == 1.0 else "constant",
        stages=(LoadStage(0, rate=float(config.arrival_rate),
                          duration_s=config.num_requests / config.arrival_rate),),
        shared_prefix=shared)


def client_exp_config(config: SynthConfig) -> dict[str, Any]:
    """``exp-config.yaml`` of a folder holding the client view (the trace folder's keys
    plus the KV blocks a replay needs and the prefix-caching switch)."""
    return {**exp_config(config), "num_gpu_blocks": config.num_gpu_blocks,
            "enable_prefix_caching": config.prefix_caching, "app": "blis_model.synth"}


def _stats(values: np.ndarray) -> dict[str, float] | None:
    """inference-perf's distribution summary of ``values`` (seconds)."""
    if not len(values):
        return None
    out = {"mean": float(np.mean(values)), "min": float(np.min(values))}
    for name, q in (("p10", 10), ("median", 50), ("p90", 90), ("p99", 99)):
        out[name] = float(np.percentile(values, q))
    out["max"] = float(np.max(values))
    return out


def lifecycle_metrics(requests: pa.Table, config: SynthConfig) -> dict[str, Any]:
    """An inference-perf ``*_lifecycle_metrics.json`` mapping of the client view
    (request counts, TTFT / E2E / time per output token in s, throughput)."""
    ok = ~np.asarray(requests.column("has_error").to_numpy(zero_copy_only=False), bool)
    ttft = requests.column("ttft_us").to_numpy(zero_copy_only=False)[ok].astype(float) / 1e6
    e2e = requests.column("e2e_us").to_numpy(zero_copy_only=False)[ok].astype(float) / 1e6
    n_in = requests.column("input_tokens").to_numpy()[ok].astype(float)
    n_out = requests.column("output_tokens").to_numpy()[ok].astype(float)
    many = n_out > 1
    tpot = (e2e[many] - ttft[many]) / (n_out[many] - 1)
    arrival = requests.column("arrival_us").to_numpy().astype(float) / 1e6
    span = float(np.max(arrival[ok] + e2e)) if ok.any() else 0.0

    def rate(total: float) -> float:
        return float(total / span) if span > 0 else 0.0

    return {
        "load_summary": {"count": requests.num_rows,
                         "requested_rate": float(config.arrival_rate)},
        "successes": {
            "count": int(ok.sum()),
            "latency": {"request_latency": _stats(e2e), "time_to_first_token": _stats(ttft),
                        "time_per_output_token": _stats(tpot)},
            "throughput": {"input_tokens_per_sec": rate(n_in.sum()),
                           "output_tokens_per_sec": rate(n_out.sum()),
                           "requests_per_sec": rate(ok.sum())},
            "prompt_len": _stats(n_in), "output_len": _stats(n_out)},
        "failures": {"count": int((~ok).sum())},
    }


def write_client_view(path: str, result: SimResult, options: dict | None = None
                      ) -> tuple[str, ...]:
    """Write the client view of ``result`` into the experiment folder ``path`` (local or
    object store; next to its traces, if any): ``requests.json.gz``,
    ``ground_truth.json.gz``, ``config.json`` (the bundled HF config),
    ``inference-perf/{profile,config}.yaml``, summary and stage-0 lifecycle metrics, and
    ``exp-config.yaml`` last (with ``num_gpu_blocks``). Returns the files written."""
    cfg = result.config
    requests = client_requests(result)
    profile = load_profile(cfg).to_profile()
    expanded = {**profile, "server": {"type": "vllm", **profile.get("server", {})}}
    write_bytes_atomic(join(path, f"{INFERENCE_PERF}/{EXPANDED_CONFIG_FILE}"),
                       yaml.safe_dump(expanded, sort_keys=False).encode(), options)
    metrics = lifecycle_metrics(requests, cfg)
    write_measurements(path, requests, exp_config=client_exp_config(cfg), workload=profile,
                       hf_config=bundled_model_config(cfg.model), summary_metrics=metrics,
                       stage_metrics={0: metrics},
                       metadata={"source": "blis_model.synth client view",
                                 "synth_seed": cfg.seed},
                       options=options)
    return MEASUREMENT_FILES


def write_synth_experiment(path: str, config: SynthConfig, *, traces: bool = True,
                           client_view: bool = True, options: dict | None = None
                           ) -> SynthTruth:
    """Simulate ``config`` ONCE and write its traces and/or its client view into the
    experiment folder ``path`` (``exp-config.yaml`` last; traces alone: the files
    ``synth.write_experiment`` writes, byte for byte). Returns the ground truth."""
    if not (traces or client_view):
        raise ConfigError("nothing to write: traces and client view both off",
                          key="client_view")
    law = config.step_time_us
    if isinstance(law, PhysicsStepTime):
        law.check(config)
    result = simulate(config)
    files: list[str] = []
    if traces:
        files += write_traces(path, result, options)
    if client_view:
        files += write_client_view(path, result, options)
    else:  # what ``synth.write_experiment`` writes
        cfg_yaml = yaml.safe_dump(exp_config(config), sort_keys=False).encode()
        write_bytes_atomic(join(path, EXP_CONFIG), cfg_yaml, options)
        files.append(EXP_CONFIG)
    return SynthTruth(config=config, batches=tuple(s.batch for s in result.steps),
                      steps=steps_table(result), requests=requests_table(result),
                      files=tuple(files))


def write_synth_corpus(url: str, configs: Mapping[str, SynthConfig], *, traces: bool = True,
                       client_view: bool = True, options: dict | None = None
                       ) -> dict[str, SynthTruth]:
    """:func:`write_synth_experiment` for each ``configs`` entry (one folder per name
    under ``url``); truths by name."""
    return {name: write_synth_experiment(join(url, name), cfg, traces=traces,
                                         client_view=client_view, options=options)
            for name, cfg in configs.items()}


__all__ = ["PhysicsStepTime", "client_exp_config", "client_requests", "lifecycle_metrics",
           "load_profile", "physics_step_time", "synth_experiment", "write_client_view",
           "write_synth_corpus", "write_synth_experiment", "write_traces"]
