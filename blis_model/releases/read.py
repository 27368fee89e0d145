"""Reading a published release back: manifest, coefficients (checksum verified) and the
rebuilt model, ready to predict."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blis_model.configuration.defaults import BLIS_SHIPPED_ALPHAS
from blis_model.errors import ReleaseError
from blis_model.releases.files import COEFFICIENTS, MANIFEST
from blis_model.storage import filesystem, join, redact, storage_errors

if TYPE_CHECKING:  # the model families (numpy, pandas, scikit-learn) load on first use:
    import numpy as np  # listing releases and moving channels never need them
    import pandas as pd

    from blis_model.models.base import StepTimeModel


@dataclass(frozen=True)
class Release:
    """A published release, read back: its manifest, coefficients and rebuilt model."""

    url: str
    manifest: dict[str, Any]
    coefficients: dict[str, Any]
    model: StepTimeModel

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))

    @property
    def family(self) -> str:
        return str(self.manifest.get("family", ""))

    @property
    def config_keys(self) -> set[str]:
        return {e["config_key"] for e in self.manifest.get("experiments", [])}

    def alphas(self, config_key: str | None = None) -> tuple[float, float, float]:
        """BLIS's alphas (α0 µs, α1 µs, α2 µs/output token) for a configuration: those
        fit on its requests when the release has them, else the release's pooled ones
        (``defaults.yaml``'s), else BLIS's shipped defaults."""
        per_config = ((self.coefficients.get("request_alphas") or {}).get("per_config")
                      or {})
        fit = per_config.get(config_key) if config_key else None
        if fit:
            return (float(fit["alpha0_us"]), float(fit["alpha1_us"]), float(fit["alpha2_us"]))
        pooled = (self.manifest.get("blis") or {}).get("alpha_coeffs") or BLIS_SHIPPED_ALPHAS
        a0, a1, a2 = (float(a) for a in pooled)
        return (a0, a1, a2)

    def contention(self, config_key: str | None = None) -> float:
        """The API server's contention fit on a configuration's requests (µs of delivery
        per running request; 0 when the release has none: BLIS's model)."""
        alphas = self.coefficients.get("request_alphas") or {}
        fit = ((alphas.get("per_config") or {}).get(config_key) if config_key else None) or (
            alphas.get("pooled") or {})
        return float(fit.get("per_running_us") or 0.0)


def read_file(url: str, name: str, options: dict | None = None) -> bytes:
    """One file of the release at ``url`` (ReleaseError when it is missing)."""
    target = join(url, name)
    fs, path = filesystem(target, options)
    with storage_errors(target, options):
        fs.invalidate_cache(path)
        try:
            with fs.open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            if name == MANIFEST:
                raise ReleaseError(f"no release at {redact(url)} (no {MANIFEST}: missing, "
                                   "or an unfinished publish)") from None
            raise ReleaseError(f"release {redact(url)}: {name} is missing") from None
        except IsADirectoryError:
            raise ReleaseError(f"release {redact(url)}: {name} is not a file") from None


def read_manifest(url: str, options: dict | None = None) -> dict[str, Any]:
    """The manifest of the release at ``url`` (ReleaseError if there is none)."""
    try:
        data = json.loads(read_file(url, MANIFEST, options))
    except json.JSONDecodeError as exc:
        raise ReleaseError(f"release {redact(url)}: {MANIFEST} is not valid JSON ({exc})"
                           ) from None
    if not isinstance(data, dict) or "version" not in data:
        raise ReleaseError(f"release {redact(url)}: {MANIFEST} has no version")
    return data


def load_release(url: str, options: dict | None = None) -> Release:
    """Read the release at ``url`` and rebuild its model (checksums verified)."""
    from blis_model.models.registry import model_from_dict

    url = url.rstrip("/") or url
    manifest = read_manifest(url, options)
    raw = read_file(url, COEFFICIENTS, options)
    expected = (manifest.get("files") or {}).get(COEFFICIENTS)
    if expected and hashlib.sha256(raw).hexdigest() != expected:
        raise ReleaseError(f"release {redact(url)}: {COEFFICIENTS} does not match its checksum "
                           "in the manifest")
    try:
        coefficients = json.loads(raw)
        model = model_from_dict(coefficients["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ReleaseError(f"release {redact(url)}: cannot rebuild the model from "
                           f"{COEFFICIENTS} ({type(exc).__name__}: {exc})") from None
    return Release(url=url, manifest=manifest, coefficients=coefficients, model=model)


def predict_frame(release: Release, frame: pd.DataFrame) -> np.ndarray:
    """Predicted step times (µs) for every row of a feature frame. A configuration the
    release was calibrated on uses its own coefficient set, any other the global one."""
    import numpy as np

    if not len(frame):
        return np.zeros(0)
    return np.asarray(release.model.predict(frame), dtype=np.float64)


__all__ = ["Release", "load_release", "predict_frame", "read_file", "read_manifest"]
