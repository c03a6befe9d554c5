"""OTLP/HTTP ingest: real clients POST to the tracer; what it stores is what they sent."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import aiohttp
import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from buildtel.services.tracer.query import QueryError
from buildtel.shared.tracemodel import SpanRecord
from tests.tracer.helpers import eventually

ATTRS: dict[str, Any] = {
    "str": "héllo", "bool": True, "int": -42, "big": 2**62, "float": 3.25,
    "strs": ("a", "b", ""), "bools": (True, False), "ints": (1, -2, 3), "floats": (0.5, -1.5), "empty": (),
}


def _sdk_spans() -> list[ReadableSpan]:
    """A small trace with every feature OTLP carries, built by the real SDK."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "ingest-test", "deployment.env": "ci",
                                                        "host.cpus": 8}), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests.tracer.ingest", "1.2.3")
    remote = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=TraceState([("vendor", "v1")]))
    other = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True)
    with tracer.start_as_current_span("GET /build", context=set_span_in_context(NonRecordingSpan(remote)),
                                      kind=SpanKind.SERVER, attributes=ATTRS) as root:
        root.add_event("cache.lookup", {"key": "abc", "hit": False, "sizes": (1, 2)})
        with tracer.start_as_current_span("compile", kind=SpanKind.CLIENT,
                                          links=[Link(other, {"link.why": "retry-of"})]) as child:
            child.set_status(Status(StatusCode.OK))
        with tracer.start_as_current_span("link", kind=SpanKind.PRODUCER) as failing:
            try:
                raise RuntimeError("linker exploded")
            except RuntimeError as exc:
                failing.record_exception(exc)
                failing.set_status(Status(StatusCode.ERROR, "link failed"))
        with tracer.start_as_current_span("consume", kind=SpanKind.CONSUMER):
            pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def _expected(span: ReadableSpan) -> dict[str, Any]:
    """What a faithful store must hold, read straight off the SDK span (not via our converter)."""
    ctx = span.context
    return {
        "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "parent": f"{span.parent.span_id:016x}" if span.parent else "",
        "name": span.name, "kind": span.kind.name, "start": span.start_time, "end": span.end_time,
        "attributes": {k: _plain(v) for k, v in span.attributes.items()},
        "events": [(e.name, e.timestamp, {k: _plain(v) for k, v in e.attributes.items()}) for e in span.events],
        "links": [(f"{ln.context.trace_id:032x}", f"{ln.context.span_id:016x}", dict(ln.attributes))
                  for ln in span.links],
        "status": (span.status.status_code.value, span.status.description or ""),
        # The SDK's OTLP encoder sends only the "parent is remote" bits (0x100 known, 0x200 remote).
        "trace_state": ctx.trace_state.to_header(),
        "flags": 0x100 | (0x200 if span.parent is not None and span.parent.is_remote else 0),
        "resource": dict(span.resource.attributes),
        "scope": (span.instrumentation_scope.name, span.instrumentation_scope.version),
    }


def _stored(rec: SpanRecord) -> dict[str, Any]:
    kinds = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
    return {
        "trace_id": rec.trace_id, "span_id": rec.span_id, "parent": rec.parent_span_id, "name": rec.name,
        "kind": kinds[rec.kind], "start": rec.start_ns, "end": rec.end_ns, "attributes": rec.attributes,
        "events": [(e.name, e.time_ns, e.attributes) for e in rec.events],
        "links": [(ln.trace_id, ln.span_id, ln.attributes) for ln in rec.links],
        "status": (rec.status_code, rec.status_message), "trace_state": rec.trace_state,
        "flags": rec.flags, "resource": rec.resource, "scope": (rec.scope_name, rec.scope_version),
    }


