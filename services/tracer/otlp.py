"""OTLP protobuf <-> :class:`SpanRecord`, with the generated classes of ``opentelemetry-proto``.

Decoding is the receiver's hot path (``POST /v1/traces``): the protobuf parse
itself runs in C (upb); the per-span conversion below is the Python cost, so
it reads each field once and shares one resource dict between the spans of a
``ResourceSpans``.  Spans with invalid ids are *rejected*, not fatal: the rest
of the request is kept and the count goes back in ``partial_success`` as the
OTLP spec asks.

Encoding is the OTLP exporter's path: spans are grouped back into
``ResourceSpans``/``ScopeSpans`` by (resource, scope).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from google.protobuf.message import DecodeError as ProtoDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

from buildtel.shared.tracemodel import SpanEvent, SpanLink, SpanRecord

__all__ = [
    "DecodeResult",
    "OtlpDecodeError",
    "any_value",
    "decode_request",
    "encode_any",
    "encode_request",
    "encode_response",
    "encode_status",
]

MAX_ERRORS_REPORTED = 5
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class OtlpDecodeError(ValueError):
    """The body is not an ExportTraceServiceRequest at all: the receiver answers 400."""


@dataclass(slots=True)
class DecodeResult:
    spans: list[SpanRecord] = field(default_factory=list)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERRORS_REPORTED:
            self.errors.append(reason)

    @property
    def error_message(self) -> str:
        more = self.rejected - len(self.errors)
        return "; ".join(self.errors) + (f"; and {more} more" if more > 0 else "")


# -- decode ----------------------------------------------------------------------------------

def any_value(v: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue`` (None when empty)."""
    which = v.WhichOneof("value")
    if which is None or which == "string_value_strindex":
        # strindex refers to a profiles dictionary that trace requests do not carry.
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


_SCALARS = frozenset({"string_value", "bool_value", "int_value", "double_value", "bytes_value"})
_ZERO_TRACE, _ZERO_SPAN = bytes(16), bytes(8)


def _attrs(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    # Inlined scalar case: attributes are most of the per-span cost, and almost all are scalars.
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        which = v.WhichOneof("value")
        out[kv.key] = getattr(v, which) if which in _SCALARS else any_value(v)
    return out


def _bad_ids(s: Span) -> str | None:
    """Checked on the raw bytes, before any hex conversion (cheaper than model.check_span)."""
    tid, sid, pid = s.trace_id, s.span_id, s.parent_span_id
    if len(tid) != 16 or tid == _ZERO_TRACE:
        return f"span {s.name[:60]!r}: invalid trace id {tid.hex()[:40]!r}"
    if len(sid) != 8 or sid == _ZERO_SPAN:
        return f"span {s.name[:60]!r}: invalid span id {sid.hex()[:40]!r}"
    if pid and (len(pid) != 8 or pid == _ZERO_SPAN):
        return f"span {s.name[:60]!r}: invalid parent span id {pid.hex()[:40]!r}"
    return None


def _span(s: Span, resource: dict[str, Any], scope_name: str, scope_version: str,
          trace_hex: dict[bytes, str]) -> SpanRecord:
    status = s.status
    tid = s.trace_id
    tid_hex = trace_hex.get(tid)
    if tid_hex is None:  # a request carries many spans of few traces
        tid_hex = trace_hex[tid] = tid.hex()
    return SpanRecord(
        trace_id=tid_hex,
        span_id=s.span_id.hex(),
        parent_span_id=s.parent_span_id.hex(),
        name=s.name,
        kind=s.kind,
        start_ns=s.start_time_unix_nano,
        end_ns=s.end_time_unix_nano,
        attributes=_attrs(s.attributes) if s.attributes else {},
        events=[SpanEvent(name=e.name, time_ns=e.time_unix_nano, attributes=_attrs(e.attributes),
                          dropped_attributes=e.dropped_attributes_count) for e in s.events] if s.events else [],
        links=[SpanLink(trace_id=ln.trace_id.hex(), span_id=ln.span_id.hex(), trace_state=ln.trace_state,
                        attributes=_attrs(ln.attributes), dropped_attributes=ln.dropped_attributes_count,
                        flags=ln.flags) for ln in s.links] if s.links else [],
        status_code=status.code,
        status_message=status.message,
        trace_state=s.trace_state,
        flags=s.flags,
        resource=resource,
        scope_name=scope_name,
        scope_version=scope_version,
        dropped_attributes=s.dropped_attributes_count,
        dropped_events=s.dropped_events_count,
        dropped_links=s.dropped_links_count,
    )


def decode_request(body: bytes) -> DecodeResult:
    """Decode an OTLP/protobuf ``ExportTraceServiceRequest``; raises :class:`OtlpDecodeError`."""
    try:
        req = ExportTraceServiceRequest.FromString(body)
    except (ProtoDecodeError, RuntimeError, ValueError) as exc:
        raise OtlpDecodeError(f"not an OTLP ExportTraceServiceRequest: {exc}") from None
    result = DecodeResult()
    out = result.spans
    trace_hex: dict[bytes, str] = {}
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            scope_name, scope_version = ss.scope.name, ss.scope.version
            for s in ss.spans:
                problem = _bad_ids(s)
                if problem is None:
                    out.append(_span(s, resource, scope_name, scope_version, trace_hex))
                else:
                    result.reject(problem)
    return result


# -- encode ----------------------------------------------------------------------------------

def encode_any(value: Any, out: AnyValue) -> None:
    """Fill ``out`` with ``value``; bool before int because bool is an int in Python."""
    if isinstance(value, str):
        out.string_value = value
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            out.int_value = value
        else:
            out.string_value = str(value)  # OTLP has no bigger integer type
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, bytes | bytearray):
        out.bytes_value = bytes(value)
    elif isinstance(value, list | tuple):
        arr = out.array_value
        arr.SetInParent()  # an empty array is still an array, not an empty AnyValue
        for item in value:
            encode_any(item, arr.values.add())
    elif isinstance(value, dict):
        kvl = out.kvlist_value
        kvl.SetInParent()
        _fill_attrs(kvl.values, value)
    elif value is not None:
        out.string_value = str(value)


