"""The per-request table: one row per engine request, from journey and API spans.

Journey spans (scope ``vllm.scheduler``, named ``llm_core``) carry the engine lifecycle
under an id with a sequence suffix (``cmpl-abc-0-1f2e``); API spans (scope ``vllm.api``,
named ``llm_request``) carry arrival and departure under the id without it
(``cmpl-abc``). A journey joins the longest API id that is a ``-``-delimited prefix of
its own id. API spans with no journey keep a row with a null ``request_id``.

Times are monotonic ns (int64; null when the event is absent): journey events from
``ts.monotonic_ns`` (else ``ts.monotonic`` s), API events from ``event.ts.monotonic`` s.
Step columns are ``scheduler.step`` ids (join with the step table's ``step_id``); the
list columns give each preemption's step and output tokens so far, and each resume's step;
``scheduled_done_tokens`` / ``resumed_done_tokens`` are the prompt tokens already computed
when (re)scheduled — prefix-cache hits (null when an event lacks them).
Derived overheads (``pre_queue_us`` = queued − arrival, ``post_finish_us`` = departed −
finished, ``ttft_us``, ``e2e_us``) are in µs.

Lines may come out of order or twice: every "first" time is a minimum, never the first
seen, and repeated events count once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from blis_model.configuration.experiment import Experiment
from blis_model.errors import CorpusError
from blis_model.ingest.otlp import API_SCOPE, JOURNEY_SCOPE, Event, Problem, decode_line, iter_lines
from blis_model.storage import filesystem

REQUEST_ID = "gen_ai.request.id"
TIME_COLUMNS = ("arrival_ns", "queued_ns", "scheduled_ns", "first_token_ns", "finished_ns",
                "departed_ns")  # lifecycle order
STEP_COLUMNS = ("queued_step", "scheduled_step", "first_token_step", "finished_step")
DONE_STATUSES = ("length", "stopped")  # finished normally: a first token must exist

REQUEST_SCHEMA = pa.schema(
    [pa.field("experiment", pa.string()), pa.field("request_id", pa.string()),
     pa.field("api_request_id", pa.string())]
    + [pa.field(c, pa.int64()) for c in TIME_COLUMNS + ("aborted_ns",)]
    + [pa.field(c, pa.int64()) for c in STEP_COLUMNS]
    + [pa.field(c, pa.int64()) for c in ("num_preemptions", "num_resumes",
                                         "unresumed_preemptions", "prompt_tokens",
                                         "output_tokens", "max_tokens")]
    + [pa.field("scheduled_done_tokens", pa.int64())]
    + [pa.field(c, pa.list_(pa.int64())) for c in ("preempted_steps", "preempted_outputs",
                                                   "resumed_steps", "resumed_done_tokens")]
    + [pa.field("finish_status", pa.string()), pa.field("abort_reason", pa.string())]
    + [pa.field(c, pa.float64()) for c in ("pre_queue_us", "post_finish_us", "ttft_us",
                                           "e2e_us")]
)


def _earlier(current: tuple[int, Any] | None, time_ns: int, value: Any) -> tuple[int, Any]:
    return (time_ns, value) if current is None or time_ns < current[0] else current


@dataclass
class _Journey:
    queued: tuple[int, Any] | None = None  # (time ns, scheduler step)
    scheduled: list[tuple[int, Any, Any]] = field(default_factory=list)  # ns, step, done
    first_token: tuple[int, Any] | None = None
    finished: tuple[int, Any] | None = None
    status: str | None = None
    preempted: list[tuple[int, Any, Any]] = field(default_factory=list)  # (ns, step, output)
    prompt: int | None = None
    output: int | None = None
    max_tokens: int | None = None


@dataclass
class _Api:
    arrival: int | None = None
    departed: int | None = None
    aborted: int | None = None
    abort_reason: str | None = None
    prompt: int | None = None
    output: int | None = None
    max_tokens: int | None = None


def _max(current: int | None, value: Any) -> int | None:
    if value is None:
        return current
    return int(value) if current is None else max(current, int(value))


def _seconds_to_ns(value: Any) -> int | None:
    return None if value is None else int(round(float(value) * 1e9))


def _journey_time(attrs: dict[str, Any]) -> int | None:
    if attrs.get("ts.monotonic_ns") is not None:
        return int(attrs["ts.monotonic_ns"])
    return _seconds_to_ns(attrs.get("ts.monotonic"))


def unresumed_preemptions(preempted: list[int], resumed: list[int]) -> int:
    """Preemptions (times, ns) not followed by a later resume before the next preemption."""
    preempted, resumed = sorted(preempted), sorted(resumed)
    missing, j = 0, 0
    for i, t in enumerate(preempted):
        nxt = preempted[i + 1] if i + 1 < len(preempted) else None
        while j < len(resumed) and resumed[j] <= t:
            j += 1
        if j < len(resumed) and (nxt is None or resumed[j] <= nxt):
            j += 1
        else:
            missing += 1
    return missing


@dataclass
class RequestTableBuilder:
    """Accumulates journey and API events of one experiment; :meth:`table` joins them."""

    experiment: str
    _journeys: dict[str, _Journey] = field(default_factory=dict)
    _apis: dict[str, _Api] = field(default_factory=dict)

    def add(self, event: Event) -> None:
        if event.scope == JOURNEY_SCOPE:
            self._add_journey(event)
        elif event.scope == API_SCOPE:
            self._add_api(event)

    def add_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.add(event)

    def _add_journey(self, event: Event) -> None:
        rid = event.span_attrs.get(REQUEST_ID)
        if rid is None or not event.name.startswith("journey."):
            return
        j = self._journeys.setdefault(str(rid), _Journey())
        a = event.attrs
        t = _journey_time(a)
        j.prompt = _max(j.prompt, a.get("prefill.total_tokens"))
        j.output = _max(j.output, a.get("decode.done_tokens"))
        j.max_tokens = _max(j.max_tokens, a.get("decode.max_tokens"))
        if t is None:
            return
        step = a.get("scheduler.step")
        kind = event.name[len("journey."):]
        if kind == "QUEUED":
            j.queued = _earlier(j.queued, t, step)
        elif kind == "SCHEDULED":
            j.scheduled.append((t, step, a.get("prefill.done_tokens")))
        elif kind == "FIRST_TOKEN":
            j.first_token = _earlier(j.first_token, t, step)
        elif kind == "PREEMPTED":
            j.preempted.append((t, step, a.get("decode.done_tokens")))
        elif kind == "FINISHED":
            j.finished = _earlier(j.finished, t, step)
            j.status = a.get("finish.status", j.status)

    def _add_api(self, event: Event) -> None:
        rid = event.span_attrs.get(REQUEST_ID)
        if rid is None:
            return
        api = self._apis.setdefault(str(rid), _Api())
        s = event.span_attrs
        api.prompt = _max(api.prompt, s.get("gen_ai.usage.prompt_tokens"))
        api.output = _max(api.output, s.get("gen_ai.usage.completion_tokens"))
        api.max_tokens = _max(api.max_tokens, s.get("gen_ai.request.max_tokens"))
        t = _seconds_to_ns(event.attrs.get("event.ts.monotonic"))
        if t is None:
            return
        if event.name == "api.ARRIVED":
            api.arrival = t if api.arrival is None else min(api.arrival, t)
        elif event.name == "api.DEPARTED":
            api.departed = t if api.departed is None else min(api.departed, t)
        elif event.name == "api.ABORTED":
            api.aborted = t if api.aborted is None else min(api.aborted, t)
            api.abort_reason = event.attrs.get("reason", api.abort_reason)

    def _api_for(self, journey_id: str) -> str | None:
        """Longest API id that is ``journey_id`` itself or a ``-``-delimited prefix of it."""
        candidate = journey_id
        while True:
            if candidate in self._apis:
                return candidate
            if "-" not in candidate:
                return None
            candidate = candidate.rsplit("-", 1)[0]

    def table(self) -> pa.Table:
        """The joined request table (schema ``REQUEST_SCHEMA``), sorted by arrival/queue time."""
        rows: list[dict[str, Any]] = []
        joined: set[str] = set()
        for jid, j in self._journeys.items():
            api_id = self._api_for(jid)
            if api_id is not None:
                joined.add(api_id)
            rows.append(self._row(jid, j, api_id, self._apis.get(api_id or "")))
        for api_id, api in self._apis.items():
            if api_id not in joined:
                rows.append(self._row(None, None, api_id, api))
        rows.sort(key=lambda r: (r["arrival_ns"] if r["arrival_ns"] is not None
                                 else r["queued_ns"] if r["queued_ns"] is not None else 0,
                                 r["request_id"] or r["api_request_id"] or ""))
        columns = {f.name: [r[f.name] for r in rows] for f in REQUEST_SCHEMA}
        return pa.table({name: pa.array(values, REQUEST_SCHEMA.field(name).type)
                         for name, values in columns.items()}, schema=REQUEST_SCHEMA)

    def _row(self, jid: str | None, j: _Journey | None, api_id: str | None,
             api: _Api | None) -> dict[str, Any]:
        j = j or _Journey()
        api = api or _Api()
        # sets: a line exported twice (an exporter retry) must not invent a resume
        scheduled = sorted(set(j.scheduled), key=lambda ts: (ts[0], str(ts[1:])))
        first_sched = scheduled[0] if scheduled else None
        resumes = [s[0] for s in scheduled[1:]]
        preempted = sorted(set(j.preempted), key=lambda p: (p[0], str(p[1:])))
        preempt_times = [p[0] for p in preempted]

        def ints(values: list[Any]) -> list[int] | None:
            return None if any(v is None for v in values) else [int(v) for v in values]

        def part(pair: tuple | None, index: int) -> Any:
            return None if pair is None or pair[index] is None else int(pair[index])

        row: dict[str, Any] = {
            "experiment": self.experiment, "request_id": jid, "api_request_id": api_id,
            "arrival_ns": api.arrival, "queued_ns": part(j.queued, 0),
            "scheduled_ns": part(first_sched, 0), "first_token_ns": part(j.first_token, 0),
            "finished_ns": part(j.finished, 0), "departed_ns": api.departed,
            "aborted_ns": api.aborted,
            "queued_step": part(j.queued, 1), "scheduled_step": part(first_sched, 1),
            "first_token_step": part(j.first_token, 1), "finished_step": part(j.finished, 1),
            "num_preemptions": len(preempted), "num_resumes": len(resumes),
            "unresumed_preemptions": unresumed_preemptions(preempt_times, resumes),
            "preempted_steps": ints([p[1] for p in preempted]),
            "preempted_outputs": ints([p[2] for p in preempted]),
            "resumed_steps": ints([s[1] for s in scheduled[1:]]),
            "scheduled_done_tokens": part(first_sched, 2),
            "resumed_done_tokens": ints([s[2] for s in scheduled[1:]]),
            "prompt_tokens": j.prompt if j.prompt is not None else api.prompt,
            "output_tokens": j.output if j.output is not None else api.output,
            "max_tokens": j.max_tokens if j.max_tokens is not None else api.max_tokens,
            "finish_status": j.status if j.status is not None else (
                "aborted" if api.aborted is not None else None),
            "abort_reason": api.abort_reason,
        }

        def span_us(start: str, end: str) -> float | None:
            if row[start] is None or row[end] is None:
                return None
            return (row[end] - row[start]) / 1e3

        row["pre_queue_us"] = span_us("arrival_ns", "queued_ns")
        row["post_finish_us"] = span_us("finished_ns", "departed_ns")
        row["ttft_us"] = span_us("arrival_ns", "first_token_ns")
        row["e2e_us"] = span_us("arrival_ns", "departed_ns")
        return row


def request_table(events: Iterable[Event], experiment: str = "") -> pa.Table:
    """The request table of an event stream (see the module docstring)."""
    builder = RequestTableBuilder(experiment)
    builder.add_all(events)
    return builder.table()


# a scope name followed by its closing quote: "vllm.scheduler" but not "vllm.scheduler.step"
_SCOPE_MARKERS = (f'{JOURNEY_SCOPE}"'.encode(), f'{API_SCOPE}"'.encode())


def _complete(line: bytes) -> bool:
    return (line[:1] == b"{" and line[-1:] == b"}" and line.count(b"{") == line.count(b"}")
            and line.count(b"[") == line.count(b"]"))


def iter_request_events(raw: BinaryIO, name: str, problems: list[Problem]) -> Iterator[Event]:
    """Journey and API events of one trace file. Lines that hold neither scope (step
    tracing: most of the bytes) are skipped without decoding; any line that is not
    structurally complete JSON is still decoded, so it is reported in ``problems``."""
    for lineno, line in iter_lines(raw, name, problems):
        if not any(m in line for m in _SCOPE_MARKERS) and _complete(line):
            continue
        try:
            events = decode_line(line)
        except ValueError as exc:
            problems.append(Problem(name, lineno, str(exc)))
            continue
        yield from (e for e in events if e.scope in (JOURNEY_SCOPE, API_SCOPE))


def read_request_table(experiment: Experiment, options: dict | None = None
                       ) -> tuple[pa.Table, list[Problem]]:
    """Stream ``experiment``'s traces into its request table. Malformed lines are returned
    as problems, never raised; an experiment without traces yields an empty table."""
    problems: list[Problem] = []
    if experiment.trace_url is None:
        problems.append(Problem(f"{experiment.name}/traces.json", 0, "no trace file"))
        return REQUEST_SCHEMA.empty_table(), problems
    fs, path = filesystem(experiment.trace_url, options)
    label = f"{experiment.name}/{path.rsplit('/', 1)[-1]}"
    builder = RequestTableBuilder(experiment.name)
    with fs.open(path, "rb", block_size=8 << 20) as raw:
        builder.add_all(iter_request_events(raw, label, problems))
    return builder.table(), problems


# -- validation ----------------------------------------------------------------------
@dataclass(frozen=True)
class RequestValidation:
    """Per-experiment validation of a request table. ``reasons`` counts requests failing
    each check (a request may fail several); ``examples`` names a few failing requests."""

    experiment: str
    n_requests: int
    n_failed: int
    reasons: dict[str, int]
    examples: tuple[str, ...] = ()

    @property
    def failure_rate(self) -> float:
        return self.n_failed / self.n_requests if self.n_requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "n_requests": self.n_requests,
                "n_failed": self.n_failed, "failure_rate": self.failure_rate,
                "reasons": dict(self.reasons), "examples": list(self.examples)}

    def check(self, max_failure_rate: float) -> None:
        """Raise CorpusError when more than ``max_failure_rate`` (0..1) of requests fail."""
        if self.failure_rate > max_failure_rate:
            worst = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items(),
                                                             key=lambda kv: -kv[1]))
            raise CorpusError(
                f"experiment {self.experiment}: {self.n_failed}/{self.n_requests} requests "
                f"({self.failure_rate:.1%}) fail validation, above the {max_failure_rate:.1%} "
                f"gate ({worst}); e.g. {'; '.join(self.examples[:3])}")


def _values(table: pa.Table, name: str) -> np.ndarray:
    """A column as float64 with NaN for null (ns fit exactly below 2**53; ordering of
    larger values is preserved because rounding is monotone)."""
    col = table.column(name)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64) if len(col) else (
        np.zeros(0))


def _out_of_order(matrix: np.ndarray) -> np.ndarray:
    """Rows whose non-null values decrease somewhere (nulls are skipped)."""
    bad = np.zeros(len(matrix), bool)
    running = np.full(len(matrix), -np.inf)
    for col in matrix.T:
        present = ~np.isnan(col)
        bad |= present & (col < running)
        running = np.where(present, np.maximum(running, col), running)
    return bad


def request_failures(table: pa.Table, max_num_batched_tokens: int | None = None
                     ) -> dict[str, np.ndarray]:
    """Boolean mask per failed check (only checks that fail somewhere are returned).

    Checks: journey present (unless aborted before the engine); API present (when the
    table has API spans at all); QUEUED, SCHEDULED and FINISHED present (unless aborted);
    FIRST_TOKEN present for normally finished requests; DEPARTED/ABORTED present (with
    API spans); times and step ids non-decreasing along the lifecycle; every preemption
    followed by a resume (unless aborted). With ``max_num_batched_tokens``: the prefill of
    a never-preempted request spans at least ⌈(prompt − tokens already computed when
    scheduled, i.e. prefix-cache hits) / budget⌉ steps (``prefill_too_fast``).
    """
    n = table.num_rows
    status = np.asarray(table.column("finish_status").to_pylist() if n else [], dtype=object)
    has_journey = np.asarray(table.column("request_id").is_valid()) if n else np.zeros(0, bool)
    has_api = np.asarray(table.column("api_request_id").is_valid()) if n else np.zeros(0, bool)
    t = {c: _values(table, c) for c in TIME_COLUMNS + ("aborted_ns",)}
    done = np.isin(status, DONE_STATUSES)
    aborted = status == "aborted"
    checks = {
        "no_journey": ~has_journey & ~aborted,
        "no_api": has_journey & ~has_api & bool(has_api.any()),
        "missing_queued": has_journey & np.isnan(t["queued_ns"]),
        "missing_scheduled": has_journey & ~aborted & np.isnan(t["scheduled_ns"]),
        "missing_finished": has_journey & ~aborted & np.isnan(t["finished_ns"]),
        "missing_first_token": has_journey & done & np.isnan(t["first_token_ns"]),
        "missing_arrival": has_api & np.isnan(t["arrival_ns"]),
        "missing_departed": has_api & np.isnan(t["departed_ns"]) & np.isnan(t["aborted_ns"]),
        "time_order": _out_of_order(np.column_stack([t[c] for c in TIME_COLUMNS])
                                    if n else np.zeros((0, len(TIME_COLUMNS)))),
        "step_order": _out_of_order(np.column_stack([_values(table, c) for c in STEP_COLUMNS])
                                    if n else np.zeros((0, len(STEP_COLUMNS)))),
        "unresumed_preemption": (_values(table, "unresumed_preemptions") > 0) & ~aborted,
    }
    if max_num_batched_tokens:
        steps = _values(table, "first_token_step") - _values(table, "scheduled_step") + 1
        hit = np.nan_to_num(_values(table, "scheduled_done_tokens"))  # prefix-cache hits
        needed = np.ceil((_values(table, "prompt_tokens") - hit) / max_num_batched_tokens)
        never_preempted = _values(table, "num_preemptions") == 0
        with np.errstate(invalid="ignore"):
            checks["prefill_too_fast"] = never_preempted & (steps < needed)
    return {name: mask for name, mask in checks.items() if mask.any()}


def validate_requests(table: pa.Table, experiment: str = "", max_examples: int = 10,
                      max_num_batched_tokens: int | None = None) -> RequestValidation:
    """Validate every request of ``table`` (see :func:`request_failures`)."""
    if not experiment and table.num_rows:
        experiment = str(table.column("experiment")[0].as_py() or "")
    failures = request_failures(table, max_num_batched_tokens)
    failed = np.zeros(table.num_rows, bool)
    for mask in failures.values():
        failed |= mask
    examples: list[str] = []
    ids = table.column("request_id").to_pylist() if failures else []
    api_ids = table.column("api_request_id").to_pylist() if failures else []
    for i in np.flatnonzero(failed)[:max_examples]:
        why = ",".join(name for name, mask in failures.items() if mask[i])
        examples.append(f"{ids[i] or api_ids[i]}: {why}")
    return RequestValidation(experiment=experiment, n_requests=table.num_rows,
                             n_failed=int(failed.sum()),
                             reasons={k: int(v.sum()) for k, v in failures.items()},
                             examples=tuple(examples))


def overload_indicators(table: pa.Table) -> dict[str, float]:
    """Signs that an experiment ran past its capacity (to exclude it or model it apart):
    shares of requests preempted / aborted, median and p90 queue wait (ms, queued →
    scheduled), and ``wait_growth``: median wait of the last third of requests (by
    arrival) over the first third's (≫ 1 when the queue keeps growing)."""
    n = table.num_rows
    if not n:
        return {"requests": 0}
    wait_ms = (_values(table, "scheduled_ns") - _values(table, "queued_ns")) / 1e6
    status = table.column("finish_status").to_pylist()
    order = wait_ms[np.isfinite(wait_ms)]
    third = max(len(order) // 3, 1)
    first, last = np.median(order[:third]) if len(order) else np.nan, (
        np.median(order[-third:]) if len(order) else np.nan)
    return {
        "requests": n,
        "preempted_share": float(np.mean(_values(table, "num_preemptions") > 0)),
        "aborted_share": float(np.mean([s == "aborted" for s in status])),
        "wait_median_ms": float(np.median(order)) if len(order) else float("nan"),
        "wait_p90_ms": float(np.percentile(order, 90)) if len(order) else float("nan"),
        "wait_growth": float(last / max(first, 1e-3)) if len(order) else float("nan"),
    }
