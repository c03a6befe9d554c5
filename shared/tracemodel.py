"""The span record (the tracer's schema), shared by every ingest path, the store, the exporters and the CLI.

OTLP (protobuf and JSON), the bus exporter and the session synthesizer all
produce :class:`SpanRecord`; the store keeps them as MessagePack; the Zipkin,
Jaeger and OTLP exporters read them.  Numbers follow OTLP so nothing is lost
in either direction: ``kind`` uses OTLP's ``SpanKind`` numbering (1 internal,
2 server, 3 client, 4 producer, 5 consumer; 0 unspecified), ``status_code``
OTLP's (0 unset, 1 ok, 2 error), times are Unix nanoseconds, ids are lowercase
hex (trace 32 digits, span 16).

Attribute values keep their OTLP type through MessagePack: ``str``, ``bool``,
``int``, ``float``, ``bytes``, lists of those (arrays) and dicts (kvlists).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

# OTLP SpanKind numbers (the SDK's ``SpanKind`` enum is the same list, shifted by one).
KIND_UNSPECIFIED, KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = range(6)
KIND_NAMES = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
STATUS_NAMES = {0: "UNSET", 1: "OK", 2: "ERROR"}

# The attribute that ties spans to a build session whose id differs from the trace id
# (an agent that was handed a traceparent).  Indexed by the store.
SESSION_ATTR = "buildtel.session.id"
ZERO_TRACE = "0" * 32
ZERO_SPAN = "0" * 16
_HEX = frozenset("0123456789abcdef")


class SpanEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    time_ns: int = 0
    attributes: dict[str, Any] = {}
    dropped_attributes: int = 0


class SpanLink(msgspec.Struct, kw_only=True, omit_defaults=True):
    trace_id: str
    span_id: str
    trace_state: str = ""
    attributes: dict[str, Any] = {}
    dropped_attributes: int = 0
    flags: int = 0


class SpanRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One finished span, as stored and as exported."""

    trace_id: str
    span_id: str
    parent_span_id: str = ""
    name: str = ""
    kind: int = KIND_INTERNAL
    start_ns: int = 0
    end_ns: int = 0
    attributes: dict[str, Any] = {}
    events: list[SpanEvent] = []
    links: list[SpanLink] = []
    status_code: int = STATUS_UNSET
    status_message: str = ""
    trace_state: str = ""
    flags: int = 0
    resource: dict[str, Any] = {}
    scope_name: str = ""
    scope_version: str = ""
    dropped_attributes: int = 0
    dropped_events: int = 0
    dropped_links: int = 0

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def service_name(self) -> str:
        name = self.resource.get("service.name")
        return name if isinstance(name, str) and name else "unknown_service"


class SpanBatch(msgspec.Struct, kw_only=True, tag="spans", tag_field="type"):
    """What the bus exporter publishes on ``<ns>.spans``: finished spans of one process."""

    spans: list[SpanRecord]
    version: int = 1


span_batch_encoder = msgspec.msgpack.Encoder()
span_batch_decoder = msgspec.msgpack.Decoder(SpanBatch)


def is_hex_id(value: str, digits: int) -> bool:
    """``digits`` lowercase hex characters, not all zero (W3C and OTLP call all-zero invalid)."""
    return len(value) == digits and _HEX.issuperset(value) and value.strip("0") != ""


def check_span(span: SpanRecord) -> str | None:
    """Why ``span`` cannot be stored, or ``None``; the OTLP receiver reports this as a rejection."""
    if not is_hex_id(span.trace_id, 32):
        return f"span {span.name[:60]!r}: invalid trace id {span.trace_id[:40]!r}"
    if not is_hex_id(span.span_id, 16):
        return f"span {span.name[:60]!r}: invalid span id {span.span_id[:40]!r}"
    if span.parent_span_id and not is_hex_id(span.parent_span_id, 16):
        return f"span {span.name[:60]!r}: invalid parent span id {span.parent_span_id[:40]!r}"
    return None


def derive_span_id(*parts: str) -> str:
    """A deterministic span id from ``parts``: re-synthesizing a session gives the same ids,
    so processing a session twice stores the same spans instead of a second copy."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).hexdigest()
    return digest if digest != ZERO_SPAN else "0000000000000001"


def session_span_id(session_id: str, trace_id: str | None = None) -> str:
    """Span id of a session's root span (the tracing API parents a session's spans under it)."""
    return derive_span_id(trace_id or session_id, session_id, "session")


def span_session_id(span: SpanRecord) -> str:
    value = span.attributes.get(SESSION_ATTR)
    return value if isinstance(value, str) else ""
