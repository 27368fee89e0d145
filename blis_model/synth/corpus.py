"""Multi-experiment synthetic corpora (demos, scale tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from blis_model.storage import join
from blis_model.synth.simulator import LinearStepTime, SynthConfig
from blis_model.synth.truth import SynthTruth, write_experiment


def write_corpus(url: str, configs: Mapping[str, SynthConfig], options: dict | None = None
                 ) -> dict[str, SynthTruth]:
    """Write one experiment folder per ``configs`` entry under ``url``; truths by name."""
    return {name: write_experiment(join(url, name), cfg, options)
            for name, cfg in configs.items()}


def demo_configs(seed: int = 0, num_requests: int = 300) -> dict[str, SynthConfig]:
    """A small multi-configuration corpus with journey and API traces: two models, two
    scheduler settings, one experiment sampled 1-in-5 without snapshots (reconstruction
    needed), one bursty and KV-starved (preemptions). Each model has its own law."""
    small = LinearStepTime(seed=seed, floor_us=2700.0)
    larger = LinearStepTime(base_us=3200.0, prefill_token_us=0.14, decode_us=24.0,
                            decode_ctx_us=0.005, seed=seed + 1, floor_us=3400.0)
    base = SynthConfig(seed=seed, num_requests=num_requests, arrival_rate=40.0)
    return {
        "synth-llama-3.1-8b-mnbt2048": dataclasses.replace(base, step_time_us=small),
        "synth-llama-3.1-8b-mnbt1024-sampled": dataclasses.replace(
            base, seed=seed + 1, max_num_batched_tokens=1024, max_num_seqs=32,
            step_time_us=small, snapshots=False, sample_every=5),
        "synth-llama-2-7b-bursty": dataclasses.replace(
            base, seed=seed + 2, model="meta-llama/Llama-2-7b-hf", arrival_cv=3.0,
            num_gpu_blocks=600, step_time_us=larger, out_of_order=0.05),
    }
