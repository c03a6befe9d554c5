"""Span records as Zipkin v2 JSON and as the Jaeger UI's JSON trace file.

Zipkin v2 (``POST /api/v2/spans``, https://zipkin.io/zipkin-api/#/default/post_spans):
timestamps and durations are integer microseconds, ids lowercase hex (trace 32
digits, span 16), ``kind`` only for CLIENT/SERVER/PRODUCER/CONSUMER (Zipkin has
no INTERNAL: absent means local), tags are strings, and the ``error`` tag
exists iff the span's status is ERROR (Zipkin UIs paint a span red on the tag
alone, so an attribute that happens to be called ``error`` must not leak
through).  Mapping of status, scope and events follows the OpenTelemetry spec's
Zipkin exporter section.

Jaeger file: what ``jaeger-query``'s ``/api/traces/{id}`` returns and what the
Jaeger UI's "JSON File" upload reads: ``{"data": [{"traceID", "spans",
"processes"}]}`` with microsecond times, typed tags and per-service processes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from typing import Any

from buildtel.shared.tracemodel import (
    KIND_CLIENT,
    KIND_CONSUMER,
    KIND_NAMES,
    KIND_PRODUCER,
    KIND_SERVER,
    STATUS_ERROR,
    STATUS_NAMES,
    STATUS_OK,
    SpanRecord,
)

_ZIPKIN_KINDS = {KIND_SERVER: "SERVER", KIND_CLIENT: "CLIENT", KIND_PRODUCER: "PRODUCER", KIND_CONSUMER: "CONSUMER"}


def _us(ns: int) -> int:
    return ns // 1000


def _text(value: Any) -> str:
    """A tag value as a string: arrays and maps as JSON, bools lowercase, bytes base64."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=_text, separators=(",", ":"))
    return str(value)


# -- Zipkin -----------------------------------------------------------------------------------

def zipkin_span(span: SpanRecord) -> dict[str, Any]:
    tags = {k: _text(v) for k, v in span.attributes.items() if k != "error"}
    if span.scope_name:
        tags["otel.scope.name"] = span.scope_name
        if span.scope_version:
            tags["otel.scope.version"] = span.scope_version
    if span.status_code == STATUS_OK:
        tags["otel.status_code"] = "OK"
    elif span.status_code == STATUS_ERROR:
        tags["otel.status_code"] = "ERROR"
        tags["error"] = span.status_message or "true"
    out: dict[str, Any] = {
        "traceId": span.trace_id,
        "id": span.span_id,
        "name": span.name,
        "timestamp": _us(span.start_ns),
        # Zipkin reads a missing duration as "still running"; a sub-microsecond span lasts 1 µs.
        "duration": max(1, _us(span.end_ns) - _us(span.start_ns)),
        "localEndpoint": {"serviceName": span.service_name},
        "tags": tags,
    }
    if span.parent_span_id:
        out["parentId"] = span.parent_span_id
    kind = _ZIPKIN_KINDS.get(span.kind)
    if kind is not None:
        out["kind"] = kind
    if span.events:
        out["annotations"] = [
            {"timestamp": _us(e.time_ns),
             "value": e.name if not e.attributes else json.dumps(
                 {e.name: {k: _text(v) for k, v in e.attributes.items()}}, separators=(",", ":"))}
            for e in span.events]
    return out


def to_zipkin(spans: Iterable[SpanRecord]) -> list[dict[str, Any]]:
    return [zipkin_span(s) for s in spans]


# -- Jaeger -----------------------------------------------------------------------------------

def _jaeger_tag(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    if isinstance(value, bytes | bytearray):
        return {"key": key, "type": "binary", "value": base64.b64encode(bytes(value)).decode()}
    return {"key": key, "type": "string", "value": _text(value)}


def _jaeger_span(span: SpanRecord, process_id: str) -> dict[str, Any]:
    tags = [_jaeger_tag(k, v) for k, v in span.attributes.items()]
    if span.kind in _ZIPKIN_KINDS:
        tags.append(_jaeger_tag("span.kind", KIND_NAMES[span.kind].lower()))
    if span.status_code:
        tags.append(_jaeger_tag("otel.status_code", STATUS_NAMES[span.status_code]))
    if span.status_code == STATUS_ERROR:
        tags.append(_jaeger_tag("error", True))
        if span.status_message:
            tags.append(_jaeger_tag("otel.status_description", span.status_message))
    if span.scope_name:
        tags.append(_jaeger_tag("otel.scope.name", span.scope_name))
    refs = []
    if span.parent_span_id:
        refs.append({"refType": "CHILD_OF", "traceID": span.trace_id, "spanID": span.parent_span_id})
    refs += [{"refType": "FOLLOWS_FROM", "traceID": ln.trace_id, "spanID": ln.span_id} for ln in span.links]
    return {
        "traceID": span.trace_id,
        "spanID": span.span_id,
        "flags": span.flags or 1,
        "operationName": span.name,
        "references": refs,
        "startTime": _us(span.start_ns),
        "duration": max(0, _us(span.end_ns) - _us(span.start_ns)),
        "tags": tags,
        "logs": [{"timestamp": _us(e.time_ns),
                  "fields": [_jaeger_tag("event", e.name)] + [_jaeger_tag(k, v) for k, v in e.attributes.items()]}
                 for e in span.events],
        "processID": process_id,
        "warnings": None,
    }


def jaeger_trace(trace_id: str, spans: Sequence[SpanRecord]) -> dict[str, Any]:
    """One entry of the file's ``data`` list; one process per distinct resource."""
    processes: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    out_spans = []
    for span in spans:
        key = json.dumps(span.resource, sort_keys=True, default=_text)
        pid = keys.get(key)
        if pid is None:
            pid = keys[key] = f"p{len(keys) + 1}"
            processes[pid] = {"serviceName": span.service_name,
                              "tags": [_jaeger_tag(k, v) for k, v in span.resource.items() if k != "service.name"]}
        out_spans.append(_jaeger_span(span, pid))
    return {"traceID": trace_id, "spans": out_spans, "processes": processes, "warnings": None}


def jaeger_document(traces: dict[str, Sequence[SpanRecord]]) -> dict[str, Any]:
    return {"data": [jaeger_trace(tid, spans) for tid, spans in traces.items()],
            "total": 0, "limit": 0, "offset": 0, "errors": None}
