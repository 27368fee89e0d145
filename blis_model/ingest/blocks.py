"""Columnar decoding of whole blocks of OTLP lines with numpy: the ingest fast path.

``ingest.scan`` decodes one line at a time with a regex per event layout; Python's regex
engine walks every byte of every event (a few ns per byte) and a line costs dozens of
small numpy calls. Here a *block* of lines (a few MB) is decoded at once, with a handful
of vectorized passes over it:

1. every ``"`` of the block is located (one comparison over the bytes); without escapes
   (checked: such lines, and lines with control or non-ASCII bytes, take the line path),
   consecutive quotes pair into the block's strings;
2. every ``"name":"<event name>"`` key of a wanted kind is found among those strings;
3. the layout of the first such event is learned (``scan.probe_spec``: field order,
   attribute keys, value spellings) and turned into a *template*: the event's text as
   literal pieces around value slots, every slot located by a fixed quote offset from the
   event's first quote;
4. every candidate event is checked against the template *byte for byte*: the literal
   pieces are compared eight bytes at a time (unaligned 64-bit words), the lengths must
   fit, and every value must match its JSON grammar (a small DFA run column-wise over a
   matrix of the values' bytes) — so a matched event is exactly the template's text with
   valid values, a complete JSON object. Candidates that do not match get another probe
   (up to :data:`MAX_PROBES` layouts per kind and block); the rest stay generic;
5. values convert in bulk: integers exactly in int64, doubles with numpy's correctly
   rounded string parser (the one ``float`` uses), strings sliced as bytes;
6. every matched event is replaced by the placeholder ``"\\t"``; the much smaller
   skeleton is parsed line by line with orjson and walked by the walker the generic
   decoder uses (``otlp.walk_export``), which validates each line, gives each placeholder
   its scope and span and decodes whatever no template matched.

Exactness: as in ``ingest.scan``, a matched event is a complete, valid JSON object, and
replacing it by a JSON string keeps a valid line valid and an invalid one invalid; no
original string can decode to a tab (the line holds no backslash nor control byte), so
placeholders are never confused with the trace's own strings. Any inconsistency — a line
that does not parse, a placeholder lost or misplaced, a step event the templates left —
sends that line to the line decoder (``scan.line_columns``), which also words the error
of a malformed line. Columns, their order and the kept events are the generic decoder's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import orjson

from blis_model.ingest.otlp import Event, walk_export
from blis_model.ingest.scan import (
    MISSING_INT,
    EventColumns,
    Wanted,
    line_columns,
    probe_spec,
)

MAX_PROBES = 8  # layouts learned per event kind and block
PLACEHOLDER = b'"\\t"'  # the JSON string "\t"
SEQ_SHIFT = 24  # seq = line number << SEQ_SHIFT | index of the event in its line
_PAD = 64  # zero bytes after the block: word reads and value windows stay in the buffer
_MAX_DOUBLE = 48  # longest double spelling decoded here (longer: generic)
_NAME_KEY = int.from_bytes(b'"name":"', "little")
_QUOTED = ("time", "intValue", "stringValue")  # slots inside a JSON string
_BARE = ("intValue:number", "doubleValue", "boolValue")
_POW10 = 10 ** np.arange(19, dtype=np.int64)
_TRUE = int.from_bytes(b"true", "little")
_FALSE = int.from_bytes(b"false", "little")


# -- templates -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slot:
    """One value of a template: ``start = q[base + q_start] + off_start`` and
    ``end = q[base + q_end] - off_end`` (``q_end`` -1: the first ``}`` after start)."""

    kind: str  # "time" or a value spelling of ``scan._VALUE``
    key: str
    number: bool  # captured into ``numbers``
    string: bool  # captured into ``strings``
    integer: bool  # captured into ``ints``
    q_start: int
    off_start: int
    q_end: int
    off_end: int


@dataclass(frozen=True, eq=False)
class _Template:
    wanted: Wanted
    name_quote: int  # ordinal of the quote opening the "name" key
    n_quotes: int
    slots: tuple[_Slot, ...]
    lit_len: np.ndarray  # bytes of each literal piece (one more than slots)
    pieces: tuple[bytes, ...]  # the literal text around the slots
    piece_arrays: tuple[np.ndarray, ...]  # the same as uint8 arrays
    quotes: np.ndarray  # quote offsets read per event: slot starts, slot ends, first quote
    off_start: np.ndarray  # per slot (see _Slot)
    off_end: np.ndarray


@lru_cache(maxsize=512)
def _template(wanted: Wanted, fields: tuple[str, ...], attrs: tuple[tuple[str, str], ...]
              ) -> _Template | None:
    """The template of one layout (see ``scan.probe_spec``); None when it has a value
    this decoder does not handle (or, for ``strict`` kinds, a wanted attribute spelled
    otherwise than its role)."""
    last = {key: i for i, (key, _) in enumerate(attrs)}  # repeated keys: the last one wins
    if wanted.strict:
        for key, i in last.items():
            spelling = attrs[i][1]
            if ((key in wanted.ints and spelling not in ("intValue", "intValue:number"))
                    or (key in wanted.numbers
                        and spelling not in ("intValue", "intValue:number", "doubleValue"))
                    or (key in wanted.strings and spelling != "stringValue")):
                return None
    lits = [""]
    raw_slots: list[tuple[str, str, int]] = []  # (kind, key, attribute index)
    name_quote = -1

    def lit(text: str) -> None:
        lits[-1] += text

    def slot(kind: str, key: str, index: int) -> None:
        raw_slots.append((kind, key, index))
        lits.append("")

    lit("{")
    for n, name in enumerate(fields):
        if n:
            lit(",")
        if name == "timeUnixNano":
            lit('"timeUnixNano":"')
            slot("time", "", -1)
            lit('"')
        elif name == "name":
            name_quote = sum(piece.count('"') for piece in lits)
            lit(f'"name":"{wanted.name}"')
        else:
            lit('"attributes":[')
            for i, (key, spelling) in enumerate(attrs):
                lit(("," if i else "") + '{"key":"' + key + '","value":{"'
                    + spelling.split(":")[0] + '":')
                if spelling in _QUOTED:
                    lit('"')
                    slot(spelling, key, i)
                    lit('"')
                elif spelling in _BARE:
                    slot(spelling, key, i)
                else:
                    return None
                lit("}}")
            lit("]")
    lit("}")
    if name_quote < 0 or not lits[0].startswith('{"'):
        return None
    slots = []
    quotes = 0  # quotes in the pieces before the current slot
    for j, (kind, key, index) in enumerate(raw_slots):
        left, right = lits[j], lits[j + 1]
        quotes += left.count('"')
        own = index >= 0 and last[key] == index
        number = own and key in wanted.numbers and kind != "stringValue"
        string = own and key in wanted.strings and kind == "stringValue"
        integer = own and key in wanted.ints and kind in ("intValue", "intValue:number")
        if kind in _QUOTED:  # between the quote ending ``left`` and the one opening ``right``
            q_start, off_start, q_end, off_end = quotes - 1, 1, quotes, 0
        else:
            q_start, off_start = quotes - 1, len(left) - left.rindex('"')
            if '"' in right:
                q_end, off_end = quotes, right.index('"')
            elif j == len(raw_slots) - 1:
                q_end, off_end = -1, 0
            else:
                return None
        slots.append(_Slot(kind, key, number, string, integer, q_start, off_start, q_end,
                           off_end))
    pieces = tuple(piece.encode() for piece in lits)
    return _Template(
        wanted, name_quote, sum(p.count(b'"') for p in pieces), tuple(slots),
        np.array([len(p) for p in pieces], np.int64), pieces,
        tuple(np.frombuffer(p, np.uint8) for p in pieces),
        np.array([s.q_start for s in slots] + [max(s.q_end, 0) for s in slots] + [0],
                 np.int64),
        np.array([s.off_start for s in slots], np.int64),
        np.array([s.off_end for s in slots], np.int64))


# -- value grammars --------------------------------------------------------------------
def _dfa_double() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DFA of ``-?(?:0|[1-9]\\d{0,15})(?:\\.\\d+)?(?:[eE][-+]?\\d{1,2})?`` (the spelling
    ``scan`` accepts for doubleValue): (byte → class, transitions, accepting states)."""
    classes = np.zeros(256, np.int8)  # 0 other, 1 '-', 2 '+', 3 '.', 4 e/E, 5 '0', 6 1-9
    classes[ord("-")], classes[ord("+")], classes[ord(".")] = 1, 2, 3
    classes[ord("e")] = classes[ord("E")] = 4
    classes[ord("0")] = 5
    classes[ord("1"):ord("9") + 1] = 6
    start, sign, zero, f0, f1, e0, e1, ed1, ed2, dead = 0, 1, 2, 19, 20, 21, 22, 23, 24, 25
    ints = list(range(3, 19))  # 1..16 integer digits
    table = np.full((26, 8), dead, np.int8)
    table[:, 7] = np.arange(26)  # class 7: past the value's end, the state stays
    table[start, 1], table[start, 5], table[start, 6] = sign, zero, ints[0]
    table[sign, 5], table[sign, 6] = zero, ints[0]
    table[zero, 3], table[zero, 4] = f0, e0
    for k, state in enumerate(ints):
        if k + 1 < len(ints):
            table[state, 5] = table[state, 6] = ints[k + 1]
        table[state, 3], table[state, 4] = f0, e0
    table[f0, 5] = table[f0, 6] = f1
    table[f1, 5] = table[f1, 6] = f1
    table[f1, 4] = e0
    table[e0, 1] = table[e0, 2] = e1
    table[e0, 5] = table[e0, 6] = ed1
    table[e1, 5] = table[e1, 6] = ed1
    table[ed1, 5] = table[ed1, 6] = ed2
    accept = np.zeros(26, bool)
    accept[[zero, *ints, f1, ed1, ed2]] = True
    return classes, table, accept


