"""Run a synthetic experiment, write it as a corpus folder, and return its ground truth."""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass

import pyarrow as pa
import yaml

from blis_model.storage import join, write_bytes_atomic
from blis_model.synth.otlp_writer import trace_lines
from blis_model.synth.records import StepBatch
from blis_model.synth.simulator import SimResult, SynthConfig, simulate


@dataclass(frozen=True)
class SynthTruth:
    """What the generator knows. ``steps``: one row per executed step (``traced`` marks
    steps written to the trace); ``requests``: one row per request, times in monotonic ns,
    overheads in µs; ``batches``: the exact composition of every step."""

    config: SynthConfig
    batches: tuple[StepBatch, ...]
    steps: pa.Table
    requests: pa.Table
    files: tuple[str, ...]


def steps_table(result: SimResult) -> pa.Table:
    every = result.config.sample_every
    s = result.steps
    return pa.table({
        "step_id": pa.array([r.batch.step_id for r in s], pa.int64()),
        "ts_start_ns": pa.array([r.ts_start_ns for r in s], pa.int64()),
        "duration_us": pa.array([float(r.duration_us) for r in s], pa.float64()),
        "num_prefill_reqs": pa.array([len(r.batch.prefills) for r in s], pa.int64()),
        "prefill_tokens": pa.array([r.batch.prefill_tokens for r in s], pa.int64()),
        "prefill_ctx_tokens": pa.array([r.batch.prefill_ctx_tokens for r in s], pa.int64()),
        "decode_count": pa.array([r.batch.decode_count for r in s], pa.int64()),
        "decode_ctx_sum": pa.array([r.batch.decode_ctx_sum for r in s], pa.int64()),
        "num_finished": pa.array([r.num_finished for r in s], pa.int64()),
        "num_preempted": pa.array([r.num_preempted for r in s], pa.int64()),
        "traced": pa.array([r.batch.step_id % every == 0 for r in s], pa.bool_()),
    })


def requests_table(result: SimResult) -> pa.Table:
    rs = sorted(result.requests, key=lambda r: r.arrival_ns)

    def col(name: str, kind: pa.DataType = pa.int64()) -> pa.Array:
        return pa.array([getattr(r, name) for r in rs], kind)

    return pa.table({
        "request_id": col("journey_id", pa.string()),
        "api_request_id": col("api_id", pa.string()),
        "arrival_ns": col("arrival_ns"), "queued_ns": col("queued_ns"),
        "scheduled_ns": col("scheduled_ns"), "first_token_ns": col("first_token_ns"),
        "finished_ns": col("finished_ns"), "departed_ns": col("departed_ns"),
        "queued_step": col("queued_step"), "scheduled_step": col("scheduled_step"),
        "first_token_step": col("first_token_step"), "finished_step": col("finished_step"),
        "prompt_tokens": col("prompt"), "output_tokens": col("output"),
        "num_preemptions": col("preemptions"),
        "pre_queue_us": pa.array([(r.queued_ns - r.arrival_ns) / 1e3 for r in rs]),
        "post_finish_us": pa.array([(r.departed_ns - r.finished_ns) / 1e3 for r in rs]),
    })


def exp_config(config: SynthConfig) -> dict:
    """The exp-config.yaml mapping of a synthetic experiment."""
    return {"model": config.model, "hardware": config.hardware,
            "tensor_parallelism": config.tensor_parallelism,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "max_num_seqs": config.max_num_seqs, "block_size": config.block_size,
            "engine": "blis_model.synth simulator", "synth_seed": config.seed}


def write_traces(path: str, result: SimResult, options: dict | None = None
                 ) -> tuple[str, ...]:
    """Write ``result``'s OTLP traces at ``path`` (``traces.json``, ``.gz`` when
    ``config.gzip``; same result, same bytes); returns the file name."""
    cfg = result.config
    body = b"\n".join(trace_lines(result)) + b"\n"
    name = "traces.json.gz" if cfg.gzip else "traces.json"
    if cfg.gzip:
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0,
                           compresslevel=6) as gz:
            gz.write(body)
        body = buf.getvalue()
    write_bytes_atomic(join(path, name), body, options)
    return (name,)


def write_experiment(path: str, config: SynthConfig, options: dict | None = None
                     ) -> SynthTruth:
    """Simulate ``config`` and write an experiment folder at ``path`` (local or object
    store): ``exp-config.yaml`` and ``traces.json`` (``.gz`` when ``config.gzip``).
    Returns the ground truth. Same config, same bytes."""
    result = simulate(config)
    cfg_yaml = yaml.safe_dump(exp_config(config), sort_keys=False).encode()
    write_bytes_atomic(join(path, "exp-config.yaml"), cfg_yaml, options)
    traces = write_traces(path, result, options)
    return SynthTruth(config=config, batches=tuple(s.batch for s in result.steps),
                      steps=steps_table(result), requests=requests_table(result),
                      files=("exp-config.yaml", *traces))
