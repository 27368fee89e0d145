"""Columnar decoding of selected OTLP span events, fast and exact: the line decoder.

Ingestion decodes lines in blocks (``ingest.blocks``, numpy); this module is its
per-line fallback for the lines a block cannot take (escapes, non-ASCII, malformed
lines, unusual layouts), the generic decoder every fast path must equal, and the event
layouts (``probe_spec``) both fast paths learn from.

A caller names the events it wants (:class:`Wanted`: scope, event name, numeric and
string attributes) and gets, per line, one :class:`EventColumns` per kind: the wanted
attributes of every such event as columns. Two decoders give identical columns:

* **generic**: orjson parses the line, :func:`~blis_model.ingest.otlp.walk_export`
  decodes every event, the wanted attributes are converted per event;
* **fast**: the layout of the first event of each wanted kind in the line (field order,
  attribute keys, value kinds) is learned by parsing that one event; a regex compiled
  for that layout, spelling out the exact JSON grammar of every value, then splits the
  whole line, capturing the wanted values (converted in bulk with numpy) and replacing
  every matched event by a string placeholder. The much smaller *skeleton* left over
  (resource, scopes, spans, unmatched events) is parsed with orjson and walked by the
  same walker, which gives every placeholder its scope, validates the line and decodes
  whatever the regex did not match. Up to :data:`MAX_LAYOUTS` layouts per kind and line.

:func:`scan_with_events` also hands back, decoded whole, the events of the other scopes a
caller keeps (journey and API events for the request table): one decode feeds both.

Why it is exact: every match is a complete, valid JSON object, and replacing it by a
JSON string keeps a valid line valid and an invalid line invalid (a match starting
inside a string would leave a bare letter right after a closed string). So the skeleton
parses iff the line does; every event is decoded exactly once, and values convert as in
the generic path (ints exactly via int64, doubles by correctly rounded parsing). Any
inconsistency sends the line to the generic decoder, which also words the error of a
malformed line.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import orjson

from blis_model.ingest.otlp import Event, parse_line, walk_export

MAX_LAYOUTS = 4  # distinct layouts of one event kind handled by regex in one line
MAX_PROBES = 8  # events of one kind inspected per line to learn layouts
_FIELDS = ("attributes", "name", "timeUnixNano")
_PRINTABLE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")  # ASCII without " and \
# JSON grammar of each value *spelling* (OTLP kind, plus ":number"/":string" when the
# value is not spelled the usual way); ``{}`` is the group opener, "(" or "(?:".
_VALUE = {
    "intValue": r'"{}-?(?:[1-8]\d{{18}}|\d{{1,18}}))"',  # |v| < 9e18 fits int64 (ns clocks)
    "intValue:number": r"{}-?(?:0|[1-9]\d{{0,17}}))",
    "doubleValue": r"{}-?(?:0|[1-9]\d{{0,15}})(?:\.\d+)?(?:[eE][-+]?\d{{1,2}})?)",
    "doubleValue:string": r'"{}[\x20\x21\x23-\x5b\x5d-\x7e]*)"',  # "NaN", "Infinity", ...
    "stringValue": r'"{}[\x20\x21\x23-\x5b\x5d-\x7e]*)"',  # printable ASCII, no escapes
    "boolValue": r"{}true|false)",
}


def _spelling(kind: str, value: Any) -> str | None:
    """The :data:`_VALUE` entry for an attribute value as orjson decoded it (None: no
    regex for it, the event stays with the generic decoder)."""
    t = type(value)
    if kind == "intValue":
        return "intValue" if t is str else "intValue:number" if t is int else None
    if kind == "doubleValue":
        return "doubleValue" if t in (int, float) else "doubleValue:string" if t is str else None
    if kind == "stringValue":
        return kind if t is str else None
    if kind == "boolValue":
        return kind if t is bool else None
    return None


@dataclass(frozen=True)
class Wanted:
    """Attributes to extract from events ``name`` of scope ``scope``.

    ``ints`` (block decoder only, ``ingest.blocks``): exact int64 values of integer
    attributes, :data:`MISSING_INT` when absent. ``strict``: the block decoder decodes an
    event of this kind only when every wanted attribute it carries is spelled as its role
    says (``ints``: intValue; ``numbers``: intValue or a JSON-number doubleValue;
    ``strings``: stringValue); any other event is handed back whole (an ``Event``), so a
    caller with its own conversion rules (the request table) sees it as before.
    """

    scope: str
    name: str
    numbers: tuple[str, ...] = ()  # → float64, NaN when missing or not a number
    strings: tuple[str, ...] = ()  # → UTF-8 bytes, None when missing or not a string
    ints: tuple[str, ...] = ()  # → int64, MISSING_INT when missing (block decoder only)
    strict: bool = False


MISSING_INT = np.iinfo(np.int64).min  # an absent ``ints`` attribute (|values| < 9e18)


@dataclass
class EventColumns:
    """The wanted attributes of consecutive events of one kind, in file order.

    The block decoder adds, for kinds of kept scopes (journey and API events), each
    event's span attributes (``span_attrs``) and its position in the file (``seq``:
    line number × 2**24 + the event's index in its line), and ``ints``."""

    wanted: Wanted
    size: int
    numbers: dict[str, np.ndarray]
    strings: dict[str, list[bytes | None]]
    ints: dict[str, np.ndarray] = field(default_factory=dict)
    span_attrs: list[dict[str, Any]] | None = None
    seq: np.ndarray | None = None

    def __len__(self) -> int:
        return self.size


