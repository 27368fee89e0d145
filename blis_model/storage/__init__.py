"""Storage: fsspec filesystems (``filesystem``), all-or-nothing writes (``publish``) and the
layout of a release store (``layout``). Pure library code (no Prefect, no Ray)."""

from blis_model.storage.filesystem import (
    StorageError,
    check_reachable,
    error_code,
    filesystem,
    is_permanent,
    is_remote,
    join,
    redact,
    storage_errors,
    storage_options_for,
    translate_error,
)
from blis_model.storage.publish import is_committed, publish_directory, write_bytes_atomic

__all__ = [
    "StorageError",
    "check_reachable",
    "error_code",
    "filesystem",
    "is_committed",
    "is_permanent",
    "is_remote",
    "join",
    "publish_directory",
    "redact",
    "storage_errors",
    "storage_options_for",
    "translate_error",
    "write_bytes_atomic",
]
