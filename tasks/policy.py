"""Retry policy shared by the tasks: retry what may pass next time, never a domain error.

A ``BlisModelError`` (bad configuration, empty corpus, unreadable release) or a storage
error retrying cannot fix (missing bucket, wrong or missing credentials) fails the same
way on every attempt, so it fails the task at once; anything else (an unreachable store,
a lost Ray worker) is retried with exponential backoff.
"""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from blis_model.errors import BlisModelError
from blis_model.storage import is_permanent

RETRIES = 2
RETRY_DELAYS = exponential_backoff(backoff_factor=2)  # 2 s, then 4 s


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: True unless the failure is a domain error or a permanent
    storage error."""
    error = state.data
    if not isinstance(error, BaseException):
        return True
    return not isinstance(error, BlisModelError) and not is_permanent(error)
