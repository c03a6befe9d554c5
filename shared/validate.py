"""Bounds on agent input, checked by the collector before anything reaches Redis.

msgspec checks types while it decodes; this module checks what types cannot say:
how many events a batch may carry, which protocol versions are understood, that
every number is finite and not negative, that strings and collections stay
under documented lengths, and that timestamps fall in a plausible window.  A
batch that breaks a bound is refused whole with a :class:`Rejected` naming the
bound (``code``, a stable word for counters) and the offending value (``reason``,
for people).  Bounds on one event (:func:`check_event`) let the collector keep the
other events of its batch; bounds on the batch (:func:`check_envelope`) do not.
``docs/protocol.md`` lists every limit here.

It also reads *old* data defensively: :func:`finite` and :func:`clean_session`
turn non-finite numbers that older versions stored into "missing" instead of
letting them crash a trace or a flame graph.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from buildtel.shared.protocol import PROTOCOL_VERSION, BuildSession, Event, EventBatch, TargetFinished

# Events per batch.  The SDK sends 500 (``batch_size``), the recorder's republish 200; folding a
# batch of this many events takes ~30 ms of Redis time on the reference machine (see
# docs/protocol.md), so no legal batch can make a fold outlast the collector's ack wait.
MAX_BATCH_EVENTS = 10_000
# Characters per string and entries per list/dict: the SDK's sanitisers cut at the same bounds
# (shared/sanitize.py), so a batch the SDK built never exceeds them.
MAX_STRING_CHARS = 4096
MAX_ITEMS = 2000
# Plausible timestamps: not before 2000-01-01T00:00:00Z, not more than this ahead of the receiver's
# clock.  Milliseconds sent where seconds are due land ~55 000 years ahead and are refused.
MIN_TIMESTAMP = 946_684_800.0
FUTURE_MARGIN_S = 86_400.0
# The one integer field that may legitimately be negative (a process killed by a signal).
_SIGNED_INTS = frozenset({"exit_code"})


class Rejected(ValueError):
    """A batch broke a documented bound: ``code`` names the bound, ``reason`` the value."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _walk(value: Any, path: str) -> None:
    """Check every number, string and collection inside one event (recursively)."""
    t = type(value)
    if t is float:
        if not math.isfinite(value):
            raise Rejected("non_finite", f"{path} is {value!r}, not a finite number")
        if value < 0.0:
            raise Rejected("negative", f"{path} is {value!r}; durations, times and sizes cannot be negative")
    elif t is int:
        if value < 0 and path.rpartition(".")[2] not in _SIGNED_INTS:
            raise Rejected("negative", f"{path} is {value}; counts and sizes cannot be negative")
    elif t is str:
        if len(value) > MAX_STRING_CHARS:
            raise Rejected("string_too_long",
                           f"{path} has {len(value)} characters, more than the {MAX_STRING_CHARS} allowed")
    elif t is list:
        if len(value) > MAX_ITEMS:
            raise Rejected("too_many_items", f"{path} has {len(value)} entries, more than the {MAX_ITEMS} allowed")
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]")
    elif t is dict:
        if len(value) > MAX_ITEMS:
            raise Rejected("too_many_items", f"{path} has {len(value)} entries, more than the {MAX_ITEMS} allowed")
        for k, item in value.items():
            _walk(k, f"{path} key")
            _walk(item, f"{path}[{k[:40]!r}]")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            _walk(getattr(value, name), f"{path}.{name}")
    # bool, None and Literal strings (checked by msgspec) need nothing more


def _check_time(value: float, path: str, now: float) -> None:
    if value < MIN_TIMESTAMP or value > now + FUTURE_MARGIN_S:
        hint = " (milliseconds sent as seconds?)" if value > now + FUTURE_MARGIN_S else ""
        raise Rejected("timestamp_out_of_window",
                       f"{path} = {value!r} is outside the plausible window [2000-01-01, receiver clock + "
                       f"{FUTURE_MARGIN_S:g} s]{hint}")


