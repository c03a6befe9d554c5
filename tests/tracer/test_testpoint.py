"""End-to-end tests of the W3C conformance testpoint over real loopback HTTP.

A local aiohttp receiver plays the suite's harness: it records the headers and
body of every callback the testpoint makes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from buildtel.services.tracer.propagation import W3CTraceContextPropagator, parse_traceparent, parse_tracestate
from buildtel.services.tracer.testpoint import RunningTestpoint, serve_testpoint, start_testpoint

TID = "12345678901234567890123456789012"
PID = "1234567890123456"


@dataclass
class Receiver:
    url: str
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)

    def callback(self, name: str) -> str:
        return f"{self.url}/{name}"

    def traceparent(self, name: str):
        values = self.calls[name]["headers"].getall("traceparent")
        assert len(values) == 1, values
        parsed = parse_traceparent(values[0])
        assert parsed is not None and parsed.version == 0, values[0]
        return parsed


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    state = Receiver(url="")

    async def record(request: web.Request) -> web.Response:
        state.calls[request.match_info["name"]] = {
            "headers": request.headers.copy(),
            "body": await request.json(),
        }
        return web.json_response(None)

    app.router.add_post("/{name}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield state
    await runner.cleanup()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def testpoint(exporter: InMemorySpanExporter) -> AsyncIterator[RunningTestpoint]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    running = await start_testpoint(port=0, tracer_provider=provider)
    yield running
    await running.close()


async def post_test(url: str, body: Any, headers: list[tuple[str, str]] = ()) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=list(headers)) as response:
        return response.status, await response.json()


async def test_test_endpoint_propagates_context(testpoint: RunningTestpoint, receiver: Receiver) -> None:
    body = [
        {"url": receiver.callback("0"), "arguments": []},
        {"url": receiver.callback("1"), "arguments": [{"url": "http://127.0.0.1:1/x", "arguments": []}]},
    ]
    status, results = await post_test(
        testpoint.url,
        body,
        [("traceparent", f"00-{TID}-{PID}-01"), ("tracestate", "foo=1"), ("tracestate", "bar=2")],
    )
    assert status == 200
    assert [r["status"] for r in results] == [200, 200]
    first, second = receiver.traceparent("0"), receiver.traceparent("1")
    assert first.trace_id == second.trace_id == int(TID, 16)
    assert int(PID, 16) not in (first.parent_id, second.parent_id)
    assert first.parent_id != second.parent_id  # one client span per call
    assert first.trace_flags & 1  # the sampled decision follows the parent
    for name in ("0", "1"):
        fields = receiver.calls[name]["headers"].getall("tracestate")
        assert list(parse_tracestate(fields).items()) == [("foo", "1"), ("bar", "2")]
    # The arguments are forwarded as the JSON body, not interpreted.
    assert receiver.calls["0"]["body"] == []
    assert receiver.calls["1"]["body"] == body[1]["arguments"]


async def test_spans_form_one_trace(
    testpoint: RunningTestpoint, receiver: Receiver, exporter: InMemorySpanExporter
) -> None:
    await post_test(testpoint.url, [{"url": receiver.callback("0")}], [("traceparent", f"00-{TID}-{PID}-01")])
    spans = {span.kind: span for span in exporter.get_finished_spans()}
    server, client = spans[SpanKind.SERVER], spans[SpanKind.CLIENT]
    assert server.parent.span_id == int(PID, 16) and server.parent.is_remote
    assert client.parent.span_id == server.context.span_id
    assert receiver.traceparent("0").parent_id == client.context.span_id


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="missing"),
        pytest.param([("traceparent", f"00-{'0' * 32}-{PID}-01")], id="zero-trace-id"),
        pytest.param([("traceparent", f"00-{TID}-{PID}-01"), ("traceparent", f"00-{TID}-{PID}-01")], id="repeated"),
        pytest.param([("tracestate", "foo=1")], id="tracestate-only"),
    ],
)
async def test_invalid_or_missing_parent_starts_a_new_trace(
    testpoint: RunningTestpoint, receiver: Receiver, headers: list[tuple[str, str]]
) -> None:
    status, _ = await post_test(testpoint.url, [{"url": receiver.callback("0"), "arguments": []}], headers)
    assert status == 200
    parsed = receiver.traceparent("0")
    assert parsed.trace_id not in (0, int(TID, 16))
    assert parsed.trace_flags & 2  # new trace ids are random, and say so
    assert "tracestate" not in receiver.calls["0"]["headers"]


async def test_random_flag_is_propagated(testpoint: RunningTestpoint, receiver: Receiver) -> None:
    await post_test(testpoint.url, [{"url": receiver.callback("0")}], [("traceparent", f"00-{TID}-{PID}-02")])
    parsed = receiver.traceparent("0")
    assert parsed.trace_id == int(TID, 16) and parsed.trace_flags == 2


@pytest.mark.parametrize(
    "body",
    [
        pytest.param([{"url": "http://example.invalid/x", "arguments": []}], id="remote-name"),
        pytest.param([{"url": "ftp://127.0.0.1/x"}], id="scheme"),
        pytest.param([{"arguments": []}], id="no-url"),
        pytest.param(["http://127.0.0.1/x"], id="not-an-object"),
        pytest.param([{"url": "http://127.0.0.1:1/x"}] * 65, id="too-many"),
    ],
)
async def test_bad_bodies_are_refused_before_any_call(testpoint: RunningTestpoint, body: Any) -> None:
    status, payload = await post_test(testpoint.url, body)
    assert status == 400 and "error" in payload


async def test_non_json_body_is_refused(testpoint: RunningTestpoint) -> None:
    async with aiohttp.ClientSession() as session, session.post(testpoint.url, data=b"not json") as response:
        assert response.status == 400


async def test_unreachable_callback_is_reported(testpoint: RunningTestpoint, receiver: Receiver) -> None:
    # Port 1 on loopback refuses connections: the failure is reported, later calls still run.
    status, results = await post_test(
        testpoint.url, [{"url": "http://127.0.0.1:1/x"}, {"url": receiver.callback("0")}]
    )
    assert status == 200
    assert "error" in results[0] and results[1]["status"] == 200


async def test_serve_testpoint_runs_until_cancelled(receiver: Receiver) -> None:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    propagator = W3CTraceContextPropagator(vendor_key="buildtel")
    task = asyncio.create_task(serve_testpoint(port=0, on_ready=ready.set_result, propagator=propagator))
    try:
        url = await asyncio.wait_for(ready, 10)
        assert url.startswith("http://127.0.0.1:")
        await post_test(url, [{"url": receiver.callback("0")}], [("traceparent", f"00-{TID}-{PID}-01")])
        own = receiver.traceparent("0").parent_id
        assert receiver.calls["0"]["headers"]["tracestate"] == f"buildtel={own:016x}"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
