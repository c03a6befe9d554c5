"""Exporters against receivers the tests run on loopback: OTLP, Zipkin, retries, the Jaeger file."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import gzip
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from buildtel.services.tracer.exporters import (
    ExportError,
    Forwarder,
    OtlpHttpExporter,
    RetryPolicy,
    ZipkinExporter,
    parse_retry_after,
    write_jaeger_file,
)
from buildtel.services.tracer.otlp import any_value
from buildtel.shared.tracemodel import SpanEvent, SpanLink, SpanRecord
from tests.tracer.helpers import eventually

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
T0 = 1_700_000_000_123_456_789


def _spans() -> list[SpanRecord]:
    res = {"service.name": "exporter-test", "host.name": "ci-1"}
    return [
        SpanRecord(trace_id=TRACE, span_id="00f067aa0ba902b7", name="build", kind=1, start_ns=T0,
                   end_ns=T0 + 2_500_000_000, status_code=1, resource=res, scope_name="tests",
                   attributes={"build.targets": 2, "error": "not really", "tags": ["a", "b"], "ratio": 0.5,
                               "ok": True},
                   events=[SpanEvent(name="started", time_ns=T0 + 1000, attributes={"n": 1})]),
        SpanRecord(trace_id=TRACE, span_id="b7ad6b7169203331", parent_span_id="00f067aa0ba902b7", name="fetch",
                   kind=3, start_ns=T0 + 10_000, end_ns=T0 + 1_010_000, status_code=2, status_message="HTTP 500",
                   resource=res, links=[SpanLink(trace_id="0af7651916cd43dd8448eb211c80319c",
                                                 span_id="eee19b7ec3c1b174")],
                   attributes={"http.status_code": 500, "blob": b"\x00\xff"}),
        SpanRecord(trace_id=TRACE, span_id="c0ffee00c0ffee00", parent_span_id="00f067aa0ba902b7", name="serve",
                   kind=2, start_ns=T0 + 20_000, end_ns=T0 + 20_000, resource={"service.name": "other"}),
    ]


@dataclass
class Receiver:
    url: str
    requests: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    plan: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # answers before the 200s


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[[str], Any]]:
    runners: list[web.AppRunner] = []

    async def start(path: str) -> Receiver:
        rec = Receiver(url="")

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            rec.requests.append((time.monotonic(), dict(request.headers), body))
            if rec.plan:
                status, headers = rec.plan.pop(0)
                return web.Response(status=status, headers=headers, text="try later")
            if request.content_type == "application/x-protobuf":
                return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                                    content_type="application/x-protobuf")
            return web.json_response({} if path == "/v1/traces" else None, status=200 if path == "/v1/traces" else 202)

        app = web.Application()
        app.router.add_post(path, handle)
        # auto_decompress off: the tests check what was on the wire.
        runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return rec

    yield start
    for r in runners:
        await r.cleanup()


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@pytest.mark.parametrize("protocol", ["protobuf", "json"])
async def test_otlp_export_is_parsed_by_an_otlp_receiver(receiver, protocol) -> None:
    rec = await receiver("/v1/traces")
    exporter = OtlpHttpExporter(rec.url, protocol=protocol, compression="gzip")  # bare host: path appended
    await exporter.export(_spans())
    await exporter.close()
    [(_, headers, body)] = rec.requests
    assert headers["Content-Encoding"] == "gzip"
    body = gzip.decompress(body)
    if protocol == "protobuf":
        assert headers["Content-Type"] == "application/x-protobuf"
        req = ExportTraceServiceRequest.FromString(body)
        by_service = {_attrs(rs.resource.attributes)["service.name"]: rs for rs in req.resource_spans}
        assert set(by_service) == {"exporter-test", "other"}
        spans = {s.name: s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans}
        fetch = spans["fetch"]
        assert fetch.trace_id.hex() == TRACE and fetch.parent_span_id.hex() == "00f067aa0ba902b7"
        assert (fetch.kind, fetch.status.code, fetch.status.message) == (3, 2, "HTTP 500")
        assert _attrs(fetch.attributes) == {"http.status_code": 500, "blob": b"\x00\xff"}
        assert fetch.links[0].span_id.hex() == "eee19b7ec3c1b174"
        build = spans["build"]
        assert _attrs(build.attributes)["tags"] == ["a", "b"] and build.start_time_unix_nano == T0
        assert build.events[0].name == "started" and build.events[0].time_unix_nano == T0 + 1000
    else:
        assert headers["Content-Type"] == "application/json"
        doc = json.loads(body)
        spans = {s["name"]: s for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]}
        fetch = spans["fetch"]
        # OTLP/JSON: hex ids (not base64), integer enums, 64-bit integers as strings.
        assert (fetch["traceId"], fetch["spanId"], fetch["parentSpanId"]) == (TRACE, "b7ad6b7169203331",
                                                                             "00f067aa0ba902b7")
        assert fetch["kind"] == 3 and fetch["status"] == {"code": 2, "message": "HTTP 500"}
        assert fetch["startTimeUnixNano"] == str(T0 + 10_000)
        attrs = {a["key"]: a["value"] for a in fetch["attributes"]}
        assert attrs == {"http.status_code": {"intValue": "500"}, "blob": {"bytesValue": "AP8="}}


async def test_zipkin_export_follows_the_v2_field_rules(receiver) -> None:
    rec = await receiver("/api/v2/spans")
    exporter = ZipkinExporter(rec.url)
    await exporter.export(_spans())
    await exporter.close()
    [(_, headers, body)] = rec.requests
    assert headers["Content-Type"] == "application/json"
    spans = {s["name"]: s for s in json.loads(body)}
    for s in spans.values():
        assert re.fullmatch(r"[0-9a-f]{32}", s["traceId"]) and re.fullmatch(r"[0-9a-f]{16}", s["id"])
        assert type(s["timestamp"]) is int and type(s["duration"]) is int and s["duration"] >= 1
        assert all(isinstance(v, str) for v in s["tags"].values())
        assert ("error" in s["tags"]) == (s["name"] == "fetch")  # the error tag iff ERROR status
    build, fetch, serve = spans["build"], spans["fetch"], spans["serve"]
    assert "kind" not in build and "parentId" not in build  # internal root
    assert (fetch["kind"], serve["kind"]) == ("CLIENT", "SERVER")
    assert fetch["parentId"] == "00f067aa0ba902b7"
    assert build["timestamp"] == T0 // 1000 and build["duration"] == 2_500_000
    assert fetch["duration"] == 1000 and serve["duration"] == 1  # zero-length span: 1 µs, never absent
    assert fetch["tags"]["error"] == "HTTP 500" and fetch["tags"]["otel.status_code"] == "ERROR"
    assert build["tags"]["otel.status_code"] == "OK"
    assert build["tags"]["tags"] == '["a","b"]' and build["tags"]["ok"] == "true" and build["tags"]["ratio"] == "0.5"
    assert build["localEndpoint"] == {"serviceName": "exporter-test"}
    assert serve["localEndpoint"] == {"serviceName": "other"}
    assert build["annotations"] == [{"timestamp": (T0 + 1000) // 1000, "value": '{"started":{"n":"1"}}'}]


async def test_retry_on_503_honours_retry_after(receiver) -> None:
    rec = await receiver("/api/v2/spans")
    rec.plan = [(503, {"Retry-After": "1"})]
    exporter = ZipkinExporter(rec.url + "/api/v2/spans", retry=RetryPolicy(initial_backoff_s=0.01))
    started = time.monotonic()
    await exporter.export(_spans())
    await exporter.close()
    assert len(rec.requests) == 2
    gap = rec.requests[1][0] - rec.requests[0][0]
    assert gap >= 0.95, gap  # the server's 1 s, not our 10 ms backoff
    assert time.monotonic() - started < 5
    assert rec.requests[0][2] == rec.requests[1][2]  # the same body again


async def test_retry_statuses_back_off_and_permanent_errors_do_not_retry(receiver) -> None:
    rec = await receiver("/v1/traces")
    when = email.utils.formatdate(time.time() + 1, usegmt=True)
    rec.plan = [(429, {"Retry-After": when}), (502, {}), (504, {})]
    exporter = OtlpHttpExporter(rec.url, retry=RetryPolicy(initial_backoff_s=0.05))
    await exporter.export(_spans())
    assert len(rec.requests) == 4 and exporter.retries == 3
    rec.plan = [(400, {})]
    with pytest.raises(ExportError) as err:
        await exporter.export(_spans())
    assert err.value.status == 400 and len(rec.requests) == 5  # no retry of a rejected body
    rec.plan = [(503, {})] * 3
    exporter.retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    with pytest.raises(ExportError, match="gave up after 3 attempts"):
        await exporter.export(_spans())
    await exporter.close()
    assert parse_retry_after("7") == 7.0 and parse_retry_after("soon") is None


async def test_jaeger_file_loads_as_json_with_the_ui_structure(tmp_path) -> None:
    path = write_jaeger_file(tmp_path / "trace.json", {TRACE: _spans()})
    doc = json.loads(path.read_text())
    [trace] = doc["data"]
    assert trace["traceID"] == TRACE and len(trace["spans"]) == 3
    processes = trace["processes"]
    assert {p["serviceName"] for p in processes.values()} == {"exporter-test", "other"}
    spans = {s["operationName"]: s for s in trace["spans"]}
    for s in spans.values():
        assert s["traceID"] == TRACE and s["processID"] in processes
        assert type(s["startTime"]) is int and type(s["duration"]) is int
    assert spans["build"]["references"] == []
    assert spans["fetch"]["references"][0] == {"refType": "CHILD_OF", "traceID": TRACE, "spanID": "00f067aa0ba902b7"}
    assert spans["fetch"]["references"][1]["refType"] == "FOLLOWS_FROM"
    tags = {t["key"]: t for t in spans["fetch"]["tags"]}
    assert tags["error"] == {"key": "error", "type": "bool", "value": True}
    assert tags["http.status_code"] == {"key": "http.status_code", "type": "int64", "value": 500}
    assert tags["blob"]["type"] == "binary" and base64.b64decode(tags["blob"]["value"]) == b"\x00\xff"
    assert tags["span.kind"]["value"] == "client"
    assert spans["build"]["startTime"] == T0 // 1000 and spans["build"]["duration"] == 2_500_000
    [log] = spans["build"]["logs"]
    assert log["fields"][0] == {"key": "event", "type": "string", "value": "started"}


async def test_forwarder_queue_is_bounded_and_flushes_on_stop(receiver) -> None:
    rec = await receiver("/api/v2/spans")
    fwd = Forwarder(ZipkinExporter(rec.url), max_queue_spans=4, batch_spans=2, flush_interval_s=10)
    assert fwd.offer(_spans()) == 3 and fwd.offer(_spans()) == 1 and fwd.dropped == 2
    fwd.start()
    await fwd.stop()
    assert fwd.sent == 4 and sum(len(json.loads(b)) for _, _, b in rec.requests) == 4


async def test_service_forwards_everything_it_ingests(receiver, tracer_settings, nc, redis_client) -> None:
    from buildtel.services.tracer.service import TracerService

    otlp_rec, zipkin_rec = await receiver("/v1/traces"), await receiver("/api/v2/spans")
    s = tracer_settings
    svc = TracerService(s, s.nats_url or "", s.redis_url or "", otlp_port=0, forward_otlp=[otlp_rec.url],
                        forward_zipkin=[zipkin_rec.url])
    await svc.start()
    try:
        exporter = OtlpHttpExporter(svc.otlp_url, protocol="json")
        await exporter.export(_spans())
        await exporter.close()

        async def forwarded() -> bool:
            return bool(otlp_rec.requests and zipkin_rec.requests)

        await eventually(forwarded, timeout=10)
    finally:
        await svc.stop()
    names = {s["name"] for _, _, body in zipkin_rec.requests for s in json.loads(body)}
    assert names == {"build", "fetch", "serve"}
    req = ExportTraceServiceRequest.FromString(otlp_rec.requests[0][2])
    assert sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans) == 3
    await asyncio.sleep(0)


def test_serve_arguments_configure_port_forwarding_and_caps(settings) -> None:
    import argparse

    from buildtel.services import registry

    # Through the registry, as `buildtel serve tracer` does (the options live in tracer/options.py).
    parser = argparse.ArgumentParser()
    registry.add_serve_arguments(parser)
    args = parser.parse_args(["--otlp-port", "0", "--forward-otlp", "http://jaeger:4318", "--forward-otlp",
                              "http://tempo:4318/v1/traces", "--forward-otlp-protocol", "json",
                              "--forward-zipkin", "http://zipkin:9411", "--max-traces", "50"])
    svc = registry.create_from_args("tracer", args, settings, "nats://x", "redis://x")
    assert svc.otlp_port == 0 and svc.store.max_traces == 50
    assert [(f.exporter.kind, f.exporter.url) for f in svc.forwarders] == [
        ("otlp", "http://jaeger:4318/v1/traces"), ("otlp", "http://tempo:4318/v1/traces"),
        ("zipkin", "http://zipkin:9411/api/v2/spans")]
    assert all(f.exporter.protocol == "json" for f in svc.forwarders if f.exporter.kind == "otlp")
    defaults = registry.create_from_args("tracer", parser.parse_args([]), settings, "nats://x", "redis://x")
    assert defaults.otlp_port == 4318 and defaults.forwarders == []
