"""W3C Trace Context Level 2 propagation on top of OpenTelemetry.

OpenTelemetry's own ``TraceContextTextMapPropagator`` uses the first of
repeated ``traceparent`` fields (the spec says restart the trace), forwards
undefined flag bits and drops the whole ``tracestate`` on duplicate keys, which
Level 2 lets a receiver keep.  This module is strict to
https://www.w3.org/TR/trace-context-2/ instead:

* ``traceparent``: version ``00`` must be exactly 55 characters; a higher
  version is read from its first 55 characters when the rest starts with
  ``-``; version ``ff``, upper-case hex and all-zero ids are invalid; more than
  one ``traceparent`` field is invalid.  Only the *sampled* and *random* flags
  are carried on, because the spec requires unknown flags to be sent as zero.
* ``tracestate``: all fields are joined with ``,`` in order (RFC 7230 §3.2.2),
  empty and OWS-only members are skipped, at most 32 members, Level 2 keys and
  values.  An invalid ``tracestate`` is dropped while a valid ``traceparent``
  is kept.  Duplicate keys keep the first (left-most, most recent) entry by
  default; ``duplicate_keys="drop"`` discards the whole ``tracestate``.
  ``key_grammar="level1"`` checks keys against Level 1's stricter
  simple-key / ``tenant@system`` grammar instead.

Helpers cover HTTP header mappings (dicts, aiohttp/multidict ``CIMultiDict``,
NATS header dicts, lists of pairs) and ``TRACEPARENT``/``TRACESTATE``
environment variables for child processes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, Literal, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

__all__ = [
    "DEFAULT_PROPAGATOR",
    "MAX_TRACESTATE_MEMBERS",
    "TRACEPARENT_ENV",
    "TRACEPARENT_HEADER",
    "TRACESTATE_ENV",
    "TRACESTATE_HEADER",
    "EnvGetter",
    "EnvSetter",
    "HeaderGetter",
    "HeaderSetter",
    "KeyGrammar",
    "Traceparent",
    "W3CTraceContextPropagator",
    "extract_env",
    "extract_headers",
    "format_traceparent",
    "format_tracestate",
    "inject_env",
    "inject_headers",
    "is_valid_tracestate_key",
    "is_valid_tracestate_value",
    "parse_traceparent",
    "parse_tracestate",
]

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
TRACEPARENT_ENV = "TRACEPARENT"
TRACESTATE_ENV = "TRACESTATE"
MAX_TRACESTATE_MEMBERS = 32

_FIELDS = (TRACEPARENT_HEADER, TRACESTATE_HEADER)
# Sampled (0x01) and random trace id (0x02) are the only flags Level 2 defines.
_KNOWN_FLAGS = TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID
_OWS = " \t"
_VERSION_00_LENGTH = 55

_VERSION_RE = re.compile(r"[0-9a-f]{2}")
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# Level 2 (the "Key" rule of the tracestate header since w3c/trace-context#386; the suite
# checks it at STRICT_LEVEL=2): key = (lcalpha / DIGIT) 0*255(keychar),
# keychar = lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@".  So "foo@",
# "a@b@c" and a 242-character tenant are valid keys; only the total length
# (256) and the first character (not "@") bound them.
_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_\-*/@]{0,255}")
# Level 1 (the 2020 Recommendation): key = simple-key / multi-tenant-key;
# simple-key = lcalpha 0*255(keychar); multi-tenant-key = tenant-id "@"
# system-id, tenant-id = (lcalpha / DIGIT) 0*240(keychar), system-id = lcalpha
# 0*13(keychar); here keychar has no "@", so "a@b@c" and "foo@" are invalid.
_L1_KEYCHAR = r"[a-z0-9_\-*/]"
_L1_KEY_RE = re.compile(
    rf"[a-z]{_L1_KEYCHAR}{{0,255}}|[a-z0-9]{_L1_KEYCHAR}{{0,240}}@[a-z]{_L1_KEYCHAR}{{0,13}}"
)
# value = 0*255(chr) nblk-chr; chr = %x20 / nblk-chr; nblk-chr excludes "," and "=".
_VALUE_RE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
# Entries longer than this are the first to go when tracestate must shrink (spec §3.3.1.5).
_LONG_ENTRY = 128

DuplicateKeys = Literal["keep-first", "drop"]
KeyGrammar = Literal["level2", "level1"]
_KEY_GRAMMARS = {"level2": _KEY_RE, "level1": _L1_KEY_RE}


class _ValidatedTraceState(TraceState):
    """A ``TraceState`` holding entries this module has already validated.

    OpenTelemetry's ``TraceState`` checks keys against the Level 1 grammar and
    drops (with only a log line) Level 2 keys such as ``foo@`` or a 242-character
    tenant; the parser below has checked every entry against the grammar asked
    for, so they are stored as given.  ``add``/``update``/``delete`` still return
    plain ``TraceState`` objects with OpenTelemetry's own checks.
    """

    def __init__(self, entries: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__()
        self._dict = dict(entries)


class Traceparent(NamedTuple):
    """A parsed ``traceparent`` value (ids as integers, flags as received)."""

    version: int
    trace_id: int
    parent_id: int
    trace_flags: int


def parse_traceparent(value: str) -> Traceparent | None:
    """Parse one ``traceparent`` field value; ``None`` means invalid (restart the trace)."""
    # HTTP strips OWS around field values; other carriers (env, NATS) may not.
    value = value.strip(_OWS)
    if len(value) < _VERSION_00_LENGTH:
        return None
    version = value[:2]
    if not _VERSION_RE.fullmatch(version) or version == "ff":
        return None
    if version == "00":
        if len(value) != _VERSION_00_LENGTH:
            return None
    elif len(value) > _VERSION_00_LENGTH and value[_VERSION_00_LENGTH] != "-":
        # A future version may append fields, but only after another dash.
        return None
    match = _TRACEPARENT_RE.fullmatch(value[:_VERSION_00_LENGTH])
    if match is None:
        return None
    trace_id = int(match[2], 16)
    parent_id = int(match[3], 16)
    if trace_id == 0 or parent_id == 0:
        return None
    return Traceparent(int(version, 16), trace_id, parent_id, int(match[4], 16))


def is_valid_tracestate_key(key: str, grammar: KeyGrammar = "level2") -> bool:
    """True when ``key`` matches the tracestate key grammar of ``grammar`` (Level 2 by default)."""
    try:
        pattern = _KEY_GRAMMARS[grammar]
    except KeyError:
        raise ValueError(f"key grammar must be 'level2' or 'level1', not {grammar!r}") from None
    return pattern.fullmatch(key) is not None


def is_valid_tracestate_value(value: str) -> bool:
    """True when ``value`` matches the tracestate value grammar."""
    return _VALUE_RE.fullmatch(value) is not None


def parse_tracestate(
    fields: Iterable[str],
    *,
    duplicate_keys: DuplicateKeys = "keep-first",
    key_grammar: KeyGrammar = "level2",
) -> TraceState | None:
    """Parse every ``tracestate`` field of one message, in order.

    Returns ``None`` when the combined list is invalid (it must then be dropped),
    otherwise a ``TraceState`` (empty when there were no members).
    """
    members = []
    for raw in ",".join(fields).split(","):
        member = raw.strip(_OWS)
        # Empty and OWS-only members are legal, e.g. from joining an empty field.
        if member:
            members.append(member)
    if len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    entries: dict[str, str] = {}
    for member in members:
        key, sep, value = member.partition("=")
        if not sep or not is_valid_tracestate_key(key, key_grammar) or not is_valid_tracestate_value(value):
            return None
        if key in entries:
            # Level 2 (PR #552) makes senders responsible for unique keys and
            # lets receivers pass duplicates on or drop the extra ones; the
            # left-most entry is the most recent, so it is the one kept.
            if duplicate_keys == "drop":
                return None
            continue
        entries[key] = value
    return _ValidatedTraceState(entries.items())


def format_traceparent(span_context: SpanContext) -> str:
    """Render a span context as a version ``00`` ``traceparent`` value."""
    flags = int(span_context.trace_flags) & _KNOWN_FLAGS
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{flags:02x}"


def format_tracestate(trace_state: Mapping[str, str]) -> str:
    """Render tracestate entries without optional whitespace (the spec's preferred form)."""
    return ",".join(f"{key}={value}" for key, value in trace_state.items())


def _truncate(entries: list[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """Shrink to ``limit`` members as the spec asks: long entries first, then from the end.

    Index 0 is never removed because it holds the entry we just wrote.
    """
    entries = list(entries)
    index = len(entries) - 1
    while len(entries) > limit and index > 0:
        key, value = entries[index]
        if len(key) + 1 + len(value) > _LONG_ENTRY:
            del entries[index]
        index -= 1
    del entries[max(limit, 1) :]
    return entries


def _text(value: Any) -> str:
    # Raw ASGI/NATS headers are bytes; HTTP header octets map 1:1 onto latin-1.
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    return str(value)


def _pairs(carrier: Any) -> Iterator[tuple[Any, Any]]:
    if carrier is None or isinstance(carrier, str | bytes):
        return
    items = getattr(carrier, "items", None)
    # multidict's items() yields every repeated field, unlike dict-style lookups.
    yield from items() if callable(items) else carrier


class HeaderGetter(Getter[Any]):
    """Case-insensitive getter that returns every field with a given name.

    Works with dicts (values may be lists of repeated fields), multidict
    ``CIMultiDict``/``MultiDict`` (aiohttp), NATS ``msg.headers`` dicts,
    ``email.message.Message`` and iterables of ``(name, value)`` pairs.
    """

    def get(self, carrier: Any, key: str) -> list[str] | None:
        wanted = key.lower()
        values: list[str] = []
        for name, value in _pairs(carrier):
            if _text(name).lower() != wanted:
                continue
            if isinstance(value, list | tuple):
                values.extend(_text(item) for item in value)
            else:
                values.append(_text(value))
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [_text(name) for name, _ in _pairs(carrier)]


class HeaderSetter(Setter[Any]):
    """Setter that replaces every case variant of a field, so exactly one is sent."""

    def set(self, carrier: Any, key: str, value: str) -> None:
        self.remove(carrier, key)
        carrier[key] = value

    def remove(self, carrier: Any, key: str) -> None:
        """Delete all fields named ``key`` in any letter case."""
        wanted = key.lower()
        for name in {name for name in list(carrier.keys()) if _text(name).lower() == wanted}:
            # multidict's __delitem__ removes every occurrence of the name.
            del carrier[name]


class EnvGetter(Getter[Mapping[str, str]]):
    """Reads ``TRACEPARENT``/``TRACESTATE`` from an environment mapping."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key.upper())
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


class EnvSetter(Setter[MutableMapping[str, str]]):
    """Writes ``TRACEPARENT``/``TRACESTATE`` into an environment mapping."""

    def set(self, carrier: MutableMapping[str, str], key: str, value: str) -> None:
        carrier[key.upper()] = value


HEADER_GETTER = HeaderGetter()
HEADER_SETTER = HeaderSetter()
ENV_GETTER = EnvGetter()
ENV_SETTER = EnvSetter()


def _default_vendor_value(span_context: SpanContext) -> str:
    # The spec's generic "rojo=00f067aa0ba902b7" form: our position is our span id.
    return f"{span_context.span_id:016x}"


class W3CTraceContextPropagator(TextMapPropagator):
    """OpenTelemetry ``TextMapPropagator`` strict to W3C Trace Context Level 2.

    ``vendor_key``: when set, ``inject`` writes ``vendor_key=<value>`` at the
    front of ``tracestate`` for spans created here (never for a pass-through
    remote context, since an unchanged ``traceparent`` forbids changing
    ``tracestate``).  ``vendor_value`` computes the value (default: span id).
    ``duplicate_keys``: ``"keep-first"`` (default) or ``"drop"``.
    ``key_grammar``: ``"level2"`` (default, what the official suite checks) or
    ``"level1"`` to drop a tracestate whose keys only Level 2 allows.
    """

    def __init__(
        self,
        *,
        vendor_key: str | None = None,
        vendor_value: Callable[[SpanContext], str] | None = None,
        duplicate_keys: DuplicateKeys = "keep-first",
        key_grammar: KeyGrammar = "level2",
    ) -> None:
        if key_grammar not in _KEY_GRAMMARS:
            raise ValueError(f"key_grammar must be 'level2' or 'level1', not {key_grammar!r}")
        if vendor_key is not None and not is_valid_tracestate_key(vendor_key, key_grammar):
            raise ValueError(f"invalid tracestate key: {vendor_key!r}")
        if duplicate_keys not in ("keep-first", "drop"):
            raise ValueError(f"duplicate_keys must be 'keep-first' or 'drop', not {duplicate_keys!r}")
        self.vendor_key = vendor_key
        self.vendor_value = vendor_value or _default_vendor_value
        self.duplicate_keys: DuplicateKeys = duplicate_keys
        self.key_grammar: KeyGrammar = key_grammar

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        """Return ``context`` with the remote parent from ``carrier``, or unchanged if invalid."""
        if context is None:
            context = Context()
        if getter is default_getter:
            # OTel's default getter is case-sensitive and cannot report repeated
            # fields; ours handles the same dict carriers and more.
            getter = HEADER_GETTER
        parents = getter.get(carrier, TRACEPARENT_HEADER)
        if not parents or len(parents) != 1:
            return context  # absent, or repeated: the spec says restart the trace
        parent = parse_traceparent(_text(parents[0]))
        if parent is None:
            return context
        # The spec forbids parsing tracestate unless traceparent was valid.
        states = getter.get(carrier, TRACESTATE_HEADER) or []
        trace_state = parse_tracestate(
            [_text(value) for value in states],
            duplicate_keys=self.duplicate_keys,
            key_grammar=self.key_grammar,
        )
        flags = TraceFlags(parent.trace_flags & _KNOWN_FLAGS)
        state = trace_state if trace_state is not None else TraceState()
        span_context = SpanContext(parent.trace_id, parent.parent_id, True, flags, state)
        return trace.set_span_in_context(NonRecordingSpan(span_context), context)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        """Write ``traceparent`` (version 00) and, when non-empty, ``tracestate``."""
        span_context = trace.get_current_span(context).get_span_context()
        if not span_context.is_valid:
            return
        if setter is default_setter:
            # Replacing case variants guarantees a single traceparent on the wire.
            setter = HEADER_SETTER
        setter.set(carrier, TRACEPARENT_HEADER, format_traceparent(span_context))
        entries = list(span_context.trace_state.items())
        if self.vendor_key is not None and not span_context.is_remote:
            entries = self._with_vendor_entry(entries, span_context)
        if entries:
            setter.set(carrier, TRACESTATE_HEADER, format_tracestate(dict(entries)))

    def _with_vendor_entry(
        self, entries: list[tuple[str, str]], span_context: SpanContext
    ) -> list[tuple[str, str]]:
        value = self.vendor_value(span_context)
        if not is_valid_tracestate_value(value):
            return entries  # never emit a tracestate the next hop must drop
        # Update = move to the front; the other members keep their order.
        updated = [(self.vendor_key, value)] + [(k, v) for k, v in entries if k != self.vendor_key]
        return _truncate(updated, MAX_TRACESTATE_MEMBERS)  # type: ignore[arg-type]

    @property
    def fields(self) -> set[str]:
        return set(_FIELDS)


DEFAULT_PROPAGATOR = W3CTraceContextPropagator()
_Prop = W3CTraceContextPropagator | None


def inject_headers(
    headers: MutableMapping[str, Any] | None = None, context: Context | None = None, *, propagator: _Prop = None
) -> MutableMapping[str, Any]:
    """Write the current (or ``context``'s) trace context into ``headers`` and return it.

    Stale ``traceparent``/``tracestate`` fields in any case are removed first, so a
    reused dict never carries a tracestate that belongs to another parent.  Works
    for plain dicts, NATS ``headers=`` dicts and multidict ``CIMultiDict``.
    """
    if headers is None:
        headers = {}
    for name in _FIELDS:
        HEADER_SETTER.remove(headers, name)
    (propagator or DEFAULT_PROPAGATOR).inject(headers, context, HEADER_SETTER)
    return headers


def extract_headers(headers: Any, context: Context | None = None, *, propagator: _Prop = None) -> Context:
    """Build a context whose remote parent comes from HTTP/NATS ``headers`` (may be ``None``)."""
    return (propagator or DEFAULT_PROPAGATOR).extract(headers, context, HEADER_GETTER)


def inject_env(
    env: MutableMapping[str, str] | None = None, context: Context | None = None, *, propagator: _Prop = None
) -> MutableMapping[str, str]:
    """Set ``TRACEPARENT``/``TRACESTATE`` for a child process and return the mapping.

    ``env`` defaults to a copy of ``os.environ``.  Inherited values are removed
    first: without a current span the child must start its own trace rather
    than join the grandparent's.
    """
    if env is None:
        env = dict(os.environ)
    env.pop(TRACEPARENT_ENV, None)
    env.pop(TRACESTATE_ENV, None)
    (propagator or DEFAULT_PROPAGATOR).inject(env, context, ENV_SETTER)
    return env


def extract_env(
    env: Mapping[str, str] | None = None, context: Context | None = None, *, propagator: _Prop = None
) -> Context:
    """Build a context from ``TRACEPARENT``/``TRACESTATE`` (default: ``os.environ``)."""
    return (propagator or DEFAULT_PROPAGATOR).extract(
        os.environ if env is None else env, context, ENV_GETTER
    )
