"""Family name → estimator class; rebuild any fitted model from its ``to_dict``."""

from __future__ import annotations

from typing import Any

from blis_model.models.base import StepTimeModel
from blis_model.models.picf import PICF

FAMILIES: dict[str, type[StepTimeModel]] = {"picf": PICF}
DEFAULT_FAMILY = "picf"


def make_model(family: str, **params: Any) -> StepTimeModel:
    """A new, unfitted estimator of ``family`` (ValueError naming the known ones)."""
    try:
        cls = FAMILIES[family.lower()]
    except KeyError:
        raise ValueError(f"unknown family '{family}'; known: {', '.join(sorted(FAMILIES))}"
                         ) from None
    return cls(**params)


def model_from_dict(data: dict[str, Any]) -> StepTimeModel:
    return FAMILIES[data["family"]].from_dict(data)
