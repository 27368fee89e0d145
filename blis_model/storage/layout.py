"""The layout of a release store: the one place that knows where things live in it.

A store is any URL (local path, ``file://``, ``s3://``) holding::

    releases/<version>/              immutable releases (``manifest.json`` = commit marker)
    channels/<name>.json             channel pointers (``candidate``, ``stable``)
    channels/<name>.history/<seq>.json   every move of a channel
    cache/features/<key>.pkl         featurized experiments (``calibration.cache``)
    cache/shards/<key>/              per-experiment Parquet shards (``scale.shards``)
    state/seen.json                  experiments the upload sensor has reported
    state/calibrated.json            corpus identity of the last calibration per prefix

Every function returns a URL under :func:`store_root`.
"""

from __future__ import annotations

import os

from blis_model.storage.filesystem import is_remote, join

RELEASES = "releases"
CHANNELS = "channels"
CACHE = "cache"
FEATURE_CACHE = "cache/features"
STATE = "state"
SEEN_STATE = "state/seen.json"
CALIBRATED_STATE = "state/calibrated.json"


def store_root(store_url: str) -> str:
    """The store URL as given for remote stores, an absolute path for local ones."""
    if is_remote(store_url) or store_url.startswith("file://"):
        return store_url
    return os.path.abspath(os.path.expanduser(store_url))


def releases_url(store_url: str) -> str:
    return join(store_root(store_url), RELEASES)


def release_url(store_url: str, version: str) -> str:
    return join(store_root(store_url), RELEASES, version)


def channel_url(store_url: str, name: str) -> str:
    """The pointer object of channel ``name`` (validated by ``releases.channels``)."""
    return join(store_root(store_url), CHANNELS, f"{name}.json")


def channels_url(store_url: str) -> str:
    return join(store_root(store_url), CHANNELS)


def channel_history_url(store_url: str, name: str) -> str:
    return join(store_root(store_url), CHANNELS, f"{name}.history")


def cache_url(store_url: str) -> str:
    """Where shards go by default (``<store>/cache``)."""
    return join(store_root(store_url), CACHE)


def feature_cache_url(store_url: str, key: str) -> str:
    return join(store_root(store_url), FEATURE_CACHE, f"{key}.pkl")


def seen_state_url(store_url: str) -> str:
    return join(store_root(store_url), SEEN_STATE)


def calibrated_state_url(store_url: str) -> str:
    return join(store_root(store_url), CALIBRATED_STATE)


__all__ = ["CACHE", "CALIBRATED_STATE", "CHANNELS", "FEATURE_CACHE", "RELEASES", "SEEN_STATE",
           "STATE", "cache_url", "calibrated_state_url", "channel_history_url", "channel_url",
           "channels_url", "feature_cache_url", "release_url", "releases_url",
           "seen_state_url", "store_root"]
