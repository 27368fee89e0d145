"""A model compiled for the replay predicts every replayed step exactly as the model does
on the step's feature frame; what cannot be compiled exactly is refused, not
approximated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blis_model.calibration.featurize import featurize, load_experiments, training_frame
from blis_model.features.frame import feature_frame
from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.models.registry import make_model
from blis_model.requests.replay import ServerLimits, Workload, replay
from blis_model.requests.step_time import (
    ExactStepTime,
    NotDecomposable,
    compile_part,
    model_step_time,
)

SAMPLE = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"


@pytest.fixture(scope="module")
def sample():  # noqa: ANN201
    experiments = load_experiments(str(SAMPLE))
    return experiments, training_frame([featurize(e) for e in experiments])


def _workload(n: int = 1500, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(300, 3000, n)
    return Workload(arrival_us=np.cumsum(rng.exponential(4e4, n)), prompt_tokens=prompt,
                    output_tokens=rng.integers(2, 400, n),
                    prefix_group=rng.integers(-1, 4, n), prefix_tokens=np.full(n, 256))


@pytest.mark.parametrize("family", ["picf", "overlap"])
def test_compiled_model_equals_the_model_on_every_replayed_step(family: str, sample) -> None:  # noqa: ANN001
    experiments, frame = sample
    model = make_model(family).fit(frame)
    for exp in (experiments[1], experiments[3]):  # a dense model and the MoE one
        limits = ServerLimits(2048, 128, 16, 4000)
        result = replay(_workload(), limits, model_step_time(model, exp, 2048),
                        experiment=exp.name)
        steps = feature_frame(exp, result.steps)
        assert result.steps.num_rows > 1000 and (steps["pf_tokens"] > 0).any()
        predicted = model.predict(steps)
        np.testing.assert_allclose(result.steps.column("duration_us").to_numpy(), predicted,
                                   rtol=1e-9)


def test_exact_fallback_agrees_with_the_compiled_part(sample) -> None:  # noqa: ANN001
    experiments, frame = sample
    model = make_model("picf").fit(frame)
    exp = experiments[0]
    result = replay(_workload(60), ServerLimits(1024, 32, 16, 4000),
                    model_step_time(model, exp, 1024), experiment=exp.name)
    exact = replay(_workload(60), ServerLimits(1024, 32, 16, 4000),
                   ExactStepTime(model, exp), experiment=exp.name)
    np.testing.assert_allclose(exact.steps.column("duration_us").to_numpy(),
                               result.steps.column("duration_us").to_numpy(), rtol=1e-9)


def test_a_feature_that_is_not_a_table_plus_linear_terms_is_refused(sample) -> None:  # noqa: ANN001
    experiments, _ = sample
    # min(prefill tokens, 128) · longest prefill: a product of two aggregates
    names = [*PHYSICS_FEATURES, "prefill_attention_tail_us"]
    with pytest.raises(NotDecomposable, match="not a token-count table"):
        compile_part(names, np.ones(len(names)), experiments[0], 2048)
