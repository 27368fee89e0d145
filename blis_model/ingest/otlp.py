"""Streaming reader of OTLP JSON-lines trace files (plain or gzip): lines and generic events.

:func:`iter_lines` streams a file's lines (decompressing gzip incrementally, so memory is
bounded by one chunk plus the longest line); :func:`decode_line` turns one line into
:class:`Event` records of every scope through orjson. ``ingest.scan`` builds a faster
columnar decoder for step events on top of the same walker (:func:`walk_export`).

A line that is not valid OTLP JSON, or a truncated / corrupt gzip stream, is recorded as
a :class:`Problem` (file, line, reason) and skipped; reading goes on.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

try:  # ISA-L's inflate (igzip): the zlib API, 2-4x faster; plain zlib where it is missing
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    _inflate = zlib  # type: ignore[assignment]

STEP_SCOPE = "vllm.scheduler.step"
JOURNEY_SCOPE = "vllm.scheduler"
API_SCOPE = "vllm.api"

Attrs = dict[str, Any]

READ_CHUNK = 1 << 20  # compressed bytes read per call
INFLATE_CHUNK = 8 << 20  # max decompressed bytes produced per call
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Problem:
    """One unreadable piece of input: where it is and why it was skipped."""

    file: str
    line: int  # 1-based line number (0 = the file as a whole)
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Event:
    """One OTLP span event with its span's identity. Attribute values are decoded
    (ints as int, doubles as float, strings as str, bools as bool)."""

    scope: str
    name: str
    time_ns: int
    attrs: Attrs
    span_name: str = ""
    span_attrs: Attrs = field(default_factory=dict)
    trace_id: str = ""
    span_id: str = ""


@dataclass
class LineStats:
    """What :func:`iter_lines` saw: lines and uncompressed bytes (for reports, benchmarks)."""

    lines: int = 0
    bytes: int = 0


def decode_value(value: dict[str, Any]) -> Any:
    """Decode an OTLP AnyValue (integers arrive as strings)."""
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "stringValue" in value:
        return value["stringValue"]
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [decode_value(v) for v in value["arrayValue"].get("values", [])]
    return None


def decode_attributes(attributes: list[dict[str, Any]] | None) -> Attrs:
    return {a["key"]: decode_value(a.get("value") or {}) for a in attributes or ()}


# -- the walker shared by the generic and the fast decoder -----------------------------
PLACEHOLDER = "\t"  # what the block decoder leaves where it decoded an event (ingest.blocks)
Placeholders = tuple[str, list[str], Attrs]  # (scope, consecutive string events of one span,
#                                              its span's decoded attributes)


def walk_export(obj: Any, placeholders: bool = False) -> list[Event | Placeholders]:
    """The events of a parsed OTLP export object, in file order.

    With ``placeholders``, events given as strings (the fast decoder's stand-ins for
    events it already decoded) are returned as ``(scope, [string, ...], span attributes)``
    runs. Raises
    ValueError when ``obj`` is not a well-formed OTLP export object.
    """
    if not isinstance(obj, dict) or "resourceSpans" not in obj:
        raise ValueError("not an OTLP export object (no resourceSpans)")
    items: list[Event | Placeholders] = []
    try:
        for rs in obj.get("resourceSpans") or ():
            for ss in rs.get("scopeSpans") or ():
                scope = (ss.get("scope") or {}).get("name", "")
                for span in ss.get("spans") or ():
                    span_attrs = decode_attributes(span.get("attributes"))
                    base = dict(span_name=span.get("name", ""), span_attrs=span_attrs,
                                trace_id=span.get("traceId", ""), span_id=span.get("spanId", ""))
                    span_events = span.get("events") or ()
                    if not span_events:  # keep event-less spans visible (API spans may be bare)
                        items.append(Event(scope, "", int(span.get("endTimeUnixNano") or 0), {},
                                           **base))
                    if (placeholders and type(span_events) is list
                            and span_events.count(PLACEHOLDER) == len(span_events)):
                        items.append((scope, span_events, span_attrs))  # (the usual case)
                        continue
                    run: list[str] | None = None
                    for ev in span_events:
                        if placeholders and type(ev) is str:
                            if run is None:
                                run = []
                                items.append((scope, run, span_attrs))
                            run.append(ev)
                            continue
                        run = None
                        items.append(Event(scope, ev.get("name", ""),
                                           int(ev.get("timeUnixNano") or 0),
                                           decode_attributes(ev.get("attributes")), **base))
    except (AttributeError, TypeError, KeyError, ValueError, OverflowError) as exc:
        raise ValueError(f"not a valid OTLP export object ({type(exc).__name__}: {exc})"
                         ) from None
    return items


def parse_line(line: bytes) -> Any:
    """orjson-parse one line; ValueError('malformed JSON ...') if it is not JSON."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON ({exc})") from None