async def _export(url: str, spans: list[ReadableSpan], **kw: Any) -> SpanExportResult:
    # The official exporter is synchronous (requests); a thread keeps our event loop serving.
    exporter = OTLPSpanExporter(endpoint=url, timeout=10, **kw)
    try:
        return await asyncio.to_thread(exporter.export, spans)
    finally:
        exporter.shutdown()


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
async def test_official_otlp_exporter_spans_are_stored_exactly(tracer, client, compression) -> None:
    sent = _sdk_spans()
    assert await _export(tracer.otlp_url, sent, compression=compression) == SpanExportResult.SUCCESS
    trace_id = f"{sent[0].context.trace_id:032x}"
    trace = await eventually(lambda: client.get(trace_id))
    assert len(trace.spans) == len(sent) == 4
    stored = {r.span_id: _stored(r) for r in trace.spans}
    for span in sent:
        want = _expected(span)
        assert stored[want["span_id"]] == want, span.name
    # Types survive, not just values: a bool is not 1, an int is not a float, arrays stay arrays.
    root = next(r for r in trace.spans if r.name == "GET /build")
    assert root.parent_span_id == "00f067aa0ba902b7" and root.trace_state == "vendor=v1"
    assert type(root.attributes["bool"]) is bool and type(root.attributes["int"]) is int
    assert type(root.attributes["float"]) is float and root.attributes["big"] == 2**62
    assert root.attributes["empty"] == [] and root.attributes["bools"] == [True, False]
    failing = next(r for r in trace.spans if r.name == "link")
    [exc_event] = failing.events
    assert exc_event.name == "exception"
    assert exc_event.attributes["exception.type"] == "RuntimeError"
    assert exc_event.attributes["exception.message"] == "linker exploded"
    assert "Traceback" in exc_event.attributes["exception.stacktrace"]
    assert (failing.status_code, failing.status_message) == (2, "link failed")


async def _post(url: str, body: bytes, ctype: str, **headers: str) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as http, http.post(url, data=body,
                                                          headers={"Content-Type": ctype, **headers}) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


JSON_TRACE = "5b8efff798038103d269b633813fc60c"


def _json_request(trace_id: str = JSON_TRACE, bad_span_id: bool = False) -> bytes:
    def kv(k, v):
        return {"key": k, "value": v}
    span = {
        "traceId": trace_id, "spanId": "eee19b7ec3c1b174", "parentSpanId": "eee19b7ec3c1b173",
        "name": "json-span", "kind": 3, "startTimeUnixNano": "1544712660000000000",
        "endTimeUnixNano": 1544712661000000000,
        "attributes": [kv("s", {"stringValue": "x"}), kv("i", {"intValue": "9007199254740993"}),
                       kv("d", {"doubleValue": 1.5}), kv("b", {"boolValue": False}),
                       kv("raw", {"bytesValue": "AAEC/w=="}),
                       kv("arr", {"arrayValue": {"values": [{"intValue": 1}, {"stringValue": "two"}]}}),
                       kv("map", {"kvlistValue": {"values": [kv("k", {"boolValue": True})]}})],
        "events": [{"timeUnixNano": "1544712660500000000", "name": "ev",
                    "attributes": [kv("n", {"intValue": "3"})]}],
        "links": [{"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331"}],
        "status": {"code": 2, "message": "boom"},
        "unknownFutureField": {"ignored": True},
    }
    spans = [span]
    if bad_span_id:
        spans.append({**span, "spanId": "123", "name": "bad-id"})
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [kv("service.name", {"stringValue": "json-svc"})]},
        "scopeSpans": [{"scope": {"name": "manual", "version": "0.1"}, "spans": spans}]}]}).encode()


@pytest.mark.parametrize("gzipped", [False, True])
async def test_otlp_json_is_decoded_with_types_and_answered_in_json(tracer, client, gzipped) -> None:
    body = _json_request()
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    status, ctype, answer = await _post(tracer.otlp_url, gzip.compress(body) if gzipped else body,
                                        "application/json", **headers)
    assert (status, ctype) == (200, "application/json")
    assert json.loads(answer) == {}  # full success: no partialSuccess
    trace = await eventually(lambda: client.get(JSON_TRACE))
    [span] = trace.spans
    assert span.attributes == {"s": "x", "i": 9007199254740993, "d": 1.5, "b": False, "raw": b"\x00\x01\x02\xff",
                               "arr": [1, "two"], "map": {"k": True}}
    assert (span.kind, span.start_ns, span.end_ns) == (3, 1544712660000000000, 1544712661000000000)
    assert (span.parent_span_id, span.status_code, span.status_message) == ("eee19b7ec3c1b173", 2, "boom")
    assert [(e.name, e.time_ns, e.attributes) for e in span.events] == [("ev", 1544712660500000000, {"n": 3})]
    assert [(ln.trace_id, ln.span_id) for ln in span.links] == [("0af7651916cd43dd8448eb211c80319c",
                                                                  "b7ad6b7169203331")]
    assert span.resource == {"service.name": "json-svc"} and span.scope_name == "manual"