def number(value: Any) -> float:
    """A decoded attribute as a float: numbers and bools convert, anything else is NaN."""
    if type(value) in (int, float, bool):
        try:
            return float(value)
        except OverflowError:
            return math.nan
    return math.nan


def string(value: Any) -> bytes | None:
    return value.encode("utf-8", "surrogatepass") if type(value) is str else None


def columns_from_events(wanted: Wanted, events: Sequence[Event]) -> EventColumns:
    """Columns of decoded events (the generic conversion)."""
    numbers = {k: np.array([number(e.attrs.get(k)) for e in events], dtype=np.float64)
               for k in wanted.numbers}
    strings = {k: [string(e.attrs.get(k)) for e in events] for k in wanted.strings}
    return EventColumns(wanted, len(events), numbers, strings)


# -- layouts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    wanted: Wanted
    regex: re.Pattern[bytes]
    captures: tuple[tuple[str, str, str], ...]  # (role "n"|"s", key, kind) per group

    def columns(self, parts: list[bytes], size: int, keep: list[bool] | None) -> EventColumns:
        """Columns of this layout's ``size`` matches in ``parts`` (a ``split`` result),
        keeping the rows flagged in ``keep`` (None = all)."""
        step = len(self.captures) + 1
        numbers: dict[str, np.ndarray] = {}
        strings: dict[str, list[bytes | None]] = {}
        for g, (role, key, kind) in enumerate(self.captures):
            raw = parts[1 + g::step]
            if role == "n":
                numbers[key] = _to_float(raw, kind, size)
            else:
                strings[key] = raw  # type: ignore[assignment]
        for key in self.wanted.numbers:
            numbers.setdefault(key, np.full(size, np.nan))
        for key in self.wanted.strings:
            strings.setdefault(key, [None] * size)
        if keep is not None and not all(keep):  # some events were in another scope: drop them
            mask = np.array(keep, dtype=bool)
            numbers = {k: v[mask] for k, v in numbers.items()}
            strings = {k: [x for x, ok in zip(v, keep, strict=True) if ok]
                       for k, v in strings.items()}
            size = int(mask.sum())
        return EventColumns(self.wanted, size, numbers, strings)


def _to_float(raw: list[bytes], kind: str, size: int) -> np.ndarray:
    """Values as the generic path converts them (ValueError: let it decide)."""
    if kind.startswith("intValue"):
        values = np.fromstring(b" ".join(raw), dtype=np.int64, sep=" ")
        if len(values) != size:  # cannot happen for regex-checked digits
            raise ValueError("integer column lost values")
        return values.astype(np.float64)
    if kind.startswith("doubleValue"):
        return np.fromiter(map(float, raw), dtype=np.float64, count=size)
    if kind == "boolValue":
        return np.fromiter((v == b"true" for v in raw), dtype=np.float64, count=size)
    return np.full(size, np.nan)  # a string where a number is wanted


