"""Alpha fits: the median fit recovers the generator's overheads despite heavy tails."""

from __future__ import annotations

import numpy as np
import pytest

from blis_model.configuration.experiment import load_experiment
from blis_model.errors import CorpusError
from blis_model.ingest.requests import REQUEST_SCHEMA, read_request_table
from blis_model.requests.alphas import AlphaFit, compare_alpha_fits, fit_alphas, robust_linear_fit
from blis_model.synth import SynthConfig, write_experiment


def test_median_regression_ignores_outliers_and_stays_nonnegative() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 500, 400)
    y = 1500 + 3.0 * x
    y[:40] *= 20  # 10 % gross outliers
    X = np.column_stack([np.ones_like(x), x])
    np.testing.assert_allclose(robust_linear_fit(X, y, "median"), [1500, 3.0], rtol=1e-3)
    assert abs(robust_linear_fit(X, y, "mean")[0] - 1500) > 1000
    falling = np.column_stack([np.ones_like(x), x])
    coef = robust_linear_fit(falling, 5000 - 2.0 * x, "median")
    assert (coef >= 0).all() and coef[1] == 0.0


def test_pipeline_recovers_generator_alphas_robustly(tmp_path) -> None:
    cfg = SynthConfig(seed=11, num_requests=400, arrival_rate=40.0, alpha0_us=900.0,
                      alpha1_us=1800.0, alpha2_us=4.0, overhead_sigma=0.25,
                      overhead_spike_prob=0.08, snapshots=False)
    write_experiment(str(tmp_path / "e"), cfg)
    table, _ = read_request_table(load_experiment(str(tmp_path), "e"))
    fit = fit_alphas(table)
    assert fit.n_pre_queue == fit.n_post_finish == cfg.num_requests
    assert fit.alpha0_us == pytest.approx(900.0, rel=0.08)
    assert fit.alpha1_us == pytest.approx(1800.0, rel=0.15)
    assert fit.alpha2_us == pytest.approx(4.0, rel=0.15)
    both = compare_alpha_fits(table, prompt_term=True)
    assert both["mean"]["fit"]["alpha0_us"] > 1.3 * both["median"]["fit"]["alpha0_us"]
    errors = both["median"]["errors"]
    assert errors["pre_queue"]["median_ape"] < both["mean"]["errors"]["pre_queue"]["median_ape"]
    assert errors["post_finish"]["n"] == cfg.num_requests and errors["pre_queue"]["mae_ms"] > 0
    assert AlphaFit.from_dict(fit.to_dict()) == fit
    assert len(fit.blis_alphas) == 3


def test_no_request_timings_is_an_actionable_error() -> None:
    with pytest.raises(CorpusError, match="cannot fit alphas"):
        fit_alphas(REQUEST_SCHEMA.empty_table())
