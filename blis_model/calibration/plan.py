"""A calibration run resolved before any work: what it reads, where it publishes, which
family, which release it calibrates, with which request-level settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from blis_model.calibration.selection import candidate_families
from blis_model.models.base import StepTimeModel
from blis_model.models.registry import AUTO_FAMILY, check_family
from blis_model.releases.read import Release, load_release
from blis_model.requests.stage import RequestSettings
from blis_model.storage import check_reachable, storage_options_for


@dataclass(frozen=True)
class Plan:
    """A calibration run resolved before any work: where from, where to, which family
    (``auto`` = choose by validation), the release to calibrate (``base``) and the
    request-level settings. ``cache``: reuse featurizations under ``<store>/cache/``."""

    corpus: str
    store: str
    family: str = AUTO_FAMILY
    base: Release | None = None
    default_hardware: str | None = None
    settings: RequestSettings = field(default_factory=RequestSettings)
    cache: bool = True

    @property
    def families(self) -> list[str]:
        """The families to validate: every candidate for ``auto``, else the one."""
        return candidate_families() if self.family == AUTO_FAMILY else [self.family]

    @property
    def base_model(self) -> StepTimeModel | None:
        return self.base.model if self.base is not None else None

    @property
    def base_version(self) -> str | None:
        return self.base.version if self.base is not None else None


def plan(corpus: str, store: str, family: str = AUTO_FAMILY, base: str | None = None,
         default_hardware: str | None = None, settings: RequestSettings | None = None,
         cache: bool = True) -> Plan:
    """Resolve a run and fail before any work: an unreachable store (StorageError), an
    unknown family (ValueError naming the known ones), an unreadable ``base`` release
    (ReleaseError). With ``base`` the family is the base release's."""
    check_reachable(store, storage_options_for(store))
    base_release = load_release(base, storage_options_for(base)) if base else None
    family = base_release.family if base_release else check_family(family)
    return Plan(corpus, store, family, base_release, default_hardware,
                settings or RequestSettings(), cache)


__all__ = ["Plan", "plan"]