@lru_cache(maxsize=256)
def _compile(wanted: Wanted, fields: tuple[str, ...], attrs: tuple[tuple[str, str], ...]
             ) -> _Layout:
    last = {key: i for i, (key, _) in enumerate(attrs)}  # repeated keys: the last one wins
    captures: list[tuple[str, str, str]] = []
    pieces = []
    for i, (key, kind) in enumerate(attrs):
        role = ""
        if last[key] == i and key in wanted.numbers and kind != "stringValue":
            role = "n"
        elif last[key] == i and key in wanted.strings and kind == "stringValue":
            role = "s"
        if role:
            captures.append((role, key, kind))
        value = _VALUE[kind].format("(" if role else "(?:")
        pieces.append(r'\{"key":"' + re.escape(key) + r'","value":\{"' + kind.split(":")[0]
                      + '":' + value + r"\}\}")
    spelled = {"timeUnixNano": r'"timeUnixNano":"\d{0,30}"',  # int() takes it, as generic
               "name": '"name":"' + re.escape(wanted.name) + '"',
               "attributes": r'"attributes":\[' + ",".join(pieces) + r"\]"}
    pattern = r"\{" + ",".join(spelled[f] for f in fields) + r"\}"
    return _Layout(wanted, re.compile(pattern.encode()), tuple(captures))


def _probe(line: bytes, pos: int, wanted: Wanted) -> _Layout | None:
    """The layout of the event whose ``"name"`` is at ``pos`` (None if it has no simple
    layout: then the events stay with the generic decoder)."""
    spec = probe_spec(line, pos, wanted)
    return None if spec is None else _compile(wanted, *spec)


LayoutSpec = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]
"""An event's layout: its field order and its attributes as (key, value spelling)."""


def probe_spec(line: bytes, pos: int, wanted: Wanted) -> LayoutSpec | None:
    """The layout of the event whose ``"name"`` is at ``pos``: (fields, attributes); None
    if it has no simple layout (then the events stay with the generic decoder)."""
    start = line.rfind(b"{", 0, pos)
    end = line.find(b"]}", pos)
    if start < 0 or end < 0:
        return None
    try:
        event = orjson.loads(line[start:end + 2])
    except orjson.JSONDecodeError:
        return None
    if (not isinstance(event, dict) or sorted(event) != list(_FIELDS)
            or event["name"] != wanted.name or not isinstance(event["attributes"], list)):
        return None
    attrs = []
    for attr in event["attributes"]:
        if not (isinstance(attr, dict) and list(attr) == ["key", "value"]
                and type(attr["key"]) is str and _PRINTABLE.fullmatch(attr["key"])
                and isinstance(attr["value"], dict) and len(attr["value"]) == 1):
            return None
        ((kind, value),) = attr["value"].items()
        spelling = _spelling(kind, value)
        if spelling is None:
            return None
        attrs.append((attr["key"], spelling))
    return tuple(event), tuple(attrs)


# -- decoding --------------------------------------------------------------------------
Scanned = tuple[list[EventColumns], list[Event]]
"""What :func:`scan_with_events` returns: wanted columns, decoded events of kept scopes."""


def generic_with_events(line: bytes, wanted: Sequence[Wanted], scopes: Collection[str] = ()
                        ) -> Scanned:
    """:func:`scan_with_events` through orjson (ValueError if it is not valid OTLP JSON)."""
    items: list[Event] = walk_export(parse_line(line))  # type: ignore[assignment]
    out = []
    for w in wanted:
        events = [e for e in items if e.name == w.name and e.scope == w.scope]
        if events:
            out.append(columns_from_events(w, events))
    return out, [e for e in items if e.scope in scopes]


