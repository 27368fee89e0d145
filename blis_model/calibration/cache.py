"""A cache of featurized experiments, so a one-experiment upload does not re-read the
corpus: ``<store>/cache/features/<key>.pkl``.

The key is a digest of the experiment's URL, its objects' identities (ETag on S3, size
and mtime locally: ``ingest.uploads.scan``), the featurization settings and
``calibration.featurize.FEATURIZATION_VERSION``, so a change to the traces, the
configuration files or what featurization computes makes a new entry, and an edit
elsewhere (the CLI, a model family) does not re-read a 13 GB corpus. Entries are pickles
of ``calibration.featurize.Featurized``: only use a store that only trusted writers can
write to (as for releases). A missing, unreadable or mismatched entry is recomputed; a
failed cache write only costs the next run a re-read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from typing import Any

from blis_model.calibration.featurize import FEATURIZATION_VERSION, Featurized, featurize
from blis_model.configuration.experiment import load_experiment
from blis_model.ingest.uploads import scan
from blis_model.storage import (
    StorageError,
    filesystem,
    join,
    redact,
    storage_errors,
    write_bytes_atomic,
)
from blis_model.storage.layout import feature_cache_url

log = logging.getLogger(__name__)


def experiment_url(corpus_url: str, name: str) -> str:
    return corpus_url if name == "." else join(corpus_url, name)


def cache_key(corpus_url: str, name: str, options: dict[str, Any] | None = None,
              default_hardware: str | None = None, settings: Any = None) -> str:
    """The cache key of one experiment as its objects are now (lists its folder once)."""
    url = experiment_url(corpus_url, name)
    found = scan(url, options).get(".")
    identity = found.identity if found else "missing"
    doc = {"url": redact(url), "identity": identity, "featurization": FEATURIZATION_VERSION,
           "default_hardware": default_hardware, "settings": repr(settings)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def entry_url(store_url: str, key: str) -> str:
    return feature_cache_url(store_url, key)


def load(store_url: str, key: str, name: str, options: dict[str, Any] | None = None
         ) -> Featurized | None:
    """The cached featurization of experiment ``name`` under ``key``, or None."""
    url = entry_url(store_url, key)
    fs, path = filesystem(url, options)
    try:
        with storage_errors(url, options):
            fs.invalidate_cache(path)
            raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        item = pickle.loads(raw)  # noqa: S301 - a trusted store (see the module docstring)
    except Exception as exc:  # corrupt or from an incompatible version: recompute
        log.warning("feature cache entry %s is unreadable (%s): recomputing", redact(url),
                    type(exc).__name__)
        return None
    if not isinstance(item, Featurized) or item.experiment.name != name:
        log.warning("feature cache entry %s does not hold experiment %s: recomputing",
                    redact(url), name)
        return None
    return item


def save(store_url: str, key: str, item: Featurized,
         options: dict[str, Any] | None = None) -> bool:
    """Store ``item`` under ``key``; False (and a warning) when the store refuses."""
    url = entry_url(store_url, key)
    try:
        write_bytes_atomic(url, pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL), options)
    except (OSError, StorageError) as exc:
        log.warning("could not write feature cache entry %s: %s", redact(url),
                    redact(str(exc)))
        return False
    return True


def featurize_cached(corpus_url: str, name: str, store_url: str,
                     options: dict[str, Any] | None = None,
                     store_options: dict[str, Any] | None = None,
                     default_hardware: str | None = None, settings: Any = None
                     ) -> tuple[Featurized, bool]:
    """``(featurized experiment, from_cache)``: the cached featurization when the
    experiment's objects, settings and code are unchanged, else a fresh one (cached)."""
    key = cache_key(corpus_url, name, options, default_hardware, settings)
    item = load(store_url, key, name, store_options)
    if item is not None:
        return item, True
    experiment = load_experiment(corpus_url, name, options, default_hardware)
    item = featurize(experiment, options, settings)
    save(store_url, key, item, store_options)
    return item, False


__all__ = ["cache_key", "entry_url", "featurize_cached", "load", "save"]