_DOUBLE = _dfa_double()


def _window(arr: np.ndarray, start: np.ndarray, length: np.ndarray, width: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, inside): ``width`` bytes from each start (n × width) and which of them lie
    before the value's end."""
    return _rows(arr, start, width), np.arange(width) < length[:, None]


def _rows(arr: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
    """``width`` bytes from each start (n × width), one row copy each; starts within the
    buffer (its zero padding covers ``width``)."""
    view = np.ndarray((len(arr) - width + 1, width), np.uint8, arr, 0, (1, 1))
    return view[np.minimum(start, len(arr) - width)]


_U = np.uint64
_ASCII_ZEROS = _U(0x3030303030303030)
_KEEP = np.array([0] + [((1 << (8 * k)) - 1) << (8 * (8 - k)) for k in range(1, 9)], _U)


def _digit_words(words: np.ndarray, end: np.ndarray, count: np.ndarray, value: bool = True
                 ) -> tuple[np.ndarray | None, np.ndarray]:
    """(value, ok) of the ``count`` (0..8) bytes before ``end`` read as decimal digits,
    eight at a time (SWAR on one unaligned little-endian word per value)."""
    w = words[np.maximum(end - 8, 0)]
    keep = _KEEP[count]
    w = (w & keep) | (_ASCII_ZEROS & ~keep)  # left-padded with "0"
    ok = ((w & _U(0xF0F0F0F0F0F0F0F0))
          | (((w + _U(0x0606060606060606)) & _U(0xF0F0F0F0F0F0F0F0)) >> _U(4))
          ) == _U(0x3333333333333333)
    ok &= (end >= 8) | (count == 0)
    if not value:
        return None, ok
    w = (w & _U(0x0F0F0F0F0F0F0F0F)) * _U(2561) >> _U(8)
    w = (w & _U(0x00FF00FF00FF00FF)) * _U(6553601) >> _U(16)
    w = ((w & _U(0x0000FFFF0000FFFF)) * _U(42949672960001)) >> _U(32)
    return w, ok


def _ints(arr: np.ndarray, words: np.ndarray, start: np.ndarray, end: np.ndarray,
          bare: bool) -> tuple[np.ndarray, np.ndarray]:
    """(int64 values, ok) of integer spellings: ``-?(?:[1-8]\\d{18}|\\d{1,18})`` inside
    quotes, ``-?(?:0|[1-9]\\d{0,17})`` as a JSON number (``bare``)."""
    neg = arr[start] == ord("-")  # (every start lies inside its event, so in the block)
    first = start + neg
    digits = end - first
    ok = (digits >= 1) & (digits <= 18)
    if bare:
        ok &= (digits == 1) | (arr[first] != ord("0"))
    else:  # 19 digits: a quoted int64 led by 1-8
        long = np.flatnonzero(digits == 19)
        if len(long):
            lead = arr[first[long]]
            ok[long] = (lead >= ord("1")) & (lead <= ord("8"))
    value, good = _digit_words(words, end, np.minimum(digits, 8))
    ok &= good
    for k, scale in ((1, _U(10**8)), (2, _U(10**16))):  # longer values: 8 digits at a time
        rows = np.flatnonzero(digits > 8 * k)
        if not len(rows):
            break
        part, good = _digit_words(words, end[rows] - 8 * k,
                                  np.minimum(digits[rows] - 8 * k, 8))
        value[rows] += part * scale
        ok[rows] &= good
    signed = value.view(np.int64)
    return (np.where(neg, -signed, signed) if neg.any() else signed), ok


def _time_ok(words: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """``\\d{0,30}`` (timeUnixNano: only validated, not decoded)."""
    size = end - start
    ok = size <= 30
    for k in range(4):
        longer = size > 8 * k
        if longer.all():  # (the usual case: every time has 19 digits)
            ok &= _digit_words(words, end - 8 * k, np.minimum(size - 8 * k, 8),
                               value=False)[1]
            continue
        rows = np.flatnonzero(longer)
        if not len(rows):
            break
        ok[rows] &= _digit_words(words, end[rows] - 8 * k,
                                 np.minimum(size[rows] - 8 * k, 8), value=False)[1]
    return ok


_F10 = np.array([float(f"1e{k}") for k in range(23)])  # exact powers of ten


def _doubles(arr: np.ndarray, start: np.ndarray, end: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, ok) of doubleValue numbers (see :func:`_dfa_double`), correctly
    rounded: mantissas of at most 15 digits with a decimal exponent within ±22 in one
    IEEE operation (Clinger's fast path: both operands exact), the rest by numpy's
    parser (the one ``float`` uses)."""
    size = end - start
    if not len(start):
        return np.zeros(0), np.zeros(0, bool)
    width = int(min(max(int(size.max()), 1), _MAX_DOUBLE))
    raw, inside = _window(arr, start, size, width)
    # the usual spelling first, ``(0|[1-9]\d*)(\.\d+)?`` with at most 15 digits: its
    # value is the integer of its digits over a power of ten, one exact division
    digit = (raw - np.uint8(ord("0"))) < 10
    dot = raw == ord(".")
    cols = np.arange(width)
    has_dot = dot.any(axis=1)
    dot_at = np.where(has_dot, dot.argmax(axis=1), size)
    plain = ((digit | dot | ~inside).all(axis=1) & (dot.sum(axis=1) <= 1) & (size >= 1)
             & (size - has_dot <= 15) & (dot_at >= 1) & (dot_at != size - 1)
             & ((raw[:, 0] != ord("0")) | (dot_at == 1) | (size == 1)))
    if plain.all():
        after = size[:, None] - 1 - cols - ((cols < dot_at[:, None]) & has_dot[:, None])
        d = raw.astype(np.int64) - ord("0")
        m = np.where(digit & inside, d * _POW10[np.clip(after, 0, 18)], 0).sum(axis=1)
        frac = np.where(has_dot, size - 1 - dot_at, 0)
        return m.astype(np.float64) / _F10[frac], np.ones(len(start), bool)
    classes, table, accept = _DOUBLE
    cls = np.where(inside, classes[raw], 7)
    flat = table.astype(np.intp).ravel()
    step = np.ascontiguousarray(cls.T.astype(np.intp))
    state = np.zeros(len(start), np.intp)
    for k in range(width):
        state = flat[state * 8 + step[k]]
    ok = (size >= 1) & (size <= _MAX_DOUBLE) & accept[state]
    digit = (cls == 5) | (cls == 6)
    is_e = cls == 4
    has_e = is_e.any(axis=1)
    e_at = np.where(has_e, is_e.argmax(axis=1), size)
    mantissa = digit & (cols < e_at[:, None])
    nd = mantissa.sum(axis=1)
    dot = cls == 3
    frac = (mantissa & (cols > np.where(dot.any(axis=1), dot.argmax(axis=1), width)[:, None])
            ).sum(axis=1)
    d = raw.astype(np.int64) - ord("0")
    after = nd[:, None] - np.cumsum(mantissa, axis=1)  # mantissa digits after each column
    m = np.where(mantissa, d * _POW10[np.clip(after, 0, 18)], 0).sum(axis=1)
    exponent_digits = digit & (cols > e_at[:, None])
    ne = exponent_digits.sum(axis=1)
    after = ne[:, None] - np.cumsum(exponent_digits, axis=1)
    x = np.where(exponent_digits, d * _POW10[np.clip(after, 0, 18)], 0).sum(axis=1)
    sign_at = np.minimum(e_at + 1, width - 1)
    x = np.where(has_e & (raw[np.arange(len(start)), sign_at] == ord("-")), -x, x)
    power = x - frac
    fast = ok & (nd <= 15) & (np.abs(power) <= 22)
    scale = _F10[np.clip(np.abs(power), 0, 22)]
    mf = m.astype(np.float64)
    values = np.where(power >= 0, mf * scale, mf / scale)
    values = np.where(raw[:, 0] == ord("-"), -values, values)
    slow = np.flatnonzero(ok & ~fast)
    if len(slow):
        text = np.where(inside[slow], raw[slow], 0).astype(np.uint8)
        values[slow] = np.ascontiguousarray(text).view(f"S{width}").ravel().astype(np.float64)
    return values, ok


def _bools(words: np.ndarray, start: np.ndarray, end: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    size = end - start
    w = words[np.minimum(start, len(words) - 1)]
    true = (size == 4) & ((w & np.uint64(0xFFFFFFFF)) == _TRUE)
    false = (size == 5) & ((w & np.uint64(0xFFFFFFFFFF)) == _FALSE)
    return true.astype(np.float64), true | false


# -- matching --------------------------------------------------------------------------
@dataclass
class _Matches:
    """Events of one kind matched by one template (rows in position order)."""

    template: _Template
    start: np.ndarray  # event text [start, end) in the block
    end: np.ndarray
    slot_start: np.ndarray  # (n, slots)
    slot_end: np.ndarray
    numbers: dict[str, np.ndarray] = field(default_factory=dict)
    ints: dict[str, np.ndarray] = field(default_factory=dict)


def _match(t: _Template, base: np.ndarray, q: np.ndarray, arr: np.ndarray,
           words: np.ndarray, size: int) -> tuple[np.ndarray, _Matches]:
    """Which candidates (``base``: ordinal of each one's first quote) are exactly an
    instance of ``t``; their positions and decoded numbers."""
    slots = t.slots
    ns = len(slots)
    ok = (base >= 0) & (base + t.n_quotes <= len(q))
    b = np.where(ok, base, 0)
    at = q[b[:, None] + t.quotes]  # every quote the slots hang on, one gather
    starts = at[:, :ns] + t.off_start
    ends = at[:, ns:2 * ns] - t.off_end
    for j, s in enumerate(t.slots):
        if s.q_end < 0:  # a number or bool closing the event: up to the first "}"
            raw = _rows(arr, np.clip(starts[:, j], 0, size), _MAX_DOUBLE + 1)
            brace = raw == ord("}")
            ends[:, j] = np.where(brace.any(axis=1), starts[:, j] + brace.argmax(axis=1), -1)
    first = at[:, -1] - 1
    lit_start = np.column_stack([first, ends])  # literal piece k starts at lit_start[:, k]
    ok &= ((starts - lit_start[:, :-1]) == t.lit_len[:-1]).all(axis=1)
    ok &= (ends >= starts).all(axis=1)
    last = lit_start[:, -1] + t.lit_len[-1]
    ok &= (first >= 0) & (last <= size)
    sel = np.flatnonzero(ok)
    # every literal piece of every candidate against the template's: all at once (one
    # bytes comparison per piece), row by row only when some candidate differs
    starts_sel = np.ascontiguousarray(lit_start[sel].T)
    for k, piece in enumerate(t.pieces):
        width = len(piece)
        rows = np.ndarray((len(arr) - width + 1,), np.dtype((np.void, width)), arr, 0, (1,)
                          )[starts_sel[k]]  # each piece's bytes as one fixed-size item
        same = rows.view(np.uint8).reshape(-1, width) == t.piece_arrays[k]
        if not same.all():
            same = same.all(axis=1)
            sel, starts_sel = sel[same], starts_sel[:, same]
    ok[:] = False
    ok[sel] = True
    sel = np.flatnonzero(ok)
    s_start, s_end = starts[sel], ends[sel]
    good = np.ones(len(sel), bool)
    numbers: dict[str, np.ndarray] = {}
    ints: dict[str, np.ndarray] = {}
    for kind in {s.kind for s in slots}:
        js = [j for j, s in enumerate(slots) if s.kind == kind]
        if kind == "stringValue":
            continue  # any printable ASCII without quote or backslash (the block has no other)
        st, en = s_start[:, js].ravel(), s_end[:, js].ravel()
        if kind == "time":
            valid, values = _time_ok(words, st, en), None
        elif kind == "doubleValue":
            values, valid = _doubles(arr, st, en)
        elif kind == "boolValue":
            values, valid = _bools(words, st, en)
        else:
            values, valid = _ints(arr, words, st, en, bare=kind == "intValue:number")
        good &= valid.reshape(len(sel), len(js)).all(axis=1)
        if values is None:
            continue
        values = values.reshape(len(sel), len(js))
        for col, j in enumerate(js):
            s = slots[j]
            if s.number:
                numbers[s.key] = values[:, col].astype(np.float64)
            if s.integer:
                ints[s.key] = values[:, col]
    ok[sel] = good
    keep = good.nonzero()[0]
    matches = _Matches(t, first[sel][keep], last[sel][keep], s_start[keep], s_end[keep],
                       {k: v[keep] for k, v in numbers.items()},
                       {k: v[keep] for k, v in ints.items()})
    return ok, matches


# -- blocks ----------------------------------------------------------------------------
@dataclass
class BlockScan:
    """What :func:`scan_block` decoded: per wanted kind, column chunks in file order;
    kept-scope events decoded whole as ``(seq, event)`` in file order; malformed lines as
    ``(line number, reason)``."""

    columns: list[list[EventColumns]]
    events: list[tuple[int, Event]] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _Kind:
    """Every match of one wanted kind in a block, concatenated over its templates."""

    wanted: Wanted
    parts: list[_Matches] = field(default_factory=list)


def _odd_lines(block: bytes, arr: np.ndarray, size: int, starts: np.ndarray,
               ends: np.ndarray) -> np.ndarray:
    """Indices of lines with a byte this decoder leaves to the line decoder: a control or
    non-ASCII byte, a backslash (escapes) or DEL."""
    if (block.isascii() and b"\\" not in block and b"\x7f" not in block
            and int(np.count_nonzero(arr[:size] < 0x20)) == len(starts) - 1):
        return np.zeros(0, np.int64)
    a = arr[:size]
    bad = np.flatnonzero((a < 0x20) | (a >= 0x7F) | (a == ord("\\")))
    bad = bad[~np.isin(bad, ends[:-1])]  # the newlines joining the lines
    return np.unique(np.searchsorted(starts, bad, side="right") - 1)


def scan_block(lines: Sequence[tuple[int, bytes]], wanted: Sequence[Wanted],
               scopes: Collection[str] = ()) -> BlockScan:
    """Decode ``(line number, line)`` pairs (non-empty, stripped) at once.

    Returns, per ``wanted`` kind, the columns of its events in file order (kinds of kept
    ``scopes`` — journey and API events — with span attributes and ``seq``), every other
    event of ``scopes`` decoded whole, and the malformed lines (reported, skipped). A
    ``strict`` kind's event whose wanted attributes are spelled otherwise is a kept event.
    """
    out = BlockScan([[] for _ in wanted])
    if not lines:
        return out
    texts = [line for _, line in lines]
    block = b"\n".join([*texts, bytes(_PAD)])  # the lines, then zero padding
    size = len(block) - _PAD - 1
    arr = np.frombuffer(block, np.uint8)
    words = np.ndarray((len(block) - 7,), "<u8", block, 0, (1,))  # a word at every byte
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    ends = np.cumsum(lengths + 1) - 1
    starts = ends - lengths
    fallback = set(_odd_lines(block, arr, size, starts, ends).tolist())
    q = np.flatnonzero(arr[:size] == ord('"'))
    first_q, end_q = np.searchsorted(q, starts), np.searchsorted(q, ends)
    fallback.update(np.flatnonzero((end_q - first_q) % 2).tolist())  # unpaired quotes
    if fallback:  # their quotes out, so the rest pairs up
        odd = np.zeros(len(texts), bool)
        odd[list(fallback)] = True
        q = q[~np.repeat(odd, end_q - first_q)]
    kinds = [_Kind(w) for w in wanted]
    if len(q):
        _find_events(kinds, block, q, arr, words, size)
    return _assemble(out, kinds, lines, block, starts, fallback, wanted, scopes)


def _find_events(kinds: list[_Kind], block: bytes, q: np.ndarray, arr: np.ndarray,
                 words: np.ndarray, size: int) -> None:
    """Match every event of every wanted kind (see the module docstring, steps 2-5)."""
    opening, closing = q[0::2], q[1::2]
    keys = np.flatnonzero(closing - opening == 5)  # strings of 4 characters
    keys = keys[words[opening[keys]] == _NAME_KEY]  # "name" followed by :"
    keys = keys[keys + 1 < len(opening)]
    value_start = opening[keys + 1] + 1
    value_len = closing[keys + 1] - value_start
    for kind in kinds:
        name = kind.wanted.name.encode()
        cand = keys[value_len == len(name)]
        if not len(cand):
            continue
        at = opening[cand + 1] + 1
        for off in range(0, len(name), 8):
            chunk = name[off:off + 8]
            mask = np.uint64((1 << (8 * len(chunk))) - 1)
            cand, at = (x[(words[at + off] & mask) == int.from_bytes(chunk, "little")]
                        for x in (cand, at))
        tried: set[int] = set()
        for _ in range(MAX_PROBES):
            fresh = [int(c) for c in cand[:len(tried) + 1] if int(c) not in tried]
            if not fresh:
                break
            probe = fresh[0]
            tried.add(probe)
            spec = probe_spec(block, int(opening[probe]), kind.wanted)
            template = None if spec is None else _template(kind.wanted, *spec)
            if template is None:
                continue
            ok, matches = _match(template, 2 * cand - template.name_quote, q, arr, words, size)
            if len(matches.start):
                kind.parts.append(matches)
                cand = cand[~ok]
            if not len(cand):
                break


def _assemble(out: BlockScan, kinds: list[_Kind], lines: Sequence[tuple[int, bytes]],
              block: bytes, starts: np.ndarray, fallback: set[int], wanted: Sequence[Wanted],
              scopes: Collection[str]) -> BlockScan:
    """Skeleton, walk, columns (see the module docstring, step 6)."""
    size = len(block) - _PAD - 1
    # every match, in position order
    ev_kind = np.concatenate([np.full(len(m.start), k, np.int64)
                              for k, kind in enumerate(kinds) for m in kind.parts]
                             or [np.zeros(0, np.int64)])
    ev_start = np.concatenate([m.start for kind in kinds for m in kind.parts]
                              or [np.zeros(0, np.int64)])
    ev_end = np.concatenate([m.end for kind in kinds for m in kind.parts]
                            or [np.zeros(0, np.int64)])
    order = np.argsort(ev_start, kind="stable")
    ev_kind, ev_start, ev_end = ev_kind[order], ev_start[order], ev_end[order]
    ev_line = np.searchsorted(starts, ev_start, side="right") - 1
    overlap = np.flatnonzero(ev_start[1:] < ev_end[:-1])  # cannot happen: be safe
    if len(overlap):
        fallback.update(ev_line[overlap].tolist())
        fallback.update(ev_line[overlap + 1].tolist())
    skeletons = _skeleton(block, size, ev_start, ev_end).split(b"\n")
    per_line = np.bincount(ev_line, minlength=len(lines))
    own = {(w.scope, w.name) for w in wanted if w.scope not in scopes}  # step kinds
    scope_of = [w.scope for w in wanted]
    # per placeholder run: scope, size, span attributes, line, index in line of its first
    run_scope: list[str] = []
    run_size: list[int] = []
    run_attrs: list[dict] = []
    run_line: list[int] = []
    run_index: list[int] = []
    events: list[tuple[int, Event]] = []
    for li, (lineno, _) in enumerate(lines):
        if li in fallback:
            continue
        try:
            items = walk_export(orjson.loads(skeletons[li]), placeholders=True)
        except (orjson.JSONDecodeError, ValueError):
            fallback.add(li)
            continue
        base = lineno << SEQ_SHIFT
        index = 0
        runs_before = len(run_size)
        line_events: list[tuple[int, Event]] = []
        bad = False
        for item in items:
            if type(item) is tuple:
                scope, run, attrs = item  # type: ignore[misc]
                if run.count("\t") != len(run):  # the trace's own string where an event goes
                    bad = True
                    break
                run_scope.append(scope)
                run_size.append(len(run))
                run_attrs.append(attrs)
                run_line.append(li)
                run_index.append(index)
                index += len(run)
                continue
            ev: Event = item  # type: ignore[assignment]
            if (ev.scope, ev.name) in own:  # a step event no template took: line decoder
                bad = True
                break
            if ev.scope in scopes:
                line_events.append((base | index, ev))
            index += 1
        if bad or sum(run_size[runs_before:]) != per_line[li]:
            del run_scope[runs_before:], run_size[runs_before:], run_attrs[runs_before:]
            del run_line[runs_before:], run_index[runs_before:]
            fallback.add(li)
            continue
        events.extend(line_events)
    # placeholders → runs (matches of walked lines, in order)
    walked = ~np.isin(ev_line, list(fallback)) if fallback else np.ones(len(ev_line), bool)
    sizes = np.asarray(run_size, np.int64)
    ev_run = np.repeat(np.arange(len(sizes)), sizes)
    if len(ev_run) != int(walked.sum()):  # cannot happen: every line checked its count
        raise AssertionError("placeholders and matches disagree")
    pos = np.flatnonzero(walked)
    scopes_list = sorted(set(run_scope) | set(scope_of))
    code = {s: i for i, s in enumerate(scopes_list)}
    run_code = np.array([code[s] for s in run_scope], np.int64)
    ev_scope = np.full(len(ev_line), -1, np.int64)
    ev_scope[pos] = run_code[ev_run] if len(ev_run) else ev_scope[pos]
    kept_codes = np.array([s in scopes for s in scopes_list], bool)
    want_code = np.array([code[s] for s in scope_of], np.int64)
    # a step event inside a journey/API span (or a request event inside the other kept
    # scope) must reach the caller whole: those lines take the line decoder
    wrong = walked & (ev_scope != want_code[ev_kind]) & kept_codes[np.maximum(ev_scope, 0)]
    if wrong.any():
        fallback.update(ev_line[wrong].tolist())
        return _assemble(out, kinds, lines, block, starts, fallback, wanted, scopes)
    seq_of_run = (np.array([lines[li][0] for li in run_line], np.int64) << SEQ_SHIFT) + \
        np.array(run_index, np.int64)
    ev_seq = np.zeros(len(ev_line), np.int64)
    if len(ev_run):
        first_of_run = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        ev_seq[pos] = seq_of_run[ev_run] + (np.arange(len(ev_run)) - first_of_run[ev_run])
    ev_runs = np.full(len(ev_line), -1, np.int64)
    ev_runs[pos] = ev_run
    use = walked & (ev_scope == want_code[ev_kind])
    index_in_kind = _index_in_kind(kinds, order)
    chunks = _columns(kinds, ev_kind, index_in_kind, use, ev_seq, ev_runs, run_attrs, block,
                      scopes)
    return _merge_lines(out, chunks, ev_kind, ev_line, use, lines, fallback, wanted, scopes,
                        events)


def _skeleton(block: bytes, size: int, start: np.ndarray, end: np.ndarray) -> bytes:
    """The block with every match replaced by :data:`PLACEHOLDER`; matches that follow
    each other after a comma (events of one span) become one run, written at once."""
    n = len(start)
    if not n:
        return block[:size]
    arr = np.frombuffer(block, np.uint8)
    follows = (start[1:] == end[:-1] + 1) & (arr[end[:-1]] == ord(","))
    last = np.append(np.flatnonzero(~follows), n - 1)
    first = np.concatenate([[0], last[:-1] + 1])
    runs: dict[int, bytes] = {}
    parts = []
    prev = 0
    for a, b, k in zip(start[first].tolist(), end[last].tolist(), (last - first + 1).tolist(),
                       strict=True):
        parts.append(block[prev:a])
        text = runs.get(k)
        if text is None:
            text = runs[k] = PLACEHOLDER + (b"," + PLACEHOLDER) * (k - 1)
        parts.append(text)
        prev = b
    parts.append(block[prev:size])
    return b"".join(parts)


def _index_in_kind(kinds: list[_Kind], order: np.ndarray) -> np.ndarray:
    """For each match in position order: its row in its kind's concatenated templates."""
    rows = np.concatenate([np.arange(sum(len(m.start) for m in kind.parts), dtype=np.int64)
                           for kind in kinds] or [np.zeros(0, np.int64)])
    return rows[order]


def _columns(kinds: list[_Kind], ev_kind: np.ndarray, index_in_kind: np.ndarray,
             use: np.ndarray, ev_seq: np.ndarray, ev_run: np.ndarray, run_attrs: list[dict],
             block: bytes, scopes: Collection[str]) -> list[EventColumns | None]:
    """One EventColumns per kind over the used matches, in position order."""
    result: list[EventColumns | None] = []
    for k, kind in enumerate(kinds):
        w = kind.wanted
        rows = np.flatnonzero(use & (ev_kind == k))
        if not len(rows) or not kind.parts:
            result.append(None)
            continue
        take = index_in_kind[rows]
        n = len(take)
        numbers, ints, strings = {}, {}, {}
        for key in w.numbers:
            numbers[key] = np.concatenate(
                [m.numbers.get(key, np.full(len(m.start), np.nan)) for m in kind.parts])[take]
        for key in w.ints:
            ints[key] = np.concatenate(
                [m.ints.get(key, np.full(len(m.start), MISSING_INT, np.int64))
                 for m in kind.parts])[take]
        for key in w.strings:
            lo = np.concatenate([_slot_bounds(m, key)[0] for m in kind.parts])[take]
            hi = np.concatenate([_slot_bounds(m, key)[1] for m in kind.parts])[take]
            strings[key] = _strings(block, lo, hi)
        cols = EventColumns(w, n, numbers, strings, ints)
        if w.scope in scopes:
            cols.seq = ev_seq[rows]
            cols.span_attrs = [run_attrs[r] for r in ev_run[rows].tolist()]
        result.append(cols)
    return result


def _strings(block: bytes, lo: np.ndarray, hi: np.ndarray) -> list[bytes | None]:
    """``block[lo:hi]`` per row (None where ``lo`` < 0): short values through one
    fixed-width gather (NUL-padded, which ``tolist`` strips: values hold no NUL)."""
    size = hi - lo
    have = lo >= 0
    width = int(size[have].max()) if have.any() else 0
    if not have.all() or width > 64 or not len(lo):
        return [block[a:b] if a >= 0 else None
                for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
    arr = np.frombuffer(block, np.uint8)
    rows = _rows(arr, lo, max(width, 1)) if len(arr) >= width else np.zeros((len(lo), 1))
    rows = np.where(np.arange(rows.shape[1]) < size[:, None], rows, 0).astype(np.uint8)
    return np.ascontiguousarray(rows).view(f"S{rows.shape[1]}").ravel().tolist()


def _slot_bounds(m: _Matches, key: str) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the string slot of ``key`` per match (-1: the layout lacks it)."""
    for j, s in enumerate(m.template.slots):
        if s.string and s.key == key:
            return m.slot_start[:, j], m.slot_end[:, j]
    missing = np.full(len(m.start), -1, np.int64)
    return missing, missing


def _slice(cols: EventColumns, lo: int, hi: int) -> EventColumns:
    out = EventColumns(cols.wanted, hi - lo, {k: v[lo:hi] for k, v in cols.numbers.items()},
                       {k: v[lo:hi] for k, v in cols.strings.items()},
                       {k: v[lo:hi] for k, v in cols.ints.items()})
    if cols.seq is not None:
        out.seq = cols.seq[lo:hi]
        out.span_attrs = cols.span_attrs[lo:hi]  # type: ignore[index]
    return out


def _merge_lines(out: BlockScan, chunks: list[EventColumns | None], ev_kind: np.ndarray,
                 ev_line: np.ndarray, use: np.ndarray, lines: Sequence[tuple[int, bytes]],
                 fallback: set[int], wanted: Sequence[Wanted], scopes: Collection[str],
                 events: list[tuple[int, Event]]) -> BlockScan:
    """Block columns, interleaved by line with the lines the line decoder took."""
    line_wanted = [w for w in wanted if w.scope not in scopes]
    slots = {w: i for i, w in enumerate(wanted)}
    cut = {k: ev_line[use & (ev_kind == k)] for k in range(len(wanted))}
    done = dict.fromkeys(range(len(wanted)), 0)
    for li in sorted(fallback):
        for k, cols in enumerate(chunks):  # the block's columns before this line
            if cols is None:
                continue
            upto = int(np.searchsorted(cut[k], li))
            if upto > done[k]:
                out.columns[k].append(_slice(cols, done[k], upto))
                done[k] = upto
        lineno, line = lines[li]
        try:
            columns, kept = line_columns(line, line_wanted, scopes)
        except ValueError as exc:
            out.problems.append((lineno, str(exc)))
            continue
        for cols in columns:
            out.columns[slots[cols.wanted]].append(cols)
        base = lineno << SEQ_SHIFT
        events.extend((base | i, ev) for i, ev in enumerate(kept))
    for k, cols in enumerate(chunks):
        if cols is not None and cols.size > done[k]:
            out.columns[k].append(_slice(cols, done[k], cols.size))
    events.sort(key=lambda pair: pair[0])
    out.events = events
    return out
