"""What a replay is given: the requests (columnar) and the server's scheduler limits.

Both are value objects checked once at construction, with errors that name the field,
so the engine can trust them. Times are µs, lengths are tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blis_model.errors import ConfigError


@dataclass(frozen=True)
class ServerLimits:
    """vLLM V1 scheduler limits of one server.

    ``max_num_batched_tokens``: token budget of a step (chunked prefill);
    ``max_num_seqs``: running requests at most (≤ the token budget, as vLLM requires);
    ``block_size``: tokens per KV block; ``num_gpu_blocks``: KV blocks in all;
    ``max_model_len``: prompt + output tokens at most (None: no limit);
    ``prefix_caching``: requests of a prefix group may skip its cached full blocks.
    """

    max_num_batched_tokens: int
    max_num_seqs: int
    block_size: int
    num_gpu_blocks: int
    max_model_len: int | None = None
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size", "num_gpu_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise ConfigError(f"must be a positive integer, got {value!r}", key=name)
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ConfigError(f"{self.max_num_seqs} exceeds max_num_batched_tokens "
                              f"{self.max_num_batched_tokens} (vLLM refuses this)",
                              key="max_num_seqs")
        if self.max_model_len is not None and (
                isinstance(self.max_model_len, bool)
                or not isinstance(self.max_model_len, int | np.integer)
                or self.max_model_len <= 1):
            raise ConfigError(f"must be an integer > 1 or None, got {self.max_model_len!r}",
                              key="max_model_len")


def _column(name: str, values: object, n: int | None, dtype: type) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ConfigError(f"must be one-dimensional, got shape {arr.shape}", key=name)
    if n is not None and len(arr) != n:
        raise ConfigError(f"has {len(arr)} entries, expected {n} (one per request)", key=name)
    if dtype is np.int64:
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                raise ConfigError("must hold whole numbers", key=name)
        elif arr.dtype.kind not in "iub" and len(arr):
            raise ConfigError(f"must be integers, got dtype {arr.dtype}", key=name)
    elif arr.dtype.kind not in "iuf" and len(arr):
        raise ConfigError(f"must be numbers, got dtype {arr.dtype}", key=name)
    out = arr.astype(dtype)
    out.setflags(write=False)
    return out


def _check(name: str, bad: np.ndarray, what: str) -> None:
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"{int(bad.sum())} request(s) {what} (first: request {first})",
                          key=name)


@dataclass(frozen=True, eq=False)
class Workload:
    """One experiment's requests, one entry per request in arrival order.

    ``arrival_us``: API arrival (µs, non-decreasing); ``prompt_tokens`` ≥ 1;
    ``output_tokens`` ≥ 1 (tokens the server generates); ``prefix_group``: shared-prefix
    id or -1; ``prefix_tokens``: length of that shared prefix (≤ the prompt; 0 without a
    group); ``abort_us``: when the server aborts the request (NaN: never);
    ``pre_queue_us``: API overhead before the request enters the engine queue (α0):
    an array, a constant, or None for 0. Arrays are converted and made read-only.
    """

    arrival_us: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    prefix_group: np.ndarray | None = None
    prefix_tokens: np.ndarray | None = None
    abort_us: np.ndarray | None = None
    pre_queue_us: np.ndarray | float | None = None
    queue_us: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        arrival = _column("arrival_us", self.arrival_us, None, np.float64)
        n = len(arrival)
        if n == 0:
            raise ConfigError("the workload has no requests", key="arrival_us")
        _check("arrival_us", ~np.isfinite(arrival), "have a non-finite arrival")
        _check("arrival_us", np.r_[False, np.diff(arrival) < 0],
               "arrive before the previous request (arrivals must be sorted)")
        prompt = _column("prompt_tokens", self.prompt_tokens, n, np.int64)
        _check("prompt_tokens", prompt < 1, "have fewer than 1 prompt token")
        output = _column("output_tokens", self.output_tokens, n, np.int64)
        _check("output_tokens", output < 1, "have fewer than 1 output token")
        group = (np.full(n, -1, np.int64) if self.prefix_group is None
                 else _column("prefix_group", self.prefix_group, n, np.int64))
        _check("prefix_group", group < -1, "have a prefix group below -1")
        prefix = (np.zeros(n, np.int64) if self.prefix_tokens is None
                  else _column("prefix_tokens", self.prefix_tokens, n, np.int64))
        _check("prefix_tokens", prefix < 0, "have negative prefix tokens")
        _check("prefix_tokens", prefix > prompt, "have a prefix longer than the prompt")
        abort = (np.full(n, np.nan) if self.abort_us is None
                 else _column("abort_us", self.abort_us, n, np.float64))
        if self.pre_queue_us is None or np.ndim(self.pre_queue_us) == 0:
            value = 0.0 if self.pre_queue_us is None else float(self.pre_queue_us)
            pre = np.full(n, value)
        else:
            pre = _column("pre_queue_us", self.pre_queue_us, n, np.float64)
        _check("pre_queue_us", ~np.isfinite(pre) | (pre < 0), "have a negative or "
               "non-finite pre-queue time")
        pre.setflags(write=False)
        queue = arrival + pre
        queue.setflags(write=False)
        for name, value in (("arrival_us", arrival), ("prompt_tokens", prompt),
                            ("output_tokens", output), ("prefix_group", group),
                            ("prefix_tokens", prefix), ("abort_us", abort),
                            ("pre_queue_us", pre), ("queue_us", queue)):
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.arrival_us)

    @property
    def queue_order(self) -> np.ndarray:
        """Request indices in engine-queue order (by ``queue_us``, ties by index)."""
        return np.argsort(self.queue_us, kind="stable")
