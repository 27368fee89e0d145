"""Family name → estimator class; rebuild any fitted model from its ``to_dict``."""

from __future__ import annotations

from typing import Any

from blis_model.models.base import StepTimeModel
from blis_model.models.bsr_ard import BSRARD
from blis_model.models.hfd_tl import HFDTL
from blis_model.models.hybrid import Hybrid
from blis_model.models.mole_rd import MoLERD
from blis_model.models.overlap import Overlap
from blis_model.models.picf import PICF
from blis_model.models.rece import RECE

FAMILIES: dict[str, type[StepTimeModel]] = {
    "picf": PICF, "mole_rd": MoLERD, "hfd_tl": HFDTL, "bsr_ard": BSRARD, "rece": RECE,
    "hybrid": Hybrid, "overlap": Overlap,
}
DEFAULT_FAMILY = "picf"
# choose the family by leave-one-experiment-out (blis_model.calibration.selection)
AUTO_FAMILY = "auto"


def check_family(family: str) -> str:
    """``family`` normalised (lower case); ValueError naming the allowed values."""
    name = family.lower()
    if name != AUTO_FAMILY and name not in FAMILIES:
        raise ValueError(f"unknown family '{family}'; allowed: "
                         f"{', '.join([AUTO_FAMILY, *sorted(FAMILIES)])}")
    return name


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
