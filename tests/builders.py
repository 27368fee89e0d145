"""Write real-format experiment folders for tests.

An experiment is ``exp-config.yaml`` + ``config.json`` (optional) + ``traces.json`` or
``traces.json.gz`` holding OTLP JSON lines of the ``vllm.scheduler.step`` scope: one
``step.BATCH_SUMMARY`` per step and one ``step.REQUEST_SNAPSHOT`` per request in it,
exactly as vLLM's exporter lays them out. Tests say what they mean ("a malformed line
between two good ones", "three steps with non-positive durations") and the builder
writes the bytes.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LLAMA_7B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "torch_dtype": "float16",
}
EXP_CONFIG: dict[str, Any] = {
    "model": "meta-llama/Llama-2-7b-hf", "hardware": "H100", "tensor_parallelism": 1,
    "max_num_batched_tokens": 2048, "max_num_seqs": 128,
}
#: A line that is not valid JSON (an export cut in the middle).
MALFORMED_LINE = b'{"resourceSpans":[{"resource":{},"scopeSpans":[{"scope":{"name":"vllm.sch'
UNSET = object()  # duration_us absent from the event


@dataclass(frozen=True)
class Step:
    """One traced scheduler step. ``prefills``: (chunk tokens, computed before, prompt
    length) per prefilling request; ``decodes``: context (tokens computed) per decode."""

    id: int
    duration_us: Any = 10_000  # µs; UNSET omits the attribute, 0/negatives are written as is
    prefills: tuple[tuple[int, int, int], ...] = ()
    decodes: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        return sum(t for t, _, _ in self.prefills) + len(self.decodes)


def plausible_duration_us(prefills: Sequence[tuple[int, int, int]], decodes: Sequence[int]
                          ) -> float:
    """A smooth, positive step time (µs) for a 7B model: fixed cost + per-token GEMMs +
    attention over cached context. Not physics, just something a fit can learn."""
    tokens = sum(t for t, _, _ in prefills) + len(decodes)
    attention = sum(t * (c + t / 2) for t, c, _ in prefills) * 2e-4 + sum(decodes) * 2.5e-3
    return 6000.0 + 14.0 * tokens + attention


def synthetic_steps(n: int, seed: int = 0, start: int = 0) -> list[Step]:
    """``n`` steps with random mixed batches and plausible durations (±3% noise)."""
    rng = random.Random(seed)
    steps = []
    for i in range(n):
        prefills = tuple(
            (t, c, c + t + rng.randint(0, 256))
            for t, c in ((rng.randint(16, 1024), rng.randint(0, 2048))
                         for _ in range(rng.randint(0, 2)))
        )
        decodes = tuple(rng.randint(64, 4096) for _ in range(rng.randint(1, 24)))
        duration = plausible_duration_us(prefills, decodes) * rng.uniform(0.97, 1.03)
        steps.append(Step(start + i, round(duration), prefills, decodes))
    return steps


# ------------------------------------------------------------------------ OTLP lines


def _attr(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    return {"key": key, "value": {"stringValue": str(value)}}


def _event(name: str, time_ns: int, attrs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return {"timeUnixNano": str(time_ns), "name": name,
            "attributes": [_attr(k, v) for k, v in attrs]}


def _step_events(step: Step, t0_ns: int, kv_blocks: int = 75_000) -> list[dict[str, Any]]:
    duration = step.duration_us
    end_ns = t0_ns + step.id * 50_000_000
    pf_tokens = sum(t for t, _, _ in step.prefills)
    used = sum((c + t) // 16 + 1 for t, c, _ in step.prefills) + sum(
        ctx // 16 + 1 for ctx in step.decodes)
    summary: list[tuple[str, Any]] = [("step.id", step.id),
                                      ("step.ts_start_ns", end_ns - 1_000_000),
                                      ("step.ts_end_ns", end_ns)]
    if duration is not UNSET:
        summary.append(("step.duration_us", int(duration)))
    summary += [
        ("queue.running_depth", len(step.prefills) + len(step.decodes)),
        ("queue.waiting_depth", 0),
        ("batch.num_prefill_reqs", len(step.prefills)),
        ("batch.num_decode_reqs", len(step.decodes)),
        ("batch.scheduled_tokens", step.tokens),
        ("batch.prefill_tokens", pf_tokens),
        ("batch.decode_tokens", len(step.decodes)),
        ("batch.num_finished", 0), ("batch.num_preempted", 0),
        ("kv.usage_gpu_ratio", round(used / kv_blocks, 6)),
        ("kv.blocks_total_gpu", kv_blocks), ("kv.blocks_free_gpu", kv_blocks - used),
    ]
    events = [_event("step.BATCH_SUMMARY", end_ns, summary)]
    requests = [("PREFILL", t, c, s, 0) for t, c, s in step.prefills] + [
        ("DECODE", 1, ctx, max(1, ctx // 2), ctx - max(1, ctx // 2)) for ctx in step.decodes]
    for j, (phase, scheduled, computed, prompt, output) in enumerate(requests):
        events.append(_event("step.REQUEST_SNAPSHOT", end_ns, [
            ("step.id", step.id), ("request.id", f"cmpl-{step.id}-{j}"),
            ("request.phase", phase), ("request.num_prompt_tokens", prompt),
            ("request.num_computed_tokens", computed), ("request.num_output_tokens", output),
            ("request.num_preemptions", 0), ("request.scheduled_tokens_this_step", scheduled),
            ("kv.blocks_allocated_gpu", (computed + scheduled) // 16 + 1),
            ("kv.blocks_cached_gpu", 0),
        ]))
    return events


def step_line(steps: Sequence[Step], span_index: int = 0, t0_ns: int = 1_700_000_000_000_000_000
              ) -> bytes:
    """One OTLP export line: a ``scheduler_steps_<span_index>`` span holding ``steps``."""
    events = [e for s in steps for e in _step_events(s, t0_ns)]
    span = {"traceId": f"{span_index + 1:032x}", "spanId": f"{span_index + 1:016x}",
            "name": f"scheduler_steps_{span_index}", "kind": 1,
            "startTimeUnixNano": str(t0_ns), "endTimeUnixNano": str(t0_ns + 1),
            "attributes": [_attr("scheduler.span_sequence", span_index)], "events": events}
    obj = {"resourceSpans": [{
        "resource": {"attributes": [_attr("service.name", "vllm")]},
        "scopeSpans": [{"scope": {"name": "vllm.scheduler.step"}, "spans": [span]}]}]}
    return json.dumps(obj, separators=(",", ":")).encode()


def step_lines(steps: Sequence[Step], steps_per_line: int = 10) -> list[bytes]:
    return [step_line(steps[i:i + steps_per_line], span_index=i // steps_per_line)
            for i in range(0, len(steps), steps_per_line)]


# ------------------------------------------------------------------------ folders


@dataclass
class ExperimentSpec:
    """What to write for one experiment (defaults: a healthy llama-2-7b on H100)."""

    steps: Sequence[Step] = field(default_factory=lambda: synthetic_steps(40))
    exp_config: dict[str, Any] = field(default_factory=lambda: dict(EXP_CONFIG))
    drop_keys: Sequence[str] = ()
    hf_config: dict[str, Any] | None = field(default_factory=lambda: dict(LLAMA_7B_CONFIG))
    lines: Sequence[bytes] | None = None  # raw trace lines (overrides ``steps``)
    steps_per_line: int = 10
    gz: bool = False


def write_experiment(corpus: Path, name: str, spec: ExperimentSpec | None = None,
                     **overrides: Any) -> Path:
    """Write experiment folder ``corpus/name`` and return it."""
    spec = spec or ExperimentSpec(**overrides)
    folder = Path(corpus) / name
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in spec.exp_config.items() if k not in spec.drop_keys}
    (folder / "exp-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if spec.hf_config is not None:
        (folder / "config.json").write_text(json.dumps(spec.hf_config, indent=2))
    lines = list(spec.lines) if spec.lines is not None else step_lines(spec.steps,
                                                                        spec.steps_per_line)
    body = b"".join(line + b"\n" for line in lines)
    if spec.gz:
        (folder / "traces.json.gz").write_bytes(gzip.compress(body))
    else:
        (folder / "traces.json").write_bytes(body)
    return folder


def truncate_file(path: Path, keep_fraction: float) -> int:
    """Cut ``path`` to the first ``keep_fraction`` of its bytes (a transfer that died);
    returns the new size."""
    data = Path(path).read_bytes()
    keep = int(len(data) * keep_fraction)
    Path(path).write_bytes(data[:keep])
    return keep


def write_corpus(root: Path, specs: dict[str, ExperimentSpec]) -> Path:
    """A corpus folder with one experiment per entry of ``specs``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, spec in specs.items():
        write_experiment(root, name, spec)
    return root


SAMPLE_CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"


def upload_sample(server: Any, bucket: str, prefix: str, names: Sequence[str]) -> None:
    """Upload experiments of the real sample corpus to ``s3://bucket/prefix/<name>/``."""
    client = server.client()
    for name in names:
        for path in (SAMPLE_CORPUS / name).rglob("*"):
            if path.is_file():
                key = f"{prefix}/{name}/{path.relative_to(SAMPLE_CORPUS / name).as_posix()}"
                client.upload_file(str(path), bucket, key)
