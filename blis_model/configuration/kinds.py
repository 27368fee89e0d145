"""What an experiment folder holds: step/journey traces, client request measurements, both.

A corpus may mix kinds: every experiment is a folder with an ``exp-config.yaml``, and next
to it either ``traces.json[.gz]`` (OTLP step/journey tracing, ``trace-format.md``), or
client-side request measurements (``request-measurements.md``): ``requests.json[.gz]``
(+ ``ground_truth.json[.gz]``), or inference-perf's native
``per_request_lifecycle_metrics.json`` at the top, under ``results/`` or under
``inference-perf/``. Detection lists at most three folders (no file is opened), so it is
cheap on object stores too.

This module imports nothing from :mod:`blis_model.configuration.experiment`, which uses it.
"""

from __future__ import annotations

from typing import Any

from blis_model.storage import filesystem

TRACES = "traces"
MEASUREMENTS = "measurements"

TRACE_FILES = ("traces.json", "traces.json.gz")
REQUEST_FILES = ("requests.json.gz", "requests.json")  # preferred first
GROUND_TRUTH_FILES = ("ground_truth.json.gz", "ground_truth.json")
PER_REQUEST_FILE = "per_request_lifecycle_metrics.json"
# Where inference-perf's own outputs may sit, relative to the experiment folder (searched
# in this order; "" is the experiment folder itself).
INFERENCE_PERF_DIRS = ("inference-perf", "results", "")


def _names(fs: Any, path: str) -> set[str]:
    """Base names of the entries directly under ``path`` (empty when it is no folder)."""
    try:
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    return {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}


def folder_kinds(fs: Any, path: str) -> frozenset[str]:
    """Kinds of data in the experiment folder ``path`` of ``fs`` (see module doc)."""
    path = path.rstrip("/")
    top = _names(fs, path)
    kinds = set()
    if top & set(TRACE_FILES):
        kinds.add(TRACES)
    if top & set(REQUEST_FILES) or PER_REQUEST_FILE in top:
        kinds.add(MEASUREMENTS)
    else:
        for sub in INFERENCE_PERF_DIRS:
            if sub and sub in top and PER_REQUEST_FILE in _names(fs, f"{path}/{sub}"):
                kinds.add(MEASUREMENTS)
                break
    return frozenset(kinds)


def experiment_kinds(url: str, options: dict | None = None) -> frozenset[str]:
    """Kinds of data (``"traces"``, ``"measurements"``) in the experiment folder ``url``
    (local path, ``file://`` or ``s3://``); empty when it holds neither."""
    fs, path = filesystem(url, options)
    return folder_kinds(fs, path)
