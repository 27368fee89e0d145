"""Retry policy shared by the tasks: retry what may pass next time, never a domain error.

A ``BlisModelError`` (bad configuration, empty corpus, unreadable release) fails the same
way on every attempt, so it fails the task at once; anything else (a storage hiccup, a
lost Ray worker) is retried with exponential backoff.
"""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from blis_model.errors import BlisModelError

RETRIES = 2
RETRY_DELAYS = exponential_backoff(backoff_factor=2)  # 2 s, then 4 s


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: True unless the failure is a domain error."""
    return not isinstance(state.data, BlisModelError)
