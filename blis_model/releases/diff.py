"""What changed between two releases: every coefficient and headline metric that differs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from blis_model.releases.files import COEFFICIENTS
from blis_model.releases.read import read_file, read_manifest


def _numbers(data: Any, prefix: str = "") -> dict[str, float | int]:
    """Numeric leaves of a JSON document by path; a list of ``{"feature"|"name",
    "value"}`` entries is keyed by its names (``model.global.step_overhead``)."""
    out: dict[str, float | int] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            label = str(i)
            if isinstance(item, Mapping) and "value" in item:
                label = str(item.get("feature") or item.get("name") or i)
                item = item["value"]
            out.update(_numbers(item, f"{prefix}.{label}" if prefix else label))
    elif isinstance(data, int) and not isinstance(data, bool):
        out[prefix] = data  # counts stay integers
    elif isinstance(data, float):
        out[prefix] = data
    return out


def _changes(a: Mapping[str, float | int], b: Mapping[str, float | int],
             rel_tol: float = 1e-12) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va is not None and vb is not None and abs(vb - va) <= rel_tol * max(abs(va), 1.0):
            continue
        change = vb - va if va is not None and vb is not None else None
        rel = change / abs(va) * 100.0 if change is not None and va else None
        rows.append({"name": key, "a": va, "b": vb, "change": change, "change_pct": rel})
    return rows


_METRIC_KEYS = {"in_sample": "in-sample", "temporal_holdout": "temporal",
                "leave_one_experiment_out": "loo"}


def _metric_numbers(manifest: Mapping[str, Any]) -> dict[str, float | int]:
    metrics = manifest.get("metrics") or {}
    out = {f"summary.{k}": v for k, v in _numbers(metrics.get("summary") or {}).items()}
    proj = (metrics.get("blis_projection") or {}).get("summary") or {}
    out.update({f"blis_projection.{k}": v for k, v in _numbers(proj).items()})
    for key, label in _METRIC_KEYS.items():
        for name, result in (metrics.get(key) or {}).items():
            if isinstance(result, Mapping) and result.get("mape") is not None:
                out[f"{label}.{name}.mape"] = float(result["mape"])
    return out


def diff_releases(url_a: str, url_b: str, options_a: dict[str, Any] | None = None,
                  options_b: dict[str, Any] | None = None) -> dict[str, Any]:
    """What changed from release A to release B: every coefficient (native model and BLIS
    alphas/betas) and every headline metric (MAPEs in %) that differs, with the absolute
    and relative (%) change; plus the two versions, families and corpora."""
    sides = []
    for url, options in ((url_a, options_a), (url_b, options_b)):
        manifest = read_manifest(url, options)
        coefficients = json.loads(read_file(url, COEFFICIENTS, options))
        blis = manifest.get("blis") or {}
        numbers = {f"model.{k}": v for k, v in _numbers(coefficients.get("model") or {}).items()
                   if ".params." not in f".{k}"}
        numbers.update({f"blis.beta.{i}": float(v)
                        for i, v in enumerate(blis.get("beta_coeffs") or [])})
        numbers.update({f"blis.alpha.{i}": float(v)
                        for i, v in enumerate(blis.get("alpha_coeffs") or [])})
        sides.append((manifest, numbers, _metric_numbers(manifest)))
    (ma, ca, xa), (mb, cb, xb) = sides

    def about(m: Mapping[str, Any]) -> dict[str, Any]:
        corpus = m.get("corpus") or {}
        return {"version": m.get("version"), "family": m.get("family"),
                "created_at": m.get("created_at"), "corpus": corpus.get("url"),
                "experiments": corpus.get("experiments"), "steps": corpus.get("steps")}

    return {"a": about(ma), "b": about(mb), "coefficients": _changes(ca, cb),
            "metrics": _changes(xa, xb)}


__all__ = ["diff_releases"]
