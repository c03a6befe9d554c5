"""OTLP/JSON <-> :class:`SpanRecord` (the protobuf JSON mapping with OTLP's exceptions).

OTLP/JSON differs from the generic protobuf JSON mapping in ways receivers
must honour: trace and span ids are *hex* strings (not base64), enums are
integers, and keys are lowerCamelCase.  As a receiver we are lenient where the
protobuf JSON mapping allows variation (snake_case keys, enum names, 64-bit
integers as strings or numbers, ``"NaN"``/``"Infinity"`` doubles) and ignore
unknown fields, so any conforming client gets through.  As an exporter we
emit the canonical form: camelCase, integer enums, 64-bit integers as strings.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from typing import Any

import msgspec

from buildtel.services.tracer.otlp import DecodeResult, OtlpDecodeError, _group
from buildtel.shared.tracemodel import SpanEvent, SpanLink, SpanRecord, check_span

__all__ = ["decode_document", "decode_request", "encode_request", "encode_response", "encode_status", "request_dict"]

_KINDS = {"SPAN_KIND_UNSPECIFIED": 0, "SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2, "SPAN_KIND_CLIENT": 3,
          "SPAN_KIND_PRODUCER": 4, "SPAN_KIND_CONSUMER": 5}
_STATUS = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
_SPECIAL_DOUBLES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class _Bad(ValueError):
    """A field has the wrong JSON type: the whole request is malformed (400)."""


def _get(obj: dict[str, Any], camel: str, snake: str | None = None, default: Any = None) -> Any:
    if camel in obj:
        return obj[camel]
    if snake is not None and snake in obj:
        return obj[snake]
    return default


def _obj(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"{what} must be an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(f"{what} must be an array")
    return value


def _int(value: Any, what: str, enum: dict[str, int] | None = None) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        raise _Bad(f"{what} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if enum is not None and value in enum:
            return enum[value]
        try:
            return int(value)
        except ValueError:
            pass
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Bad(f"{what} must be an integer, not {str(value)[:40]!r}")


def _str(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Bad(f"{what} must be a string")
    return value


def _hex_id(value: Any, what: str) -> str:
    # Ids with the wrong length or digits are a rejected *span*, not a malformed request,
    # so they pass through as text and check_span() reports them.
    return _str(value, what).lower()


def any_value(v: Any) -> Any:
    if not isinstance(v, dict):
        raise _Bad("attribute value must be an AnyValue object")
    if not v:
        return None
    key, raw = next(iter(v.items()))
    if key in ("stringValue", "string_value"):
        return _str(raw, key)
    if key in ("boolValue", "bool_value"):
        if not isinstance(raw, bool):
            raise _Bad("boolValue must be true or false")
        return raw
    if key in ("intValue", "int_value"):
        return _int(raw, key)
    if key in ("doubleValue", "double_value"):
        if isinstance(raw, str) and raw in _SPECIAL_DOUBLES:
            return _SPECIAL_DOUBLES[raw]
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _Bad("doubleValue must be a number")
        return float(raw)
    if key in ("bytesValue", "bytes_value"):
        try:
            return base64.b64decode(_str(raw, key), validate=True)
        except (binascii.Error, ValueError):
            raise _Bad("bytesValue must be base64") from None
    if key in ("arrayValue", "array_value"):
        return [any_value(x) for x in _list(_obj(raw, key).get("values"), "arrayValue.values")]
    if key in ("kvlistValue", "kvlist_value"):
        return _attrs(_obj(raw, key).get("values"))
    return None  # an AnyValue kind newer than us: keep the key, drop the value


def _attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in _list(kvs, "attributes"):
        kv = _obj(kv, "attribute")
        out[_str(kv.get("key"), "attribute key")] = any_value(kv.get("value") or {})
    return out


def _span(s: dict[str, Any], resource: dict[str, Any], scope_name: str, scope_version: str) -> SpanRecord:
    status = _obj(s.get("status"), "status")
    return SpanRecord(
        trace_id=_hex_id(_get(s, "traceId", "trace_id"), "traceId"),
        span_id=_hex_id(_get(s, "spanId", "span_id"), "spanId"),
        parent_span_id=_hex_id(_get(s, "parentSpanId", "parent_span_id"), "parentSpanId"),
        name=_str(s.get("name"), "name"),
        kind=_int(s.get("kind"), "kind", _KINDS),
        start_ns=_int(_get(s, "startTimeUnixNano", "start_time_unix_nano"), "startTimeUnixNano"),
        end_ns=_int(_get(s, "endTimeUnixNano", "end_time_unix_nano"), "endTimeUnixNano"),
        attributes=_attrs(s.get("attributes")),
        events=[SpanEvent(name=_str(e.get("name"), "event name"),
                          time_ns=_int(_get(e, "timeUnixNano", "time_unix_nano"), "timeUnixNano"),
                          attributes=_attrs(e.get("attributes")),
                          dropped_attributes=_int(_get(e, "droppedAttributesCount", "dropped_attributes_count"),
                                                  "droppedAttributesCount"))
                for e in (_obj(x, "event") for x in _list(s.get("events"), "events"))],
        links=[SpanLink(trace_id=_hex_id(_get(ln, "traceId", "trace_id"), "link traceId"),
                        span_id=_hex_id(_get(ln, "spanId", "span_id"), "link spanId"),
                        trace_state=_str(_get(ln, "traceState", "trace_state"), "traceState"),
                        attributes=_attrs(ln.get("attributes")),
                        dropped_attributes=_int(_get(ln, "droppedAttributesCount", "dropped_attributes_count"),
                                                "droppedAttributesCount"),
                        flags=_int(ln.get("flags"), "flags"))
               for ln in (_obj(x, "link") for x in _list(s.get("links"), "links"))],
        status_code=_int(status.get("code"), "status.code", _STATUS),
        status_message=_str(status.get("message"), "status.message"),
        trace_state=_str(_get(s, "traceState", "trace_state"), "traceState"),
        flags=_int(s.get("flags"), "flags"),
        resource=resource,
        scope_name=scope_name,
        scope_version=scope_version,
        dropped_attributes=_int(_get(s, "droppedAttributesCount", "dropped_attributes_count"), "dropped"),
        dropped_events=_int(_get(s, "droppedEventsCount", "dropped_events_count"), "dropped"),
        dropped_links=_int(_get(s, "droppedLinksCount", "dropped_links_count"), "dropped"),
    )


def decode_request(body: bytes) -> DecodeResult:
    """Decode an OTLP/JSON ``ExportTraceServiceRequest``; raises ``OtlpDecodeError`` (-> 400)."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise OtlpDecodeError(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise OtlpDecodeError("body nests JSON too deeply") from None
    return decode_document(doc)