def decode_line(line: bytes) -> list[Event]:
    """Events of one OTLP JSON line. Raises ValueError if the line is not valid OTLP JSON."""
    return walk_export(parse_line(line.strip()))  # type: ignore[return-value]


# -- streaming lines -------------------------------------------------------------------
@dataclass(frozen=True)
class _StreamEnd:
    """The end of a gzip stream that is not clean; the line reader words the problem (it
    knows the last complete line)."""

    truncated: bool
    detail: str = ""


def _chunks(raw: BinaryIO, name: str) -> Iterator[bytes | _StreamEnd]:
    """Decompressed (or plain) bytes of ``raw`` in bounded chunks; a truncated or corrupt
    gzip stream ends the iteration with a :class:`_StreamEnd`."""
    data = raw.read(READ_CHUNK)
    if not (name.endswith(".gz") or data[:2] == _GZIP_MAGIC):
        while data:
            yield data
            data = raw.read(READ_CHUNK)
        return
    inflater, fed = _inflate.decompressobj(zlib.MAX_WBITS | 16), False
    try:
        while True:
            if not data:
                data = raw.read(READ_CHUNK)
            exhausted = not data
            if exhausted:  # end of input: drain what the decompressor still holds
                out = inflater.flush()
            else:
                fed = True
                out = inflater.decompress(data, INFLATE_CHUNK)
                data = inflater.unconsumed_tail
            if out:
                yield out
            if inflater.eof:  # end of one gzip member: another may follow (or zero padding)
                # the input left after the member (unconsumed_tail may repeat it: ignore it)
                data = inflater.unused_data.lstrip(b"\x00")
                while not data:
                    data = raw.read(READ_CHUNK)
                    if not data:
                        return
                    data = data.lstrip(b"\x00")
                inflater, fed = _inflate.decompressobj(zlib.MAX_WBITS | 16), False
            elif exhausted:
                break
    except (zlib.error, _inflate.error) as exc:
        yield _StreamEnd(False, str(exc))
        return
    if fed:  # (an empty file is just empty)
        yield _StreamEnd(True)


def iter_lines(raw: BinaryIO, name: str, problems: list[Problem],
               stats: LineStats | None = None) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` for every non-blank line of ``raw`` (1-based, stripped).

    Streams: memory holds one chunk plus the longest line. A line cut off by a truncated
    gzip stream is still yielded (its decoder reports it if it is incomplete), and the
    truncation itself is appended to ``problems``.
    """
    stats = stats if stats is not None else LineStats()
    pending: list[bytes] = []  # pieces of a line longer than one chunk
    lineno = 0
    for chunk in _chunks(raw, name):
        if type(chunk) is _StreamEnd:
            problems.append(Problem(name, lineno + 1, (
                f"truncated compressed data: the gzip stream ends early, after line {lineno}"
                if chunk.truncated else
                f"corrupt compressed data after line {lineno} ({chunk.detail})")))
            continue
        stats.bytes += len(chunk)
        start = 0
        end = chunk.find(b"\n")
        while end >= 0:
            piece = chunk[start:end]
            if pending:
                pending.append(piece)
                piece = b"".join(pending)
                pending = []
            lineno += 1
            line = piece.strip()
            if line:
                yield lineno, line
            start = end + 1
            end = chunk.find(b"\n", start)
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        line = b"".join(pending).strip()
        lineno += 1
        if line:
            yield lineno, line
    stats.lines += lineno


def iter_events(raw: BinaryIO, name: str, problems: list[Problem]) -> Iterator[Event]:
    """Stream the events of one trace file through the generic decoder. Unreadable lines
    and truncation are appended to ``problems`` (never raised); the rest is yielded."""
    for lineno, line in iter_lines(raw, name, problems):
        try:
            events = decode_line(line)
        except ValueError as exc:
            problems.append(Problem(name, lineno, str(exc)))
            continue
        yield from events
