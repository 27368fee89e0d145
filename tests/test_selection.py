"""Family selection: LOO first, temporal breaks ties and decides alone for one config."""

from __future__ import annotations

import math

from blis_model.calibration.selection import choose, score


def results(*mapes: float) -> dict[str, dict[str, float]]:
    return {f"e{i}": {"mape": m, "median_ape": m / 2, "n": 10} for i, m in enumerate(mapes)}


def test_lowest_leave_one_out_wins_and_reason_names_it() -> None:
    picf = score("picf", results(10, 20), results(5, 5))
    overlap = score("overlap", results(8, 12), results(9, 9))
    selection = choose([picf, overlap])
    assert selection.winner == "overlap"
    assert "overlap" in selection.reason and "10.00%" in selection.reason
    assert [s.family for s in selection.scores] == ["overlap", "picf"]


def test_single_configuration_uses_temporal() -> None:
    a = score("mole_rd", {}, results(7))
    b = score("picf", {}, results(9))
    selection = choose([b, a])
    assert selection.winner == "mole_rd" and math.isnan(selection.scores[0].loo_mape)
    assert "temporal" in selection.reason


def test_tie_goes_to_the_simpler_family() -> None:
    assert choose([score("rece", results(10), results(5)),
                   score("picf", results(10), results(5))]).winner == "picf"
