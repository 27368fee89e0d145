"""Replay-engine speed: simulated scheduler steps per second with a trivial step time
(``6000 + 20·dc_count + 0.1·pf_tokens`` µs), on

* a synthetic workload shaped like the real ones (16,800 requests, prompts ≈ 575 tokens,
  248 output tokens, 8 then 20 requests/s for 600 s each; 2048-token budget, 128
  sequences, 7462 blocks of 16 tokens, max_model_len 4096), also with a slower step time
  (``12000 + 60·dc_count + pf_tokens``: full batches, queueing) and with 3000 KV blocks
  (preemptions);
* when ``/work/shared/corpus/vllm-h100-requests`` (or ``../shared/...`` next to the
  repository, or ``--corpus``) exists: every real workload's arrivals and token counts
  from its ``requests.json.gz`` and its server limits (``exp-config.yaml``). As the data's
  notes say, the server generated ``inference-perf/profile.yaml``'s ``output_len`` for
  every request (``ignore_eos``), so that is replayed, not the client's count. Prefix
  groups are not recorded, so no prefix caching happens here.

The real data is read in place, never copied. Seconds = one ``replay()`` call (scheduler
+ output tables), median of ``--reps`` after a warm-up. Usage::

    python benchmarks/replay.py [--corpus DIR] [--reps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from report import table  # benchmarks/report.py (scripts run from benchmarks/)

from blis_model.requests.replay import ServerLimits, StepAggregates, Workload, replay

ROOT = Path(__file__).resolve().parents[1]
CORPORA = (Path("/work/shared/corpus/vllm-h100-requests"),
           ROOT.parent / "shared" / "corpus" / "vllm-h100-requests")
REAL_LIMITS = ServerLimits(max_num_batched_tokens=2048, max_num_seqs=128, block_size=16,
                           num_gpu_blocks=7462, max_model_len=4096)


def trivial_step_us(agg: StepAggregates) -> float:
    return 6000.0 + 20.0 * agg.dc_count + 0.1 * agg.pf_tokens


def heavy_step_us(agg: StepAggregates) -> float:
    """A slower server: the 20 req/s stage fills the batch (≈ 125 running)."""
    return 12000.0 + 60.0 * agg.dc_count + 1.0 * agg.pf_tokens


def synthetic_workload(seed: int = 0) -> Workload:
    """16,800 requests: Poisson at 8 req/s for 600 s, then 20 req/s for 600 s."""
    rng = np.random.default_rng(seed)
    arrivals = np.concatenate([np.sort(rng.uniform(0, 600e6, 4800)),
                               np.sort(rng.uniform(600e6, 1200e6, 12000))])
    prompt = rng.integers(560, 592, len(arrivals))
    return Workload(arrivals, prompt, np.full(len(arrivals), 248))


def real_workload(folder: Path) -> tuple[Workload, ServerLimits, list[str]]:
    """(workload, limits, notes on what was adjusted) of one experiment folder."""
    with gzip.open(folder / "requests.json.gz") as fh:
        data = json.load(fh)
    exp = yaml.safe_load((folder / "exp-config.yaml").read_text())
    reqs = sorted(data["requests"], key=lambda r: (r["arrival_time_us"], r["index"]))
    recorded = np.array([r["output_tokens"] for r in reqs])
    output = recorded
    profile_path = folder / "inference-perf" / "profile.yaml"
    if profile_path.exists():
        profile = yaml.safe_load(profile_path.read_text())
        length = (profile.get("data", {}).get("shared_prefix") or {}).get("output_len")
        if length and (profile.get("server") or {}).get("ignore_eos"):
            output = np.full(len(reqs), int(length))
    config = data.get("config", {})
    limits = ServerLimits(
        max_num_batched_tokens=int(exp.get("max_num_batched_tokens",
                                           config.get("max_num_batched_tokens"))),
        max_num_seqs=int(exp.get("max_num_seqs", config.get("max_num_seqs"))),
        block_size=int(exp.get("block_size", config.get("block_size", 16))),
        num_gpu_blocks=int(exp.get("num_gpu_blocks", config.get("kv_blocks_total_gpu"))),
        max_model_len=exp.get("max_model_len"))
    prompt = np.array([r["input_tokens"] for r in reqs])
    notes = []
    if (recorded != output).any():
        notes.append(f"{int((recorded != output).sum())} recorded output counts differ from "
                     "the profile's output_len (replayed: output_len)")
    if (prompt < 1).any():  # failed requests record no prompt: give them the median's
        notes.append(f"{int((prompt < 1).sum())} requests record 0 prompt tokens (failed "
                     "client-side): replayed with the median prompt")
        prompt = np.where(prompt < 1, int(np.median(prompt[prompt >= 1])), prompt)
    workload = Workload(np.array([r["arrival_time_us"] for r in reqs], np.float64),
                        prompt, np.maximum(output, 1))
    return workload, limits, notes


def measure(name: str, workload: Workload, limits: ServerLimits, reps: int,
            step_us: Callable[[StepAggregates], float] = trivial_step_us) -> dict:
    seconds, engine = [], []
    for _ in range(reps):
        start = time.perf_counter()
        result = replay(workload, limits, step_us)
        seconds.append(time.perf_counter() - start)
        engine.append(result.stats.scheduler_seconds)
    status = result.requests.column("status").to_numpy(zero_copy_only=False)
    wall = statistics.median(seconds)
    return {"workload": name, "requests": len(workload), "steps": result.stats.steps,
            "finished": int((status == "finished").sum()),
            "max running": int(result.steps.column("running_depth").to_numpy().max()),
            "preemptions": int(result.steps.column("num_preempted").to_numpy().sum()),
            "seconds": wall, "steps/s": f"{result.stats.steps / wall:,.0f}",
            "scheduler s": statistics.median(engine)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None,
                        help="folder of real request workloads (default: the shared corpus)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    corpus = args.corpus or next((c for c in CORPORA if c.is_dir()), None)
    replay(synthetic_workload(1), REAL_LIMITS, trivial_step_us)  # warm-up (imports, caches)
    synthetic = synthetic_workload()
    starved = dataclasses.replace(REAL_LIMITS, num_gpu_blocks=3000)
    rows = [measure("synthetic (real-shaped)", synthetic, REAL_LIMITS, args.reps),
            measure("synthetic, slower server (saturated)", synthetic, REAL_LIMITS, args.reps,
                    heavy_step_us),
            measure("synthetic, slower server, 3000 KV blocks (preempting)", synthetic,
                    starved, args.reps, heavy_step_us)]
    notes = []
    if corpus is not None and corpus.is_dir():
        for folder in sorted(p for p in corpus.iterdir() if (p / "requests.json.gz").exists()):
            workload, limits, adjusted = real_workload(folder)
            rows.append(measure(folder.name, workload, limits, args.reps))
            notes += [f"{folder.name}: {note}" for note in adjusted]
    print(f"### Replay speed ({platform.python_implementation()} "
          f"{platform.python_version()}; step time 6000 + 20·dc + 0.1·pf µs unless noted)\n")
    print(table(rows, ["workload", "requests", "steps", "finished", "max running",
                       "preemptions", "seconds", "steps/s", "scheduler s"]))
    if notes:
        print("\n" + "\n".join(f"* {n}" for n in notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
