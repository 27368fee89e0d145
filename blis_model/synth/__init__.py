"""Synthetic vLLM experiments with a known ground truth (tests, demos, scale runs).

``write_experiment(path, SynthConfig(...))`` replays a drawn workload on the replay engine
(``blis_model.requests``: vLLM V1's scheduler) and writes a corpus folder in the real
trace format (step, journey and API scopes); the returned :class:`SynthTruth` holds every
step's batch and duration and every request's timings.
"""

from blis_model.synth.corpus import demo_configs, write_corpus
from blis_model.synth.simulator import LinearStepTime, StepBatch, SynthConfig, simulate
from blis_model.synth.truth import SynthTruth, write_experiment

__all__ = ["LinearStepTime", "StepBatch", "SynthConfig", "SynthTruth", "demo_configs",
           "simulate", "write_corpus", "write_experiment"]