def check_envelope(batch: EventBatch) -> None:
    """Raise :class:`Rejected` if the batch *as a whole* breaks a bound (its version, its size):
    then none of its events can be trusted or afforded, and the batch is refused whole."""
    if batch.version != PROTOCOL_VERSION:
        raise Rejected("unknown_version",
                       f"protocol version {batch.version} is not understood (this service speaks {PROTOCOL_VERSION})")
    if len(batch.events) > MAX_BATCH_EVENTS:
        raise Rejected("too_many_events",
                       f"batch of {len(batch.events)} events exceeds the cap of {MAX_BATCH_EVENTS} per batch")


# -- fast path ---------------------------------------------------------------------------------
# Walking every field of every event with _walk cost ~3.4 us/event, more than decoding the batch
# (the collector's biggest cost).  So each event type gets a checker generated from its schema
# (msgspec.inspect): one boolean expression, no recursion, no paths built.  It only says "all
# good"; when it says no, _walk runs and names the bound and the value.  Each expression is at
# least as strict as _walk (it never passes what _walk refuses), so the outcome is the same.
_INF = math.inf
_FAST_GLOBALS: dict[str, Any] = {"_INF": _INF, "_S": MAX_STRING_CHARS, "_N": MAX_ITEMS, "_walk_ok": None}
_fast_struct: dict[type, str] = {}  # struct type -> name of its generated checker


def _walk_ok(value: Any) -> bool:
    try:
        _walk(value, "")
    except Rejected:
        return False
    return True


_FAST_GLOBALS["_walk_ok"] = _walk_ok


def _expr(t: Any, v: str, name: str, depth: int = 0) -> str:
    """A Python expression, True when value ``v`` of msgspec type ``t`` passes every bound."""
    mi = msgspec.inspect
    while isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.FloatType):
        return f"(0.0 <= {v} < _INF)"  # False for NaN, inf and negatives
    if isinstance(t, mi.IntType):
        return "True" if name in _SIGNED_INTS else f"({v} >= 0)"
    if isinstance(t, (mi.BoolType, mi.NoneType)):
        return "True"
    if isinstance(t, mi.StrType):
        return f"(len({v}) <= _S)"
    if isinstance(t, mi.LiteralType) and all(type(x) is str and len(x) <= MAX_STRING_CHARS for x in t.values):
        return "True"  # msgspec already checked it is one of these short values
    if isinstance(t, mi.UnionType):
        rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(rest) == 1 and len(rest) < len(t.types):
            return f"({v} is None or {_expr(rest[0], v, name, depth)})"
    if isinstance(t, mi.ListType) and depth < 3:
        item = t.item_type
        inner = item.type if isinstance(item, mi.Metadata) else item
        if isinstance(inner, mi.StrType):
            return f"(not {v} or (len({v}) <= _N and max(map(len, {v})) <= _S))"
        x = f"_x{depth}"
        return f"(len({v}) <= _N and all({_expr(item, x, name, depth + 1)} for {x} in {v}))"
    if isinstance(t, mi.DictType) and depth < 3:
        k, x = f"_k{depth}", f"_x{depth}"
        return (f"(len({v}) <= _N and all({_expr(t.key_type, k, '', depth + 1)} and "
                f"{_expr(t.value_type, x, '', depth + 1)} for {k}, {x} in {v}.items()))")
    if isinstance(t, mi.StructType):
        return f"{_fast_checker(t.cls)}({v})"
    return f"_walk_ok({v})"  # anything else: the generic walk, as a yes/no


def _fast_checker(cls: type) -> str:
    """Name of the generated checker of struct type ``cls`` (generated on first use)."""
    name = _fast_struct.get(cls)
    if name is None:
        name = _fast_struct[cls] = f"_ok_{cls.__name__}_{len(_fast_struct)}"
        info = msgspec.inspect.type_info(cls)
        assert isinstance(info, msgspec.inspect.StructType), f"{cls!r} is not a struct"
        body = " and ".join(_expr(f.type, f"v.{f.name}", f.name) for f in info.fields) or "True"
        exec(f"def {name}(v):\n    return {body}\n", _FAST_GLOBALS)
    return name


_FAST: dict[type, Any] = {cls: _FAST_GLOBALS[_fast_checker(cls)] for cls in Event.__args__}


