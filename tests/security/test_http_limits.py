"""HTTP endpoints hold their limits against hostile clients: slow-loris headers, slow bodies,
deeply nested JSON.  Clients are raw sockets (so we control every byte and pause) or aiohttp."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from buildtel.services.tracer.http import RunningReceiver, start_receiver
from buildtel.services.tracer.service import TracerService
from buildtel.services.tracer.testpoint import start_testpoint
from buildtel.shared.httpserver import DEFAULT_LIMITS, BodyError, HttpLimits, decode_json, json_depth
from buildtel.shared.metrics import MetricsServer
from buildtel.shared.settings import Settings
from buildtel.shared.tracemodel import SpanRecord

SHORT = HttpLimits(idle_timeout=1.0, body_timeout=1.0, max_body_bytes=1024 * 1024)
HEAD = b"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"


def nested(depth: int) -> bytes:
    """A valid OTLP/JSON request whose one attribute nests ``depth`` arrayValues."""
    # Built as text: json.dumps itself recurses and cannot write 100 000 levels.
    value = '{"arrayValue": {"values": [' * depth + '{"stringValue": "leaf"}' + "]}}" * depth
    span = {"traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "spanId": "00f067aa0ba902b7", "name": "deep",
            "startTimeUnixNano": "1", "endTimeUnixNano": "2", "attributes": [{"key": "a", "value": "VALUE"}]}
    text = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]})
    return text.replace('"VALUE"', value).encode()


async def slow_loris(port: int, payload: bytes, pause: float, budget: float) -> tuple[float, bytes, int]:
    """Send ``payload`` a byte every ``pause`` s until the server closes or ``budget`` s pass.
    Returns (seconds until closed, what the server sent, bytes we managed to send)."""
    # The clock starts before connecting: the server's timer starts when it accepts, which is
    # before this coroutine resumes on a loaded machine (14.997 s was measured for a 15 s limit).
    start, sent = time.monotonic(), 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for byte in payload:
            if reader.at_eof() or time.monotonic() - start > budget:
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            sent += 1
            try:  # wait for the pause, or for the server to answer/close earlier
                data = await asyncio.wait_for(reader.read(65536), pause)
            except TimeoutError:
                continue
            rest = await asyncio.wait_for(reader.read(), budget) if data else b""
            return time.monotonic() - start, data + rest, sent
        rest = await asyncio.wait_for(reader.read(), budget)
        return time.monotonic() - start, rest, sent
    except ConnectionError:
        return time.monotonic() - start, b"", sent
    finally:
        writer.close()


@pytest.fixture
async def tracer(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[TracerService]:
    svc = TracerService(settings.with_(fsync=False), settings.nats_url or "", settings.redis_url or "", otlp_port=0)
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[RunningReceiver, list[SpanRecord]]]:
    got: list[SpanRecord] = []

    async def sink(spans: list[SpanRecord]) -> None:
        got.extend(spans)

    running = await start_receiver(sink, host="127.0.0.1", port=0, limits=SHORT)
    yield running, got
    await running.close()


async def test_slow_loris_headers_are_cut_off_after_the_idle_timeout(receiver: Any) -> None:
    running, got = receiver
    # 40 bytes of head at 0.1 s each would take 4 s; the server must close after 1 s.
    elapsed, answer, sent = await slow_loris(running.port, HEAD, pause=0.1, budget=30.0)
    assert answer == b""  # closed without a request ever being handled
    assert sent < len(HEAD)
    assert elapsed >= SHORT.idle_timeout  # not before the documented time
    assert got == [] and running.stats.requests == 0


async def test_slow_body_gets_408(receiver: Any) -> None:
    running, got = receiver
    head = HEAD.replace(b"Content-Length: 2", b"Content-Length: 400")
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(head + b"{")  # then nothing more: the body never completes
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 60)  # read to EOF: the server also closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"body not received within 1 s" in answer
    assert running.stats.timeouts == 1 and got == []


async def test_idle_connection_is_closed(receiver: Any) -> None:
    running, _ = receiver
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    start = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 60) == b""
    writer.close()
    assert time.monotonic() - start >= SHORT.idle_timeout - 0.05  # loop clock vs ours


async def test_default_idle_timeout_applies_to_the_tracer_service(tracer: TracerService) -> None:
    """The documented default (15 s) on the real service, not just the knob."""
    port = tracer.receiver.port  # type: ignore[union-attr]
    elapsed, answer, sent = await slow_loris(port, HEAD * 4, pause=0.25, budget=120.0)
    assert answer == b"" and sent < len(HEAD * 4)
    assert elapsed >= DEFAULT_LIMITS.idle_timeout


async def test_deeply_nested_otlp_json_is_400_not_500(tracer: TracerService) -> None:
    url = tracer.receiver.url  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as session:
        for depth in (30, 100_000):
            body_io = io.BytesIO(nested(depth))
            async with session.post(url, data=body_io, headers={"Content-Type": "application/json"}) as r:
                body = await r.json()
                assert r.status == 400, (depth, body)
                assert "nested deeper than 64 levels" in body["message"]
        # a reasonable nesting still goes through
        async with session.post(url, data=nested(5), headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()


async def test_testpoint_and_metrics_share_the_limits() -> None:
    testpoint = await start_testpoint(port=0, limits=SHORT)
    metrics = await MetricsServer(limits=SHORT).start()
    try:
        head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 40 + b"\r\n\r\n"
        for port in (testpoint.port, metrics.port):
            elapsed, answer, sent = await slow_loris(port, head, pause=0.1, budget=30.0)
            assert answer == b"" and sent < len(head) and elapsed >= SHORT.idle_timeout
        async with aiohttp.ClientSession() as session:
            deep = b"[" * 5000 + b"]" * 5000
            async with session.post(testpoint.url, data=deep, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400
                assert "nested deeper than 64 levels" in (await r.json())["error"]
            async with session.get(metrics.url + "/healthz") as r:
                assert r.status == 200
    finally:
        await testpoint.close()
        await metrics.stop()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=3), children, max_size=3), max_leaves=30)


def reference_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    return 0


@given(json_values, st.integers(min_value=0, max_value=8))
def test_depth_check_matches_a_recursive_count(value: Any, limit: int) -> None:
    depth = reference_depth(value)
    assert json_depth(value, limit) == (depth if depth <= limit else limit + 1)
    body = json.dumps(value).encode()
    if depth <= limit:
        assert decode_json(body, limit) == value
    else:
        with pytest.raises(BodyError) as err:
            decode_json(body, limit)
        assert err.value.status == 400


@given(st.binary(max_size=200))
def test_decode_json_never_raises_anything_but_body_error(body: bytes) -> None:
    try:
        decode_json(body, 4)
    except BodyError as exc:
        assert exc.status == 400
