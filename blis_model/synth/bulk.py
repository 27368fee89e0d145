"""A fast bulk corpus generator: millions of traced steps in vLLM's OTLP format, quickly.

Each experiment is a closed-loop vLLM V1 schedule: ``running`` request slots (a finished
request is replaced by a new one at the next step), decodes take one token each first,
then prefills in admission order take what is left of ``max_num_batched_tokens`` (the
rule journey reconstruction assumes, so rebuilt batches equal the generated ones). The
schedule is tracked by aggregates (decode count and context sum, a few prefills), so a
step costs O(1) whatever the batch size. Written per experiment, streamed to the
filesystem (gzip level 1, never the whole file in memory), from string templates:

* ``step.BATCH_SUMMARY`` for every step, 100 steps per ``scheduler_steps_N`` span/line;
* ``step.REQUEST_SNAPSHOT`` for every scheduled request on 1 step in ``snapshot_every``;
* a journey span (``llm_core``: QUEUED, SCHEDULED, FIRST_TOKEN, FINISHED) and an API
  span (``llm_request``: ARRIVED, DEPARTED) for every request, 8 spans to a line.

Configurations cycle over catalog models × H100/A100-80/L40S × TP 1/2 × chunk budget
(those whose weights fit in 80% of the GPUs' memory). The ground-truth step time is a
roofline: max(weight streaming, GEMM compute) + prefill attention + KV reads + launch
and TP all-reduce overheads, with 3% log-normal noise. Deterministic given the seed.
"""

from __future__ import annotations

import gzip
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import yaml

from blis_model.configuration.architecture import bundled_model_config
from blis_model.configuration.hardware import HardwareSpec, hardware_spec
from blis_model.storage import filesystem, is_remote, join, write_bytes_atomic

GPUS = ("H100", "A100-80", "L40S")
TENSOR_PARALLEL = (1, 2)
CHUNK_BUDGETS = (2048, 4096, 8192)
MODELS = ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-2-7b-hf", "Qwen/Qwen2.5-7B-Instruct",
          "codellama/CodeLlama-34b-hf", "mistralai/Mixtral-8x7B-v0.1")
STEPS_PER_SPAN = 100
SPANS_PER_LINE = 8
FLUSH_BYTES = 4 << 20  # uncompressed bytes buffered before a write
MONO_START_NS = 10_000_000_000_000
WALL_OFFSET_NS = 1_700_000_000_000_000_000
BLOCK_SIZE = 16
GPU_BLOCKS = 40_000


@dataclass(frozen=True)
class BulkConfig:
    """One generated experiment's configuration."""

    name: str
    model: str
    hardware: str
    tensor_parallelism: int
    max_num_batched_tokens: int
    running: int  # request slots (max_num_seqs)
    seed: int

    def exp_config(self) -> dict[str, Any]:
        return {"model": self.model, "hardware": self.hardware,
                "tensor_parallelism": self.tensor_parallelism,
                "max_num_batched_tokens": self.max_num_batched_tokens,
                "max_num_seqs": self.running, "block_size": BLOCK_SIZE,
                "engine": "blis_model.synth.bulk", "synth_seed": self.seed}


@dataclass(frozen=True)
class BulkResult:
    """What was written for one experiment: steps, requests, trace bytes (gzip, raw)."""

    name: str
    config: dict[str, Any]
    steps: int
    requests: int
    snapshots: int
    bytes_compressed: int
    bytes_uncompressed: int
    trace_url: str


# ------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class _Law:
    """Per-configuration roofline constants (µs)."""

    weights_us: float  # streaming the weights once per step
    gemm_us_per_token: float
    attn_us_per_pair: float  # prefill attention per (query, key) pair
    kv_us_per_ctx: float  # decode KV read per context token
    launch_us: float
    allreduce_us_per_token: float