def _fast_ok(ev: Event, hi: float) -> bool:
    """True when ``ev`` passes every bound of :func:`check_event` (``hi``: latest plausible time)."""
    if not (MIN_TIMESTAMP <= ev.ts <= hi and _FAST[type(ev)](ev)):
        return False
    if type(ev) is TargetFinished:
        return MIN_TIMESTAMP <= ev.start <= hi and ev.start + ev.duration_s <= hi
    return True


def check_event(ev: Event, now: float) -> None:
    """Raise :class:`Rejected` if one event breaks a bound.  Every such bound is local to the
    event, so the other events of its batch stay good (the collector keeps them)."""
    if _fast_ok(ev, now + FUTURE_MARGIN_S):
        return
    where = f"event seq {ev.seq} ({type(ev).__name__})"
    _walk(ev, where)
    _check_time(ev.ts, f"{where}.ts", now)
    if type(ev) is TargetFinished:
        _check_time(ev.start, f"{where}.start", now)
        _check_time(ev.start + ev.duration_s, f"{where}.start + duration_s", now)


def refused_events(batch: EventBatch, now: float) -> dict[int, Rejected]:
    """Index in ``batch.events`` -> why that event is refused, for the events that break a bound
    (empty when all are good).  Call :func:`check_envelope` first."""
    out: dict[int, Rejected] = {}
    hi = now + FUTURE_MARGIN_S
    for i, ev in enumerate(batch.events):
        if _fast_ok(ev, hi):
            continue
        try:
            check_event(ev, now)
        except Rejected as exc:
            out[i] = exc
    return out


def check_batch(batch: EventBatch, now: float) -> None:
    """Raise :class:`Rejected` if ``batch`` (already decoded) breaks any bound, its first event
    that does included; ``now`` is the receiver's clock (Unix seconds).  The recorder refuses
    such a batch whole; the collector keeps its good events (:func:`refused_events`)."""
    check_envelope(batch)
    for ev in batch.events:
        check_event(ev, now)


# -- reading old data --------------------------------------------------------------------------
def finite(value: float | None, default: float | None = None) -> float | None:
    """``value`` if it is a finite number, else ``default`` (old stores may hold NaN/inf)."""
    return value if value is not None and math.isfinite(value) else default


# A duration is drawn and exported in integer micro- or nanoseconds: past int64 nanoseconds (~292
# years) it is not a duration but a corrupted value, and is read as missing too.
_MAX_DURATION_S = (2**63 - 1) / 1e9


def _good_span(start: float, duration: float) -> bool:
    return math.isfinite(start) and 0.0 <= duration < _MAX_DURATION_S  # also False for NaN


def clean_session(session: BuildSession) -> tuple[BuildSession, int]:
    """``session`` with non-finite or negative values read as missing, and how many were.

    A target whose start or duration is not a finite, non-negative number is left out (there
    is no time to draw it at); a phase likewise; optional figures become ``None``; session
    times become 0 (which readers already treat as "unknown").  Sessions without such values
    are returned as they are (no copy).
    """
    missing = 0
    targets = session.targets
    if any(not _good_span(t.start, t.duration_s) or not math.isfinite(t.end)
           or any(not _good_span(0.0, p.duration_s) for p in t.phases)
           or (t.cpu_s is not None and not math.isfinite(t.cpu_s)) for t in targets):
        kept = []
        for t in targets:
            if not _good_span(t.start, t.duration_s) or not math.isfinite(t.end):
                missing += 1
                continue
            phases = [p for p in t.phases if _good_span(0.0, p.duration_s)]
            missing += len(t.phases) - len(phases)
            cpu = finite(t.cpu_s)
            missing += cpu is None and t.cpu_s is not None
            kept.append(msgspec.structs.replace(t, phases=phases, cpu_s=cpu))
        targets = kept
    fields: dict[str, Any] = {}
    for name in ("start", "finish", "duration_s"):
        v = getattr(session, name)
        if not math.isfinite(v):
            fields[name] = 0.0
            missing += 1
    if session.cpu_s is not None and not math.isfinite(session.cpu_s):
        fields["cpu_s"] = None
        missing += 1
    if not math.isfinite(session.cache_hit_rate):
        fields["cache_hit_rate"] = 0.0
        missing += 1
    if targets is not session.targets:
        fields["targets"] = targets
    if not fields:
        return session, 0
    return msgspec.structs.replace(session, **fields), missing
