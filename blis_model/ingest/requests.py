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

``RequestTableBuilder`` takes the journey and API events as the block decoder's columns
(or as decoded events) and builds the table with numpy; the event-by-event
``_EventBuilder`` is the reference semantics, and still rebuilds the few requests with
unusual values (see ``RequestTableBuilder``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from blis_model.configuration.experiment import Experiment
from blis_model.errors import CorpusError
from blis_model.ingest.otlp import (
    API_SCOPE,
    JOURNEY_SCOPE,
    Event,
    Problem,
    decode_line,
    iter_lines,
)
from blis_model.ingest.scan import MISSING_INT, EventColumns, Wanted
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
class _EventBuilder:
    """The request table event by event (the reference semantics, kept for the requests
    :class:`RequestTableBuilder` cannot take in bulk: unusual value types, ties)."""

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


JOURNEY_KINDS = ("QUEUED", "SCHEDULED", "FIRST_TOKEN", "PREEMPTED", "FINISHED")
API_KINDS = ("ARRIVED", "DEPARTED", "ABORTED")
_J_INTS = ("ts.monotonic_ns", "scheduler.step", "prefill.done_tokens", "prefill.total_tokens",
           "decode.done_tokens", "decode.max_tokens")
REQUEST_EVENTS: tuple[Wanted, ...] = (
    *(Wanted(JOURNEY_SCOPE, f"journey.{kind}", numbers=("ts.monotonic",),
             strings=("finish.status",) if kind == "FINISHED" else (), ints=_J_INTS,
             strict=True) for kind in JOURNEY_KINDS),
    *(Wanted(API_SCOPE, f"api.{kind}", numbers=("event.ts.monotonic",),
             strings=("reason",) if kind == "ABORTED" else (), strict=True)
      for kind in API_KINDS),
)
"""The journey and API events the request table reads, for the block decoder: attributes
spelled otherwise than these roles leave an event whole (then :class:`_EventBuilder`)."""
_J_CODE = {kind: i for i, kind in enumerate(JOURNEY_KINDS)}
_A_CODE = {f"api.{kind}": i for i, kind in enumerate(API_KINDS)}
QUEUED, SCHEDULED, FIRST_TOKEN, PREEMPTED, FINISHED = range(len(JOURNEY_KINDS))
OTHER = len(JOURNEY_KINDS)  # another journey.* event: only its token counts matter
ARRIVED, DEPARTED, ABORTED = range(len(API_KINDS))
_NO = MISSING_INT
_J_FIELDS = ("kind", "rid", "seq", "t", "step", "done", "total", "output", "max_tokens",
             "status")
_A_FIELDS = ("kind", "rid", "seq", "t", "reason")


def _plain_int(value: Any) -> bool:
    return value is None or (type(value) is int and _NO < value < -_NO)


def _plain_seconds(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and abs(value) < 9e9)


def _ns(value: Any) -> int:
    return _NO if value is None else value


def _seconds(values: np.ndarray) -> np.ndarray:
    """``_seconds_to_ns`` of a float column (NaN: absent → MISSING_INT)."""
    ok = np.isfinite(values)
    out = np.full(len(values), _NO, np.int64)
    out[ok] = np.round(values[ok] * 1e9).astype(np.int64)
    return out


def _first(keys: tuple[np.ndarray, ...], group: np.ndarray, size: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """(groups present, index of each one's first row when sorted by ``keys`` — the last
    key is the primary one, as in ``np.lexsort`` — within its group)."""
    order = np.lexsort((*keys, group))
    g = group[order]
    head = np.ones(len(g), bool)
    head[1:] = g[1:] != g[:-1]
    return g[head], order[head]


class RequestTableBuilder:
    """Accumulates the journey and API events of one experiment — decoded events
    (:meth:`add`, file order) or the block decoder's columns (:meth:`add_columns`, kinds
    :data:`REQUEST_EVENTS`) — and joins them into the request table (:meth:`table`).

    The table is built with numpy over all events at once. A request with an unusual
    value (a step that is not an integer, a time spelled as a string, ...) or with two
    different (re)schedules or preemptions at the same instant is rebuilt by
    :class:`_EventBuilder`, the event-by-event reference, from all its events in file
    order; the table is the reference's either way."""

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        self._count = 0  # events added one by one (their order when no seq is given)
        self._j_chunks: list[dict[str, Any]] = []
        self._j_rows: list[tuple] = []
        self._j_odd: dict[str, list[tuple[int, Event]]] = {}
        self._a_chunks: list[dict[str, Any]] = []
        self._a_rows: list[tuple] = []
        self._a_odd: dict[str, list[tuple[int, Event]]] = {}
        self._a_spans: dict[str, list[int | None]] = {}  # api id → prompt, output, max tokens

    # -- input ---------------------------------------------------------------------
    def add(self, event: Event, seq: int | None = None) -> None:
        """One decoded event (any scope; only journey and API events count). ``seq``
        orders events across calls (default: the order of the calls)."""
        if seq is None:
            seq = self._count
        self._count += 1
        if event.scope == JOURNEY_SCOPE:
            self._add_journey(event, seq)
        elif event.scope == API_SCOPE:
            self._add_api(event, seq)

    def add_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.add(event)

    def _add_journey(self, event: Event, seq: int) -> None:
        rid = event.span_attrs.get(REQUEST_ID)
        if rid is None or not event.name.startswith("journey."):
            return
        rid = str(rid)
        a = event.attrs
        kind = _J_CODE.get(event.name[len("journey."):], OTHER)
        values = [a.get(k) for k in _J_INTS]
        seconds = a.get("ts.monotonic")
        status = a.get("finish.status")
        if (rid in self._j_odd or not all(map(_plain_int, values))
                or not _plain_seconds(seconds)
                or (kind == FINISHED and "finish.status" in a and type(status) is not str)):
            self._j_odd.setdefault(rid, []).append((seq, event))
            return
        ts_ns, step, done, total, output, max_tokens = map(_ns, values)
        if ts_ns == _NO and seconds is not None:
            ts_ns = int(round(float(seconds) * 1e9))
        self._j_rows.append((kind, rid, seq, ts_ns, step, done, total, output, max_tokens,
                             status if kind == FINISHED else None))

    def _span(self, rid: str, span: dict[str, Any]) -> None:
        acc = self._a_spans.setdefault(rid, [None, None, None])
        acc[0] = _max(acc[0], span.get("gen_ai.usage.prompt_tokens"))
        acc[1] = _max(acc[1], span.get("gen_ai.usage.completion_tokens"))
        acc[2] = _max(acc[2], span.get("gen_ai.request.max_tokens"))

    def _add_api(self, event: Event, seq: int) -> None:
        rid = event.span_attrs.get(REQUEST_ID)
        if rid is None:
            return
        rid = str(rid)
        self._span(rid, event.span_attrs)
        kind = _A_CODE.get(event.name)
        if kind is None:
            return
        seconds = event.attrs.get("event.ts.monotonic")
        reason = event.attrs.get("reason")
        if (rid in self._a_odd or not _plain_seconds(seconds)
                or (kind == ABORTED and "reason" in event.attrs and type(reason) is not str)):
            self._a_odd.setdefault(rid, []).append((seq, event))
            return
        t = _NO if seconds is None else int(round(float(seconds) * 1e9))
        self._a_rows.append((kind, rid, seq, t, reason if kind == ABORTED else None))

    def add_columns(self, cols: EventColumns) -> None:
        """Columns of one kind of :data:`REQUEST_EVENTS` (with span attributes and seq)."""
        w = cols.wanted
        if not cols.size or cols.span_attrs is None or cols.seq is None:
            return
        spans = cols.span_attrs
        rids = [s.get(REQUEST_ID) for s in spans]
        keep = np.array([r is not None for r in rids], bool)
        rid = [str(r) for r in rids if r is not None]
        if w.scope == JOURNEY_SCOPE and w.name.startswith("journey."):
            ints = cols.ints
            ts_ns = ints["ts.monotonic_ns"][keep]
            t = np.where(ts_ns != _NO, ts_ns, _seconds(cols.numbers["ts.monotonic"][keep]))
            kind = _J_CODE.get(w.name[len("journey."):], OTHER)
            status = (cols.strings["finish.status"] if kind == FINISHED
                      else [None] * cols.size)
            self._j_chunks.append({
                "kind": np.full(len(rid), kind, np.int64), "rid": rid,
                "seq": cols.seq[keep], "t": t, "step": ints["scheduler.step"][keep],
                "done": ints["prefill.done_tokens"][keep],
                "total": ints["prefill.total_tokens"][keep],
                "output": ints["decode.done_tokens"][keep],
                "max_tokens": ints["decode.max_tokens"][keep],
                "status": [None if s is None else s.decode("utf-8", "surrogatepass")
                           for s, k in zip(status, keep.tolist(), strict=True) if k]})
        elif w.scope == API_SCOPE:
            done: set[int] = set()
            for r, span in zip(rids, spans, strict=True):
                if r is not None and id(span) not in done:
                    done.add(id(span))
                    self._span(str(r), span)
            kind = _A_CODE.get(w.name)
            if kind is None:
                return
            reason = cols.strings["reason"] if kind == ABORTED else [None] * cols.size
            self._a_chunks.append({
                "kind": np.full(len(rid), kind, np.int64), "rid": rid,
                "seq": cols.seq[keep], "t": _seconds(cols.numbers["event.ts.monotonic"][keep]),
                "reason": [None if x is None else x.decode("utf-8", "surrogatepass")
                           for x, k in zip(reason, keep.tolist(), strict=True) if k]})

    # -- output --------------------------------------------------------------------
    @staticmethod
    def _gather(chunks: list[dict[str, Any]], rows: list[tuple], fields: tuple[str, ...]
                ) -> dict[str, Any]:
        """All events as columns (object columns for ids and strings)."""
        out: dict[str, Any] = {}
        for i, name in enumerate(fields):
            parts = [c[name] for c in chunks]
            extra = [row[i] for row in rows]
            if name in ("rid", "status", "reason"):
                out[name] = np.array([x for p in parts for x in p] + extra + [None],
                                     dtype=object)[:-1]
            else:
                out[name] = np.concatenate([*parts, np.array(extra, np.int64)]
                                           if parts or extra else [np.zeros(0, np.int64)])
        return out

    def table(self) -> pa.Table:
        """The joined request table (schema ``REQUEST_SCHEMA``), sorted by arrival/queue
        time."""
        j = self._gather(self._j_chunks, self._j_rows, _J_FIELDS)
        a = self._gather(self._a_chunks, self._a_rows, _A_FIELDS)
        journeys = _journey_columns(j, set(self._j_odd))
        odd = journeys.pop("odd")
        # requests the reference rebuilds: all their events, in file order
        for rid in sorted(odd):
            events = list(self._j_odd.get(rid, ())) + _journey_events(j, rid)
            events.sort(key=lambda pair: pair[0])
            ref = _EventBuilder(self.experiment)
            for _, event in events:
                ref.add(event)
            journeys["rows"][rid] = ref._row(rid, ref._journeys.get(rid), None, None)
        apis = _api_columns(a, self._a_spans, set(self._a_odd))
        for rid in apis.pop("odd"):
            events = list(self._a_odd.get(rid, ())) + _api_events(a, rid)
            events.sort(key=lambda pair: pair[0])
            ref = _EventBuilder(self.experiment)
            for _, event in events:
                ref.add(event)
            api = ref._apis.get(rid) or _Api()
            api.prompt, api.output, api.max_tokens = self._a_spans[rid]
            apis["rows"][rid] = api
        return _join(self.experiment, journeys, apis)


def _journey_events(j: dict[str, Any], rid: str) -> list[tuple[int, Event]]:
    """The events of journey ``rid`` back as decoded events (for the reference)."""
    out = []
    for i in np.flatnonzero(j["rid"] == rid).tolist():
        kind = int(j["kind"][i])
        attrs: dict[str, Any] = {}
        for key, name in zip(_J_INTS, ("t", "step", "done", "total", "output", "max_tokens"),
                             strict=True):
            value = int(j[name][i])
            if value != _NO:
                attrs[key] = value
        if j["status"][i] is not None:
            attrs["finish.status"] = j["status"][i]
        name = f"journey.{JOURNEY_KINDS[kind]}" if kind < OTHER else "journey.OTHER"
        out.append((int(j["seq"][i]), Event(JOURNEY_SCOPE, name, 0, attrs, "llm_core",
                                            {REQUEST_ID: rid})))
    return out


def _api_events(a: dict[str, Any], rid: str) -> list[tuple[int, Event]]:
    out = []
    for i in np.flatnonzero(a["rid"] == rid).tolist():
        attrs: dict[str, Any] = {}
        t = int(a["t"][i])
        if t != _NO:
            attrs["event.ts.monotonic"] = t / 1e9  # only the rebuilt event's own ns count
        if a["reason"][i] is not None:
            attrs["reason"] = a["reason"][i]
        out.append((int(a["seq"][i]), Event(API_SCOPE, f"api.{API_KINDS[int(a['kind'][i])]}",
                                            0, attrs, "llm_request", {REQUEST_ID: rid})))
    return out


def _api_replay(a: dict[str, Any], rid: str, odd: list[tuple[int, Event]]) -> _Api:
    """The reference's arrival, departure, abort and reason of API id ``rid`` from its
    events in file order (the plain ones as columns, the unusual ones whole)."""
    items: list[tuple[int, int, Any, bool, Any]] = []  # seq, kind, t, has reason, reason
    for i in np.flatnonzero(a["rid"] == rid).tolist():
        t = int(a["t"][i])
        reason = a["reason"][i]
        items.append((int(a["seq"][i]), int(a["kind"][i]), None if t == _NO else t,
                      reason is not None, reason))
    for seq, event in odd:
        items.append((seq, _A_CODE[event.name], _seconds_to_ns(event.attrs.get(
            "event.ts.monotonic")), "reason" in event.attrs, event.attrs.get("reason")))
    api = _Api()
    for _, kind, t, has_reason, reason in sorted(items, key=lambda item: item[0]):
        if t is None:
            continue
        if kind == ARRIVED:
            api.arrival = t if api.arrival is None else min(api.arrival, t)
        elif kind == DEPARTED:
            api.departed = t if api.departed is None else min(api.departed, t)
        else:
            api.aborted = t if api.aborted is None else min(api.aborted, t)
            if has_reason:
                api.abort_reason = reason
    return api


def _codes(values: np.ndarray, extra: Iterable[str] = ()) -> tuple[np.ndarray, list[str]]:
    """(code per value, distinct values in first-seen order, then ``extra`` not seen)."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values.tolist()), np.int64,
                        len(values))
    for v in extra:
        index.setdefault(v, len(index))
    return codes, list(index)


def _timeline(r: np.ndarray, t: np.ndarray, a: np.ndarray, b: np.ndarray, size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (t, a, b) per group sorted by t, as the reference's ``sorted(set(...))``:
    (group, t, a, b) of the sorted distinct rows, and the groups where two distinct rows
    share a time (the reference then orders them by their text: left to it)."""
    order = np.lexsort((b, a, t, r))
    r, t, a, b = r[order], t[order], a[order], b[order]
    new = np.ones(len(r), bool)
    new[1:] = (r[1:] != r[:-1]) | (t[1:] != t[:-1]) | (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    r, t, a, b = r[new], t[new], a[new], b[new]
    tie = (r[1:] == r[:-1]) & (t[1:] == t[:-1])
    return r, t, a, b, np.unique(r[1:][tie])


def _journey_columns(j: dict[str, Any], odd: set[str]) -> dict[str, Any]:
    """Per journey id: every journey-side column of the request table."""
    r, ids = _codes(j["rid"], sorted(odd))
    n = len(ids)
    kind, seq, t, step = j["kind"], j["seq"], j["t"], j["step"]
    out: dict[str, Any] = {"ids": ids, "rows": {}}
    for name in ("total", "output", "max_tokens"):
        acc = np.full(n, _NO, np.int64)
        np.maximum.at(acc, r, j[name])
        out[name] = acc
    timed = t != _NO
    for name, code in (("queued", QUEUED), ("first_token", FIRST_TOKEN),
                       ("finished", FINISHED)):
        m = np.flatnonzero(timed & (kind == code))
        g, first = _first((seq[m], t[m]), r[m], n)
        out[f"{name}_ns"] = np.full(n, _NO, np.int64)
        out[f"{name}_step"] = np.full(n, _NO, np.int64)
        out[f"{name}_ns"][g] = t[m][first]
        out[f"{name}_step"][g] = step[m][first]
    status = np.full(n, None, dtype=object)
    m = np.flatnonzero(timed & (kind == FINISHED) & (j["status"] != None))  # noqa: E711
    g, last = _first((-seq[m],), r[m], n)
    status[g] = j["status"][m][last]
    out["status"] = status
    m = np.flatnonzero(timed & (kind == SCHEDULED))
    sched = _timeline(r[m], t[m], step[m], j["done"][m], n)
    m = np.flatnonzero(timed & (kind == PREEMPTED))
    pre = _timeline(r[m], t[m], step[m], j["output"][m], n)
    odd = odd | {ids[i] for i in np.concatenate([sched[4], pre[4]]).tolist()}
    n_sched = np.bincount(sched[0], minlength=n)
    n_pre = np.bincount(pre[0], minlength=n)
    s_at = np.concatenate([[0], np.cumsum(n_sched)])
    p_at = np.concatenate([[0], np.cumsum(n_pre)])
    has = n_sched > 0
    for name, col in (("scheduled_ns", 1), ("scheduled_step", 2), ("scheduled_done", 3)):
        out[name] = np.full(n, _NO, np.int64)
        out[name][has] = sched[col][s_at[:-1][has]]
    out["num_preemptions"] = n_pre
    out["num_resumes"] = np.maximum(n_sched - 1, 0)
    unresumed = np.zeros(n, np.int64)
    empty: list[int] = []  # shared: read only
    lists: dict[str, list[list[int] | None]] = {
        name: [empty] * n for name in ("preempted_steps", "preempted_outputs",
                                       "resumed_steps", "resumed_done_tokens")}

    def ints(values: np.ndarray) -> list[int] | None:
        return None if (values == _NO).any() else values.tolist()

    for i in np.flatnonzero((n_sched > 1) | (n_pre > 0)).tolist():
        s = slice(s_at[i] + 1, s_at[i + 1])
        p = slice(p_at[i], p_at[i + 1])
        lists["preempted_steps"][i] = ints(pre[2][p])
        lists["preempted_outputs"][i] = ints(pre[3][p])
        lists["resumed_steps"][i] = ints(sched[2][s])
        lists["resumed_done_tokens"][i] = ints(sched[3][s])
        unresumed[i] = unresumed_preemptions(pre[1][p].tolist(), sched[1][s].tolist())
    out["unresumed"] = unresumed
    out.update(lists)
    out["odd"] = odd
    return out


def _api_columns(a: dict[str, Any], spans: dict[str, list[int | None]], odd: set[str]
                 ) -> dict[str, Any]:
    """Per API id: arrival, departure, abort (ns), abort reason, and token counts."""
    ids = list(spans)
    index = {rid: i for i, rid in enumerate(ids)}
    n = len(ids)
    r = np.fromiter((index[x] for x in a["rid"].tolist()), np.int64, len(a["rid"]))
    kind, t = a["kind"], a["t"]
    timed = t != _NO
    out: dict[str, Any] = {"ids": ids, "index": index, "rows": {}, "odd": odd}
    for name, code in (("arrival", ARRIVED), ("departed", DEPARTED), ("aborted", ABORTED)):
        m = np.flatnonzero(timed & (kind == code))
        acc = np.full(n, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(acc, r[m], t[m])
        out[name] = np.where(acc == np.iinfo(np.int64).max, _NO, acc)
    reason = np.full(n, None, dtype=object)
    m = np.flatnonzero(timed & (kind == ABORTED) & (a["reason"] != None))  # noqa: E711
    g, last = _first((-a["seq"][m],), r[m], n)
    reason[g] = a["reason"][m][last]
    out["reason"] = reason
    for k, name in enumerate(("prompt", "output", "max_tokens")):
        out[name] = np.array([_NO if spans[rid][k] is None else spans[rid][k] for rid in ids],
                             np.int64)
    return out


def _api_for(index: dict[str, int], journey_id: str) -> str | None:
    """Longest API id that is ``journey_id`` itself or a ``-``-delimited prefix of it."""
    candidate = journey_id
    while True:
        if candidate in index:
            return candidate
        if "-" not in candidate:
            return None
        candidate = candidate.rsplit("-", 1)[0]


_J_ROW = {"queued_ns": "queued_ns", "queued_step": "queued_step",
          "scheduled_ns": "scheduled_ns", "scheduled_step": "scheduled_step",
          "scheduled_done": "scheduled_done_tokens", "first_token_ns": "first_token_ns",
          "first_token_step": "first_token_step", "finished_ns": "finished_ns",
          "finished_step": "finished_step", "num_preemptions": "num_preemptions",
          "num_resumes": "num_resumes", "unresumed": "unresumed_preemptions"}


def _join(experiment: str, j: dict[str, Any], a: dict[str, Any]) -> pa.Table:
    """Journeys joined to their API ids, then the API ids no journey joined; sorted."""
    # requests the reference rebuilt override their columns
    where = {rid: i for i, rid in enumerate(j["ids"])} if j["rows"] else {}
    for rid, row in j["rows"].items():
        i = where[rid]
        for mine, theirs in _J_ROW.items():
            j[mine][i] = _NO if row[theirs] is None else row[theirs]
        for mine, theirs in (("total", "prompt_tokens"), ("output", "output_tokens"),
                             ("max_tokens", "max_tokens")):
            j[mine][i] = _NO if row[theirs] is None else row[theirs]
        j["status"][i] = row["finish_status"]
        for name in ("preempted_steps", "preempted_outputs", "resumed_steps",
                     "resumed_done_tokens"):
            j[name][i] = row[name]
    for rid, api in a["rows"].items():
        i = a["index"][rid]
        for name, value in (("arrival", api.arrival), ("departed", api.departed),
                            ("aborted", api.aborted)):
            a[name][i] = _NO if value is None else value
        a["reason"][i] = api.abort_reason
    nj = len(j["ids"])
    api_of = [_api_for(a["index"], jid) for jid in j["ids"]]
    joined = {x for x in api_of if x is not None}
    alone = [rid for rid in a["ids"] if rid not in joined]
    n = nj + len(alone)
    ai = np.array([-1 if x is None else a["index"][x] for x in api_of]
                  + [a["index"][x] for x in alone], np.int64)

    def api(name: str, missing: Any = _NO) -> np.ndarray:
        values = np.append(a[name], np.array([missing], a[name].dtype))
        return values[ai]  # index -1: the appended "missing"

    def journey(name: str, missing: Any = _NO) -> np.ndarray:
        values = j[name]
        return np.concatenate([values, np.full(len(alone), missing, values.dtype)])

    cols: dict[str, Any] = {
        "request_id": np.array(j["ids"] + [None] * len(alone), dtype=object),
        "api_request_id": np.array(api_of + alone, dtype=object),
        "arrival_ns": api("arrival"), "queued_ns": journey("queued_ns"),
        "scheduled_ns": journey("scheduled_ns"), "first_token_ns": journey("first_token_ns"),
        "finished_ns": journey("finished_ns"), "departed_ns": api("departed"),
        "aborted_ns": api("aborted"), "queued_step": journey("queued_step"),
        "scheduled_step": journey("scheduled_step"),
        "first_token_step": journey("first_token_step"),
        "finished_step": journey("finished_step"),
        "num_preemptions": journey("num_preemptions", 0),
        "num_resumes": journey("num_resumes", 0),
        "unresumed_preemptions": journey("unresumed", 0),
        "scheduled_done_tokens": journey("scheduled_done"),
    }
    for mine, name in (("total", "prompt"), ("output", "output"),
                       ("max_tokens", "max_tokens")):
        own = journey(mine)
        cols[f"{name}_tokens" if name != "max_tokens" else name] = np.where(
            own != _NO, own, api(name))
    status = journey("status", None)
    aborted = cols["aborted_ns"] != _NO
    cols["finish_status"] = np.where(status != None, status,  # noqa: E711
                                     np.where(aborted, "aborted", None)).astype(object)
    cols["abort_reason"] = api("reason", None)
    for name in ("preempted_steps", "preempted_outputs", "resumed_steps",
                 "resumed_done_tokens"):
        cols[name] = j[name] + [[] for _ in alone]
    for name, (start, end) in {"pre_queue_us": ("arrival_ns", "queued_ns"),
                               "post_finish_us": ("finished_ns", "departed_ns"),
                               "ttft_us": ("arrival_ns", "first_token_ns"),
                               "e2e_us": ("arrival_ns", "departed_ns")}.items():
        ok = (cols[start] != _NO) & (cols[end] != _NO)
        cols[name] = np.where(ok, (cols[end] - cols[start]) / 1e3, np.nan)
        cols[f"{name}:ok"] = ok
    first = np.where(cols["arrival_ns"] != _NO, cols["arrival_ns"],
                     np.where(cols["queued_ns"] != _NO, cols["queued_ns"], 0)).tolist()
    label = [x or y or "" for x, y in zip(cols["request_id"].tolist(),
                                          cols["api_request_id"].tolist(), strict=True)]
    order = sorted(range(n), key=lambda i: (first[i], label[i]))
    arrays: dict[str, pa.Array] = {"experiment": pa.array([experiment] * n, pa.string())}
    for f in REQUEST_SCHEMA:
        if f.name == "experiment":
            continue
        values = cols[f.name]
        if isinstance(values, list):
            arrays[f.name] = pa.array([values[i] for i in order], f.type)
        elif f.type == pa.int64():
            v = values[order]
            arrays[f.name] = pa.array(v, f.type, mask=v == _NO)
        elif f.type == pa.float64():
            arrays[f.name] = pa.array(values[order], f.type, mask=~cols[f"{f.name}:ok"][order])
        else:
            arrays[f.name] = pa.array(values[order].tolist(), f.type)
    return pa.table(arrays, schema=REQUEST_SCHEMA)


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
