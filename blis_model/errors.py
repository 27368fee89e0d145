"""Domain errors. Each carries enough context (experiment, file, line, key) to act on.

Library code raises these and never prints; the CLI turns them into one line and a
non-zero exit.
"""

from __future__ import annotations


class BlisModelError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(BlisModelError):
    """A configuration file is missing, or lacks a key, or holds a bad value."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 experiment: str | None = None) -> None:
        parts = []
        if experiment:
            parts.append(f"experiment {experiment}")
        if file:
            parts.append(file)
        if key:
            parts.append(f"key '{key}'")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.file, self.key, self.experiment = file, key, experiment


class CorpusError(BlisModelError):
    """The corpus cannot be used (empty, unreadable, nothing usable in it)."""


class ReleaseError(BlisModelError):
    """A release cannot be written, found or read."""
