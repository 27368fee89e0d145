"""The files of a release: their names and the release schema. A release is a folder:

* ``manifest.json`` — version id, creation time (UTC), corpus URL (redacted) and
  fingerprint, code version, family, metrics (in-sample / temporal / leave-one-out, the
  BLIS projection's loss, request level), feature schema, ingest counts and problems per
  experiment, the experiments and their configuration keys, and the SHA-256 of every
  other file. It is the commit marker: written last, a folder without it is not a release.
* ``coefficients.json`` — ``{"version", "family", "model": model.to_dict(),
  "blis_projection": {...}}``: every native coefficient set (global and per
  configuration, with units) and the BLIS alphas/betas with names and units.
* ``defaults.yaml`` — loadable by BLIS as-is (only BLIS's allowed top-level keys):
  ``trained_physics_coefficients`` (3 alphas, 11 betas, finite and ≥ 0), ``defaults``
  per lower-cased model id, ``version``.
* ``hardware_config.json`` — BLIS's format, keyed by GPU name, for the GPUs involved.
* ``model_configs/<name>/config.json`` — the HF config of each model, where ``<name>``
  is the lower-cased model id without its organisation (``meta-llama/Llama-2-7b-hf`` →
  ``llama-2-7b-hf``): the folder BLIS looks up beside ``defaults.yaml``.
* ``MODEL_CARD.md`` — the human summary (``releases.model_card``), linking the plots.
* ``plots/*.png`` — predicted vs measured step time, error by batch regime and the
  calibration learning curve (``releases.plots``).

Where a release lives in a store: ``storage.layout`` (``<store>/releases/<version>/``).
"""

from __future__ import annotations

MANIFEST = "manifest.json"
COEFFICIENTS = "coefficients.json"
DEFAULTS = "defaults.yaml"
HARDWARE_CONFIG = "hardware_config.json"
MODEL_CARD = "MODEL_CARD.md"
MODEL_CONFIGS = "model_configs"
PLOTS_DIR = "plots"
SCHEMA = "blis-model-release/1"

#: Top-level keys BLIS's strict defaults.yaml parser accepts.
ALLOWED_DEFAULTS_KEYS: tuple[str, ...] = (
    "defaults", "workloads", "trained_physics_coefficients", "lora", "kv_offload_devices",
    "version",
)

__all__ = ["ALLOWED_DEFAULTS_KEYS", "COEFFICIENTS", "DEFAULTS", "HARDWARE_CONFIG", "MANIFEST",
           "MODEL_CARD", "MODEL_CONFIGS", "PLOTS_DIR", "SCHEMA"]