def generic_columns(line: bytes, wanted: Sequence[Wanted]) -> list[EventColumns]:
    """Columns of one line through orjson (ValueError if it is not valid OTLP JSON)."""
    return generic_with_events(line, wanted)[0]


def _merge(wanted: Wanted, seq: np.ndarray, sources: dict[int, EventColumns]
           ) -> EventColumns:
    """Interleave columns of several sources (layouts, -1 = generic) in file order."""
    n = len(seq)
    numbers = {k: np.empty(n) for k in wanted.numbers}
    strings_obj = {k: np.empty(n, dtype=object) for k in wanted.strings}
    for src, cols in sources.items():
        at = seq == src
        for k in wanted.numbers:
            numbers[k][at] = cols.numbers[k]
        for k in wanted.strings:
            target = strings_obj[k]
            target[np.flatnonzero(at)] = np.array(cols.strings[k] + [None], dtype=object)[:-1]
    return EventColumns(wanted, n, numbers, {k: v.tolist() for k, v in strings_obj.items()})


def _fast_columns(line: bytes, wanted: Sequence[Wanted], scopes: Collection[str] = ()
                  ) -> Scanned | None:
    """The fast decoder; None when the line should go through the generic one."""
    layouts: list[tuple[int, _Layout, list[bytes], int]] = []  # (kind, layout, parts, count)
    skeleton = line
    for k, w in enumerate(wanted):
        marker = b'"name":"' + w.name.encode() + b'"'
        start, found = 0, 0
        for _ in range(MAX_PROBES):
            pos = skeleton.find(marker, start)
            if pos < 0 or found == MAX_LAYOUTS:
                break
            layout = _probe(skeleton, pos, w)
            count = 0
            if layout is not None:
                parts = layout.regex.split(skeleton)
                step = len(layout.captures) + 1
                count = (len(parts) - 1) // step
            if not count:  # this event has no regex-friendly spelling: look further on
                start = pos + 1
                continue
            skeleton = (b'"L%d"' % len(layouts)).join(parts[::step])
            layouts.append((k, layout, parts, count))
            start, found = 0, found + 1
    if not layouts:
        return None
    try:
        items = walk_export(orjson.loads(skeleton), placeholders=True)
    except (orjson.JSONDecodeError, ValueError):
        return None
    tags = {f"L{i}": i for i in range(len(layouts))}
    by_event = {(w.scope, w.name): k for k, w in enumerate(wanted)}
    runs: list[tuple[str, list[str], dict]] = []
    generic: list[list[Event]] = [[] for _ in wanted]
    kept: list[Event] = []  # the events of ``scopes``, whole (never placeholders)
    seen: Counter[str] = Counter()
    for item in items:
        if type(item) is tuple:
            runs.append(item)
            seen.update(item[1])
        else:
            if item.scope in scopes:  # type: ignore[union-attr]
                kept.append(item)  # type: ignore[arg-type]
            k = by_event.get((item.scope, item.name))  # type: ignore[union-attr]
            if k is not None:
                generic[k].append(item)  # type: ignore[arg-type]
    if seen != Counter({f"L{i}": lay[3] for i, lay in enumerate(layouts)}):
        return None  # a placeholder lost or a foreign string event: the generic path decides
    if any(scope in scopes for scope, _, _ in runs):
        return None  # a placeholder hides an event of a kept scope: the generic path decides
    mine = [[i for i, lay in enumerate(layouts) if lay[0] == k] for k in range(len(wanted))]
    foreign = any(layouts[tags[t]][1].wanted.scope != scope for scope, run, _ in runs
                  for t in set(run))
    if not foreign and all(len(m) <= 1 and not (m and generic[k]) for k, m in enumerate(mine)):
        out = []
        for k, w in enumerate(wanted):  # each kind from one layout or from generic events
            if mine[k]:
                _, layout, parts, count = layouts[mine[k][0]]
                out.append(layout.columns(parts, count, None))
            elif generic[k]:
                out.append(columns_from_events(w, generic[k]))
        return out, kept
    return _interleaved(items, wanted, layouts, tags, by_event), kept