def _fill_attrs(target: Any, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        kv = target.add()
        kv.key = key
        encode_any(value, kv.value)


def _group(spans: Iterable[SpanRecord]) -> list[tuple[dict[str, Any], list[tuple[tuple[str, str], list[SpanRecord]]]]]:
    """Spans grouped by resource, then scope, keeping first-seen order."""
    by_resource: dict[bytes, tuple[dict[str, Any], dict[tuple[str, str], list[SpanRecord]]]] = {}
    enc = msgspec.msgpack.Encoder(order="sorted")
    for span in spans:
        key = enc.encode(span.resource)
        entry = by_resource.get(key)
        if entry is None:
            entry = by_resource[key] = (span.resource, {})
        entry[1].setdefault((span.scope_name, span.scope_version), []).append(span)
    return [(res, list(scopes.items())) for res, scopes in by_resource.values()]


def _fill_span(s: Span, span: SpanRecord) -> None:
    s.trace_id = bytes.fromhex(span.trace_id)
    s.span_id = bytes.fromhex(span.span_id)
    if span.parent_span_id:
        s.parent_span_id = bytes.fromhex(span.parent_span_id)
    s.name = span.name
    s.kind = span.kind  # type: ignore[assignment]
    s.start_time_unix_nano = span.start_ns
    s.end_time_unix_nano = span.end_ns
    s.trace_state = span.trace_state
    s.flags = span.flags
    _fill_attrs(s.attributes, span.attributes)
    s.dropped_attributes_count = span.dropped_attributes
    for ev in span.events:
        e = s.events.add()
        e.name, e.time_unix_nano, e.dropped_attributes_count = ev.name, ev.time_ns, ev.dropped_attributes
        _fill_attrs(e.attributes, ev.attributes)
    s.dropped_events_count = span.dropped_events
    for link in span.links:
        ln = s.links.add()
        ln.trace_id, ln.span_id = bytes.fromhex(link.trace_id), bytes.fromhex(link.span_id)
        ln.trace_state, ln.flags, ln.dropped_attributes_count = link.trace_state, link.flags, link.dropped_attributes
        _fill_attrs(ln.attributes, link.attributes)
    s.dropped_links_count = span.dropped_links
    if span.status_code or span.status_message:
        s.status.code = span.status_code  # type: ignore[assignment]
        s.status.message = span.status_message


def build_request(spans: Sequence[SpanRecord]) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for resource, scopes in _group(spans):
        rs: ResourceSpans = req.resource_spans.add()
        _fill_attrs(rs.resource.attributes, resource)
        for (scope_name, scope_version), members in scopes:
            ss = rs.scope_spans.add()
            ss.scope.name, ss.scope.version = scope_name, scope_version
            for span in members:
                _fill_span(ss.spans.add(), span)
    return req


def encode_request(spans: Sequence[SpanRecord]) -> bytes:
    """An OTLP/protobuf ``ExportTraceServiceRequest`` body carrying ``spans``."""
    body: bytes = build_request(spans).SerializeToString()  # the protobuf stubs leave it untyped
    return body


def encode_response(rejected: int = 0, error_message: str = "") -> bytes:
    resp = ExportTraceServiceResponse()
    if rejected or error_message:
        resp.partial_success.rejected_spans = rejected
        resp.partial_success.error_message = error_message
    body: bytes = resp.SerializeToString()  # the protobuf stubs leave it untyped
    return body


def decode_response(body: bytes) -> tuple[int, str]:
    """(rejected spans, error message) of an ``ExportTraceServiceResponse``."""
    resp = ExportTraceServiceResponse.FromString(body)
    return resp.partial_success.rejected_spans, resp.partial_success.error_message


def encode_status(code: int, message: str) -> bytes:
    """A ``google.rpc.Status`` body (what OTLP/HTTP asks for on 4xx/5xx), encoded by hand:
    two fields do not justify a dependency on googleapis-common-protos."""
    msg = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(msg)) + msg


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)