def decode_document(doc: Any) -> DecodeResult:
    """Decode an already parsed OTLP/JSON request; the HTTP receiver parses with a depth
    limit (buildtel.shared.httpserver.decode_json) so the recursive walk here stays bounded."""
    result = DecodeResult()
    try:
        doc = _obj(doc, "request")
        for rs in _list(_get(doc, "resourceSpans", "resource_spans"), "resourceSpans"):
            rs = _obj(rs, "resourceSpans[]")
            resource = _attrs(_obj(rs.get("resource"), "resource").get("attributes"))
            for ss in _list(_get(rs, "scopeSpans", "scope_spans"), "scopeSpans"):
                ss = _obj(ss, "scopeSpans[]")
                scope = _obj(ss.get("scope"), "scope")
                name, version = _str(scope.get("name"), "scope.name"), _str(scope.get("version"), "scope.version")
                for s in _list(ss.get("spans"), "spans"):
                    rec = _span(_obj(s, "span"), resource, name, version)
                    problem = check_span(rec)
                    if problem is None:
                        result.spans.append(rec)
                    else:
                        result.reject(problem)
    except _Bad as exc:
        raise OtlpDecodeError(f"malformed OTLP/JSON: {exc}") from None
    return result


# -- encode ----------------------------------------------------------------------------------

def encode_any(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return {"intValue": str(value)}
        return {"stringValue": str(value)}
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return {"doubleValue": "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")}
        return {"doubleValue": value}
    if isinstance(value, bytes | bytearray):
        return {"bytesValue": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [encode_any(v) for v in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": _enc_attrs(value)}}
    return {} if value is None else {"stringValue": str(value)}


def _enc_attrs(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": encode_any(v)} for k, v in attrs.items()]


def _enc_span(span: SpanRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": span.trace_id, "spanId": span.span_id, "name": span.name, "kind": span.kind,
        "startTimeUnixNano": str(span.start_ns), "endTimeUnixNano": str(span.end_ns),
        "attributes": _enc_attrs(span.attributes),
        "events": [{"timeUnixNano": str(e.time_ns), "name": e.name, "attributes": _enc_attrs(e.attributes),
                    **({"droppedAttributesCount": e.dropped_attributes} if e.dropped_attributes else {})}
                   for e in span.events],
        "links": [{"traceId": ln.trace_id, "spanId": ln.span_id, "traceState": ln.trace_state,
                   "attributes": _enc_attrs(ln.attributes), "flags": ln.flags,
                   **({"droppedAttributesCount": ln.dropped_attributes} if ln.dropped_attributes else {})}
                  for ln in span.links],
        "status": {"code": span.status_code, **({"message": span.status_message} if span.status_message else {})},
    }
    if span.parent_span_id:
        out["parentSpanId"] = span.parent_span_id
    if span.trace_state:
        out["traceState"] = span.trace_state
    if span.flags:
        out["flags"] = span.flags
    for key, n in (("droppedAttributesCount", span.dropped_attributes), ("droppedEventsCount", span.dropped_events),
                   ("droppedLinksCount", span.dropped_links)):
        if n:
            out[key] = n
    return out


def request_dict(spans: Sequence[SpanRecord]) -> dict[str, Any]:
    return {"resourceSpans": [
        {"resource": {"attributes": _enc_attrs(resource)},
         "scopeSpans": [{"scope": {"name": name, "version": version}, "spans": [_enc_span(s) for s in members]}
                        for (name, version), members in scopes]}
        for resource, scopes in _group(spans)]}


def encode_request(spans: Sequence[SpanRecord]) -> bytes:
    return msgspec.json.encode(request_dict(spans))


def encode_response(rejected: int = 0, error_message: str = "") -> bytes:
    if not (rejected or error_message):
        return b"{}"
    # int64 fields are strings in the protobuf JSON mapping.
    return msgspec.json.encode({"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": error_message}})


def encode_status(code: int, message: str) -> bytes:
    return msgspec.json.encode({"code": code, "message": message})