def _interleaved(items: list, wanted: Sequence[Wanted],
                 layouts: list[tuple[int, _Layout, list[bytes], int]], tags: dict[str, int],
                 by_event: dict[tuple[str, str], int]) -> list[EventColumns]:
    """Columns when a kind mixes layouts, generic events or scopes: rows in file order."""
    seqs: list[list[int]] = [[] for _ in wanted]
    generic: list[list[Event]] = [[] for _ in wanted]
    keeps: list[list[bool]] = [[] for _ in layouts]
    for item in items:
        if type(item) is tuple:
            scope, run, _ = item
            for tag in run:
                i = tags[tag]
                ok = scope == layouts[i][1].wanted.scope
                keeps[i].append(ok)
                if ok:
                    seqs[layouts[i][0]].append(i)
        else:
            k = by_event.get((item.scope, item.name))
            if k is not None:
                seqs[k].append(-1)
                generic[k].append(item)
    out = []
    for k, w in enumerate(wanted):
        if not seqs[k]:
            continue
        sources = {i: layout.columns(parts, count, keeps[i])
                   for i, (kind, layout, parts, count) in enumerate(layouts) if kind == k}
        if generic[k]:
            sources[-1] = columns_from_events(w, generic[k])
        out.append(_merge(w, np.asarray(seqs[k]), sources))
    return out


def line_columns(line: bytes, wanted: Sequence[Wanted], scopes: Collection[str] = ()
                 ) -> Scanned:
    """The line decoder: :func:`scan_with_events` through the regex layouts, else the
    generic decoder (which words the error of a malformed line)."""
    try:
        scanned = _fast_columns(line, wanted, scopes)
    except ValueError:  # a value the fast conversion rejects: the generic path decides
        scanned = None
    if scanned is not None:
        return scanned
    return generic_with_events(line, wanted, scopes)


def concat_columns(chunks: Sequence[EventColumns]) -> EventColumns:
    """Consecutive column chunks of one kind as one."""
    if len(chunks) == 1:
        return chunks[0]
    w = chunks[0].wanted
    out = EventColumns(
        w, sum(c.size for c in chunks),
        {k: np.concatenate([c.numbers[k] for c in chunks]) for k in w.numbers},
        {k: [x for c in chunks for x in c.strings[k]] for k in w.strings},
        {k: np.concatenate([c.ints[k] for c in chunks]) for k in w.ints})
    if all(c.seq is not None for c in chunks):
        out.seq = np.concatenate([c.seq for c in chunks])  # type: ignore[misc]
        out.span_attrs = [a for c in chunks for a in c.span_attrs]  # type: ignore[union-attr]
    return out


def scan_with_events(line: bytes, wanted: Sequence[Wanted], scopes: Collection[str] = (),
                     fast: bool = True) -> Scanned:
    """Decode ``line`` once: one non-empty ``EventColumns`` per wanted kind present, in
    ``wanted`` order, and every event of ``scopes`` decoded whole, in file order (as
    :func:`~blis_model.ingest.otlp.decode_line` gives them). Raises ValueError (with the
    reason) when the line is not valid OTLP JSON. ``fast`` decodes through the block
    decoder (``ingest.blocks``, one line as a block), falling back to :func:`line_columns`
    for what it leaves; otherwise through the generic decoder."""
    if not fast:
        return generic_with_events(line, wanted, scopes)
    from blis_model.ingest.blocks import scan_block  # (blocks builds on this module)

    block = scan_block([(0, line)], wanted, scopes)
    if block.problems:
        raise ValueError(block.problems[0][1])
    return [concat_columns(c) for c in block.columns if c], [e for _, e in block.events]


def scan_line(line: bytes, wanted: Sequence[Wanted], fast: bool = True) -> list[EventColumns]:
    """One non-empty ``EventColumns`` per wanted kind present in ``line``, in ``wanted``
    order. Raises ValueError (with the reason) when the line is not valid OTLP JSON."""
    return scan_with_events(line, wanted, (), fast)[0]