async def test_invalid_ids_are_rejected_in_partial_success_and_the_rest_is_kept(tracer, client) -> None:
    # JSON: one good span, one with a 3-digit span id.
    status, _, answer = await _post(tracer.otlp_url, _json_request(bad_span_id=True), "application/json")
    assert status == 200
    partial = json.loads(answer)["partialSuccess"]
    assert int(partial["rejectedSpans"]) == 1 and "invalid span id" in partial["errorMessage"]
    assert [s.name for s in (await eventually(lambda: client.get(JSON_TRACE))).spans] == ["json-span"]
    # Protobuf: an all-zero trace id and a 4-byte one are both rejected.
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for tid, name in ((bytes(16), "zero"), (b"\x01\x02\x03\x04", "short"), (bytes.fromhex("ab" * 16), "fine")):
        s = ss.spans.add()
        s.trace_id, s.span_id, s.name = tid, bytes.fromhex("cd" * 8), name
    status, ctype, answer = await _post(tracer.otlp_url, req.SerializeToString(), "application/x-protobuf")
    assert (status, ctype) == (200, "application/x-protobuf")
    resp = ExportTraceServiceResponse.FromString(answer)
    assert resp.partial_success.rejected_spans == 2
    assert [s.name for s in (await eventually(lambda: client.get("ab" * 16))).spans] == ["fine"]


async def test_garbage_gets_400_and_the_service_goes_on(tracer, client) -> None:
    url = tracer.otlp_url
    cases = [(b"\x0a\x05hello world", "application/x-protobuf", {}),
             (b"{not json", "application/json", {}),
             (b'{"resourceSpans": 5}', "application/json", {}),
             (b'[1, 2]', "application/json", {}),
             (b"definitely not gzip", "application/x-protobuf", {"Content-Encoding": "gzip"}),
             (gzip.compress(b"\xff\xff\xff")[:-6], "application/json", {"Content-Encoding": "gzip"})]
    for body, ctype, headers in cases:
        status, answer_type, answer = await _post(url, body, ctype, **headers)
        assert status == 400, (body, status, answer)
        assert answer_type == ctype  # a google.rpc.Status in the request's encoding
    status, _, _ = await _post(url, _json_request(), "application/json")
    assert status == 200
    assert (await eventually(lambda: client.get(JSON_TRACE))).spans[0].name == "json-span"
    assert (await client.stats()).otlp_bad_requests == len(cases)


async def test_other_content_types_and_encodings_get_415(tracer) -> None:
    for ctype, headers in (("text/plain", {}), ("application/grpc", {}), ("application/xml", {}),
                           ("application/json", {"Content-Encoding": "br"})):
        status, _, _ = await _post(tracer.otlp_url, _json_request(), ctype, **headers)
        assert status == 415, ctype


async def test_bearer_token_is_required_when_configured(tracer_settings, nc, redis_client, client) -> None:
    from buildtel.services.tracer.service import TracerService

    s = tracer_settings.with_(http_token="s3cret-token")
    svc = TracerService(s, s.nats_url or "", s.redis_url or "", otlp_port=0)
    await svc.start()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            status, _, _ = await _post(svc.otlp_url, _json_request(), "application/json", **headers)
            assert status == 401, headers
        with pytest.raises(QueryError) as err:
            await client.get(JSON_TRACE)
        assert err.value.code == 404
        sent = _sdk_spans()
        result = await _export(svc.otlp_url, sent, headers={"Authorization": "Bearer s3cret-token"})
        assert result == SpanExportResult.SUCCESS
        trace = await eventually(lambda: client.get(f"{sent[0].context.trace_id:032x}"))
        assert len(trace.spans) == 4
    finally:
        await svc.stop()