def _params(cfg: dict[str, Any]) -> tuple[float, float, float]:
    """(total params, active params per token, KV bytes per token) of a HF config."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = h // heads
    attn = h * (h + 2 * kv * head_dim) + h * h
    experts = cfg.get("num_local_experts", 1)
    active = cfg.get("num_experts_per_tok", 1)
    mlp = 3 * h * cfg["intermediate_size"]
    embed = 2 * cfg["vocab_size"] * h
    total = layers * (attn + experts * mlp) + embed
    per_token = layers * (attn + active * mlp) + embed
    return float(total), float(per_token), float(2 * layers * kv * head_dim * 2)


def _law(model: str, hw: HardwareSpec, tp: int) -> _Law:
    cfg = bundled_model_config(model) or {}
    total, active, kv_bytes = _params(cfg)
    flops = hw.tflops_bf16 * 1e6  # FLOP/µs
    bw = hw.hbm_tbs * 1e6  # bytes/µs
    layers, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    return _Law(weights_us=2 * total / tp / (0.8 * bw),
                gemm_us_per_token=2 * active / tp / (0.55 * flops),
                attn_us_per_pair=4 * layers * h / tp / (0.4 * flops),
                kv_us_per_ctx=kv_bytes / tp / (0.7 * bw),
                launch_us=150.0 + 6.0 * layers + (12.0 * layers if tp > 1 else 0.0),
                allreduce_us_per_token=(4 * layers * h * 2 / (hw.interconnect_gbs * 1e3 * 0.7)
                                        if tp > 1 else 0.0))


def configurations() -> list[tuple[str, str, int, int]]:
    """Every (model, GPU, TP, chunk budget) whose weights fit in 80% of GPU memory."""
    out = []
    for model in MODELS:
        total, _, _ = _params(bundled_model_config(model) or {})
        for gpu in GPUS:
            hw = hardware_spec(gpu)
            for tp in TENSOR_PARALLEL:
                if 2 * total / tp <= 0.8 * hw.memory_gib * 2**30:
                    out.extend((model, gpu, tp, mnbt) for mnbt in CHUNK_BUDGETS)
    return out


def bulk_configs(experiments: int, seed: int = 0, running: int = 32) -> list[BulkConfig]:
    """``experiments`` configurations, spread over :func:`configurations` (deterministic:
    a stride through the shuffled list, so a small corpus already mixes models and GPUs)."""
    combos = configurations()
    order = np.random.default_rng([seed, 31]).permutation(len(combos))
    out = []
    for i in range(experiments):
        model, gpu, tp, mnbt = combos[int(order[i % len(combos)])]
        short = model.split("/")[-1].lower()
        out.append(BulkConfig(f"bulk-{i:04d}-{short}-{gpu.lower()}-tp{tp}-mnbt{mnbt}", model,
                              gpu, tp, mnbt, running, seed * 100_003 + i))
    return out


# --------------------------------------------------------------------------- templates

_RES = '{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"vllm"}}]},"scopeSpans":[{"scope":{"name":"%s"},"spans":[%s]}]}]}\n'  # noqa: E501


def _i(key: str) -> str:
    return '{"key":"' + key + '","value":{"intValue":"%d"}}'


def _d(key: str) -> str:
    return '{"key":"' + key + '","value":{"doubleValue":%r}}'


def _s(key: str) -> str:
    return '{"key":"' + key + '","value":{"stringValue":"%s"}}'


_SUMMARY = ('{"timeUnixNano":"%d","name":"step.BATCH_SUMMARY","attributes":['
            + ",".join([_i("step.id"), _i("step.ts_start_ns"), _i("step.ts_end_ns"),
                        _i("step.duration_us"), _i("queue.running_depth"),
                        _i("queue.waiting_depth"), _i("batch.num_prefill_reqs"),
                        _i("batch.num_decode_reqs"), _i("batch.scheduled_tokens"),
                        _i("batch.prefill_tokens"), _i("batch.decode_tokens"),
                        _i("batch.num_finished"), _i("batch.num_preempted"),
                        _d("kv.usage_gpu_ratio"), _i("kv.blocks_total_gpu"),
                        _i("kv.blocks_free_gpu")]) + "]}")
_SNAPSHOT = ('{"timeUnixNano":"%d","name":"step.REQUEST_SNAPSHOT","attributes":['
             + ",".join([_i("step.id"), _s("request.id"), _s("request.phase"),
                         _i("request.num_prompt_tokens"), _i("request.num_computed_tokens"),
                         _i("request.num_output_tokens"), _i("request.num_preemptions"),
                         _i("request.scheduled_tokens_this_step"),
                         _i("kv.blocks_allocated_gpu"), _i("kv.blocks_cached_gpu")]) + "]}")
_STEP_SPAN = ('{"traceId":"%032x","spanId":"%016x","name":"scheduler_steps_%d","kind":1,'
              '"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":['
              + ",".join([_i("scheduler.span_sequence"), _i("scheduler.step_range_start"),
                          _i("scheduler.step_range_end")]) + '],"events":[%s],"status":{}}')
_JOURNEY_ATTRS = ",".join([_s("event.type"), _d("ts.monotonic"), _i("ts.monotonic_ns"),
                           _i("scheduler.step"), _s("phase"), _i("prefill.done_tokens"),
                           _i("prefill.total_tokens"), _i("decode.done_tokens"),
                           _i("decode.max_tokens"), _i("num_preemptions")])
_JOURNEY_EVENT = '{"timeUnixNano":"%d","name":"journey.%s","attributes":[' + _JOURNEY_ATTRS
_SCHED_KIND = "," + _s("schedule.kind") % "FIRST"
_FINISH = "," + _s("finish.status") % "length"
_JOURNEY_SPAN = ('{"traceId":"%032x","spanId":"%016x","name":"llm_core","kind":1,'
                 '"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":['
                 + _s("gen_ai.request.id") + '],"events":[%s],"status":{}}')
_API_SPAN = ('{"traceId":"%032x","spanId":"%016x","name":"llm_request","kind":2,'
             '"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":['
             + ",".join([_s("gen_ai.request.id"), _i("gen_ai.usage.prompt_tokens"),
                         _i("gen_ai.usage.completion_tokens"), _i("gen_ai.request.max_tokens")])
             + '],"events":[{"timeUnixNano":"%d","name":"api.ARRIVED","attributes":['
             + _d("event.ts.monotonic") + ']},{"timeUnixNano":"%d","name":"api.DEPARTED",'
             '"attributes":[' + _d("event.ts.monotonic") + ']}],"status":{}}')


# ------------------------------------------------------------------------- the engine


class _Request:
    __slots__ = ("api", "arrival", "decode_from", "done", "events", "first_step", "jid",
                 "output", "prompt", "queued", "queued_step", "scheduled")

    def __init__(self, api: str, jid: str, prompt: int, output: int, arrival: int,
                 queued: int, queued_step: int) -> None:
        self.api, self.jid, self.prompt, self.output = api, jid, prompt, output
        self.arrival, self.queued, self.queued_step = arrival, queued, queued_step
        self.done = 0  # prompt tokens computed
        self.scheduled = False
        self.first_step = -1  # step whose chunk completed the prompt
        self.decode_from = -1
        self.events: list[str] = []


def _journey(req: _Request, kind: str, t_ns: int, step: int, phase: str, done: int,
             decoded: int, extra: str = "") -> None:
    req.events.append(_JOURNEY_EVENT % (t_ns + WALL_OFFSET_NS, kind, kind, t_ns / 1e9, t_ns,
                                        step, phase, done, req.prompt, decoded, req.output, 0)
                      + extra + "]}")


class _Writer:
    """Buffered gzip text writer over an open binary file; counts raw bytes."""

    def __init__(self, raw: Any) -> None:
        self.gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1)
        self.parts: list[str] = []
        self.size = 0
        self.total = 0

    def write(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        data = "".join(self.parts).encode()
        self.gz.write(data)
        self.total += len(data)
        self.parts, self.size = [], 0

    def close(self) -> None:
        self.flush()
        self.gz.close()


def _simulate(cfg: BulkConfig, steps: int, snapshot_every: int, out: _Writer) -> tuple[int, int,
                                                                                        int]:
    """Run the schedule and write its lines; returns (steps, requests, snapshots)."""
    rng = np.random.default_rng(cfg.seed)
    hw = hardware_spec(cfg.hardware)
    law = _law(cfg.model, hw, cfg.tensor_parallelism)
    mnbt = cfg.max_num_batched_tokens
    out_max = max(8, min(2048, steps // 4))
    drain_from = max(1, steps - out_max - 16)  # stop admitting so every request finishes
    bits = random.Random(cfg.seed).getrandbits
    noise = np.exp(rng.normal(0.0, 0.03, steps + out_max + 64))
    counter = 0

    def new_request(step: int, now: int) -> _Request:
        nonlocal counter
        counter += 1
        prompt = int(min(mnbt * 2, max(16, rng.lognormal(math.log(600), 0.7))))
        output = int(rng.integers(max(2, out_max // 4), out_max + 1))
        api = f"cmpl-{bits(48):012x}{counter:06x}"
        pre_queue = int(800_000 * rng.lognormal(0, 0.3))
        req = _Request(api, f"{api}-0-{bits(32):08x}", prompt, output, now - pre_queue,
                       now, step)
        _journey(req, "QUEUED", now, step, "WAITING", 0, 0)
        return req

    prefilling: list[_Request] = []
    decoding: dict[str, _Request] = {}
    finish_at: dict[int, list[_Request]] = {}
    n_dec, ctx_sum, tokens_held = 0, 0, 0
    now = MONO_START_NS
    free_slots = cfg.running
    step_events: list[str] = []
    journeys: list[str] = []
    apis: list[str] = []
    span_start = now
    snapshots = 0
    s = 0
    while True:
        if s < drain_from:
            for _ in range(free_slots):
                prefilling.append(new_request(s, now))
            free_slots = 0
        if not prefilling and not decoding:
            break
        snap = s % snapshot_every == 0
        # schedule: decodes first, then prefill chunks in admission order
        budget = mnbt - n_dec
        chunks: list[tuple[_Request, int, int]] = []
        for req in prefilling:
            if budget <= 0:
                break
            t = min(req.prompt - req.done, budget)
            budget -= t
            chunks.append((req, t, req.done))
            if not req.scheduled:
                req.scheduled = True
                _journey(req, "SCHEDULED", now, s, "PREFILL", req.done, 0, _SCHED_KIND)
        pf_tokens = sum(t for _, t, _ in chunks)
        pairs = sum(t * (c + t / 2) for _, t, c in chunks)
        dur = max(1, round(noise[s % len(noise)] * (
            max(law.weights_us, law.gemm_us_per_token * (pf_tokens + n_dec))
            + law.attn_us_per_pair * pairs + law.kv_us_per_ctx * ctx_sum + law.launch_us
            + law.allreduce_us_per_token * (pf_tokens + n_dec))))
        end = now + dur * 1000
        if snap:
            for req, t, c in chunks:
                step_events.append(_SNAPSHOT % (end + WALL_OFFSET_NS, s, req.jid, "PREFILL",
                                                req.prompt, c, 0, 0, t, -(-(c + t) // BLOCK_SIZE),
                                                0))
            for req in decoding.values():
                k = s - req.decode_from  # decodes done before this step
                c = req.prompt + k
                step_events.append(_SNAPSHOT % (end + WALL_OFFSET_NS, s, req.jid, "DECODE",
                                                req.prompt, c, k + 1, 0, 1,
                                                -(-(c + 1) // BLOCK_SIZE), 0))
            snapshots += len(chunks) + n_dec
        running_depth = n_dec + len(chunks)
        waiting_depth = len(prefilling) - len(chunks)
        decodes_now = n_dec
        # progress: prefill chunks; a completed prompt gives the first token
        entering: list[_Request] = []
        for req, t, _ in chunks:
            req.done += t
            tokens_held += t
            if req.done == req.prompt:
                req.first_step = s
                _journey(req, "FIRST_TOKEN", end, s, "DECODE", req.prompt, 1)
                entering.append(req)
        if entering:
            prefilling = [r for r in prefilling if r.first_step < 0]
        finished = finish_at.pop(s, [])
        for req in finished:
            del decoding[req.jid]
            n_dec -= 1
            ctx_sum -= req.prompt + req.output - 2
            tokens_held -= req.prompt + req.output - 1
            _journey(req, "FINISHED", end, s, "DECODE", req.prompt, req.output, _FINISH)
            departed = end + int(1_500_000 + 2_000 * req.output * rng.lognormal(0, 0.3))
            journeys.append(_JOURNEY_SPAN % (bits(128), bits(64), req.queued
                                             + WALL_OFFSET_NS, end + WALL_OFFSET_NS, req.jid,
                                             ",".join(req.events)))
            apis.append(_API_SPAN % (bits(128), bits(64), req.arrival
                                     + WALL_OFFSET_NS, departed + WALL_OFFSET_NS, req.api,
                                     req.prompt, req.output, req.output, req.arrival
                                     + WALL_OFFSET_NS, req.arrival / 1e9, departed
                                     + WALL_OFFSET_NS, departed / 1e9))
            req.events = []
            free_slots += 1
        tokens_held += n_dec  # every remaining decode computed one more token
        ctx_sum += n_dec
        for req in entering:
            req.decode_from = s + 1
            decoding[req.jid] = req
            finish_at.setdefault(s + req.output - 1, []).append(req)
            n_dec += 1
            ctx_sum += req.prompt
        used = min(GPU_BLOCKS, tokens_held // BLOCK_SIZE + running_depth)
        step_events.append(_SUMMARY % (
            end + WALL_OFFSET_NS, s, now, end, dur, running_depth, waiting_depth, len(chunks),
            decodes_now, pf_tokens + decodes_now, pf_tokens, decodes_now, len(finished), 0,
            round(used / GPU_BLOCKS, 6), GPU_BLOCKS, GPU_BLOCKS - used))
        now = end
        s += 1
        if s % STEPS_PER_SPAN == 0:
            _flush_steps(out, step_events, s, span_start, now)
            step_events, span_start = [], now
        for buf, scope in ((journeys, "vllm.scheduler"), (apis, "vllm.api")):
            if len(buf) >= SPANS_PER_LINE:
                out.write(_RES % (scope, ",".join(buf)))
                buf.clear()
    if step_events:
        _flush_steps(out, step_events, s, span_start, now)
    for buf, scope in ((journeys, "vllm.scheduler"), (apis, "vllm.api")):
        if buf:
            out.write(_RES % (scope, ",".join(buf)))
    return s, counter, snapshots


def _flush_steps(out: _Writer, events: list[str], s: int, start: int, end: int) -> None:
    seq = (s - 1) // STEPS_PER_SPAN
    out.write(_RES % ("vllm.scheduler.step", _STEP_SPAN % (
        seq + 1, seq + 1, seq, start + WALL_OFFSET_NS, end + WALL_OFFSET_NS, seq,
        seq * STEPS_PER_SPAN, (seq + 1) * STEPS_PER_SPAN - 1, ",".join(events))))


# ---------------------------------------------------------------------------- writing


def write_bulk_experiment(url: str, cfg: BulkConfig, steps: int, snapshot_every: int = 100,
                          options: dict | None = None) -> BulkResult:
    """Write one experiment folder (``exp-config.yaml``, ``traces.json.gz``) at ``url``,
    streaming the trace; the config file is written last (an experiment is a folder
    holding it, so a half-written experiment is never discovered)."""
    trace_url = join(url, "traces.json.gz")
    fs, path = filesystem(trace_url, options)
    target = path if is_remote(url) else path + ".partial"
    if not is_remote(url):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(target, "wb") as raw:
        writer = _Writer(raw)
        n_steps, n_requests, n_snaps = _simulate(cfg, steps, snapshot_every, writer)
        writer.close()
    if target != path:
        os.replace(target, path)
    compressed = int(fs.size(path))
    write_bytes_atomic(join(url, "exp-config.yaml"),
                       yaml.safe_dump(cfg.exp_config(), sort_keys=False).encode(), options)
    return BulkResult(cfg.name, asdict(cfg), n_steps, n_requests, n_snaps, compressed,
                      writer.total, trace_url)


def _write_one(args: tuple[str, BulkConfig, int, int, dict | None]) -> BulkResult:
    url, cfg, steps, snapshot_every, options = args
    return write_bulk_experiment(join(url, cfg.name), cfg, steps, snapshot_every, options)


def write_bulk_corpus(url: str, experiments: int, steps_per_experiment: int,
                      snapshot_every: int = 100, seed: int = 0, options: dict | None = None,
                      running: int = 32, processes: int = 1, first: int = 0
                      ) -> list[BulkResult]:
    """Write ``experiments`` experiments of about ``steps_per_experiment`` traced steps
    each under ``url`` (see the module docstring); ``processes`` > 1 writes experiments
    in parallel. ``first`` skips the first configurations (to add experiments to a
    corpus written with the same seed)."""
    configs = bulk_configs(first + experiments, seed, running)[first:]
    jobs = [(url, cfg, steps_per_experiment, snapshot_every, options) for cfg in configs]
    if processes <= 1:
        return [_write_one(job) for job in jobs]
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(_write_one, jobs))


def corpus_size(results: Sequence[BulkResult]) -> dict[str, int]:
    """Totals of a written corpus: experiments, steps, requests, bytes."""
    return {"experiments": len(results), "steps": sum(r.steps for r in results),
            "requests": sum(r.requests for r in results),
            "bytes_compressed": sum(r.bytes_compressed for r in results),
            "bytes_uncompressed": sum(r.bytes_uncompressed for r in results)}


__all__ = ["BulkConfig", "BulkResult", "bulk_configs", "configurations", "corpus_size",
           "write_bulk_corpus", "write_bulk_experiment"]
