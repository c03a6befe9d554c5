"""``/metrics`` and ``/healthz``: one endpoint per process serving every attached service,
counters that move when a session flows through collector and storage, the bearer token."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.service import StorageService
from buildtel.shared import metrics
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import publish_events, synthetic_build

pytestmark = pytest.mark.timeout(60)


def _value(text: str, name: str, service: str) -> float:
    m = re.search(rf'^{name}{{namespace="[^"]*",service="{service}"}} (\S+)$', text, re.MULTILINE)
    assert m, f"{name} for {service} not in:\n{text}"
    return float(m.group(1))


async def _get(url: str, token: str | None = None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


class Fake:
    def __init__(self, name: str, values: dict[str, float], *, ok: bool = True, ns: str = "ns1") -> None:
        self.name, self.values, self.ok = name, values, ok
        self.settings = Settings(namespace=ns)

    def metrics(self) -> dict[str, float]:
        if self.values is None:
            raise RuntimeError("broken")
        return self.values

    def healthy(self) -> bool:
        return self.ok


class AsyncFake(Fake):
    async def metrics(self) -> dict[str, float]:  # type: ignore[override]
        await asyncio.sleep(0)
        return self.values


async def test_one_endpoint_serves_every_attached_service() -> None:
    settings = Settings()
    a = Fake("collector", {"events_in_total": 5, "consumer_lag": 2})
    b = AsyncFake("storage", {"sessions_stored_total": 1})
    server = await metrics.attach(a, settings, port=0)
    assert server is not None and server.port > 0
    assert await metrics.attach(b, settings, port=12345) is server  # the running endpoint is shared
    try:
        status, ctype, text = await _get(server.url + "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert _value(text, "buildtel_events_in_total", "collector") == 5
        assert _value(text, "buildtel_consumer_lag", "collector") == 2
        assert _value(text, "buildtel_sessions_stored_total", "storage") == 1
        assert _value(text, "buildtel_up", "storage") == 1
        assert re.search(r"^# TYPE buildtel_events_in(_total)? counter$", text, re.MULTILINE)
        assert "# TYPE buildtel_consumer_lag gauge" in text
        status, _, body = await _get(server.url + "/healthz")
        assert status == 200 and '"collector": "ok"' in body
        b.ok = False
        assert (await _get(server.url + "/healthz"))[0] == 503
        broken = Fake("analyzer", None)  # type: ignore[arg-type]
        server.add(broken)
        status, _, text = await _get(server.url + "/metrics")
        assert status == 200 and "buildtel_metrics_scrape_errors_total 1.0" in text
        assert 'service="analyzer"' not in text and _value(text, "buildtel_events_in_total", "collector") == 5
        server.remove(broken)
    finally:
        await metrics.detach(a)
        assert metrics.current() is server  # still serving b
        await metrics.detach(b)
    assert metrics.current() is None
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(server.url + "/healthz")


async def test_no_port_no_endpoint() -> None:
    assert await metrics.attach(Fake("x", {}), Settings(), port=None) is None
    assert metrics.current() is None


async def test_the_bearer_token_is_enforced() -> None:
    svc = Fake("collector", {"events_in_total": 1})
    server = await metrics.attach(svc, Settings(http_token="s3cret"), port=0)
    assert server is not None
    try:
        for path in ("/metrics", "/healthz"):
            assert (await _get(server.url + path))[0] == 401
            assert (await _get(server.url + path, token="wrong"))[0] == 401
            assert (await _get(server.url + path, token="s3cret"))[0] == 200
    finally:
        await metrics.detach(svc)


@pytest.fixture
async def stack(settings: Settings, nc, redis_client) -> AsyncIterator[tuple[CollectorService, StorageService]]:
    collector = CollectorService(settings, settings.nats_url or "", settings.redis_url or "", metrics_port=0)
    storage = StorageService(settings, settings.nats_url or "", settings.redis_url or "", metrics_port=0)
    await collector.start()
    await storage.start()
    yield collector, storage
    await storage.stop()
    await collector.stop()


async def test_counters_move_when_a_session_flows_through(settings, nc, stack) -> None:
    collector, storage = stack
    server = metrics.current()
    assert server is not None and set(server.services) == {id(collector), id(storage)}
    _, _, before = await _get(server.url + "/metrics")
    assert _value(before, "buildtel_events_in_total", "collector") == 0
    assert _value(before, "buildtel_sessions_stored_total", "storage") == 0
    assert _value(before, "buildtel_consumer_lag", "storage") == 0
    assert (await _get(server.url + "/healthz"))[0] == 200

    sid, per_agent, expected = synthetic_build(targets=30)
    for agent, events in per_agent.items():
        await publish_events(nc.jetstream(), Subjects(settings.namespace), sid, agent, events)
    await nc.jetstream().publish(Subjects(settings.namespace).events(sid), b"not a batch")  # a dead letter
    for _ in range(200):
        if storage.stored == 1 and collector.dead_letters == 1:
            break
        await asyncio.sleep(0.05)
    _, _, after = await _get(server.url + "/metrics")
    assert _value(after, "buildtel_events_in_total", "collector") == expected["events"]
    assert _value(after, "buildtel_sessions_completed_total", "collector") == 1
    assert _value(after, "buildtel_dead_letters_total", "collector") == 1
    assert _value(after, "buildtel_sessions_stored_total", "storage") == 1
    assert _value(after, "buildtel_consumer_lag", "collector") == 0
    assert not math.isnan(_value(after, "buildtel_consumer_lag", "storage"))
    assert f'namespace="{settings.namespace}"' in after


async def test_consumer_lag_counts_what_the_consumer_has_not_been_given(settings, nc, redis_client) -> None:
    storage = StorageService(settings, settings.nats_url or "", settings.redis_url or "", metrics_port=0)
    await storage.start()
    await storage.stop()  # the durable consumer stays; sessions published now wait for it
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    for i in range(3):
        await js.publish(subjects.sessions_completed, b"x", headers={"Nats-Msg-Id": f"lag-{i}"})
    # The server counts a stored message into a consumer's pending count asynchronously (its
    # consumer loop is signalled after the publish is acknowledged): under load, consumer info read
    # right after the publish said 2 once.  The lag reaches 3 and never more: wait for it, bounded.
    lag = await metrics.consumer_lag(js, subjects.sessions_stream, "storage")
    for _ in range(100):
        if lag >= 3:
            break
        await asyncio.sleep(0.05)
        lag = await metrics.consumer_lag(js, subjects.sessions_stream, "storage")
    assert lag == 3
    assert math.isnan(await metrics.consumer_lag(js, subjects.sessions_stream, "no-such-consumer"))


async def test_every_service_of_the_stack_serves_its_counters(settings, nc, redis_client) -> None:
    from buildtel.services.analyzer.service import AnalyzerService
    from buildtel.services.recorder.service import RecorderService
    from buildtel.services.tracer.service import TracerService

    url, rurl = settings.nats_url or "", settings.redis_url or ""
    services = [RecorderService(settings, url, rurl, metrics_port=0),
                AnalyzerService(settings, url, rurl, metrics_port=0),
                TracerService(settings, url, rurl, otlp_port=0, metrics_port=0)]
    for svc in services:
        await svc.start()
    try:
        server = metrics.current()
        assert server is not None and len(server.services) == 3
        status, _, text = await _get(server.url + "/metrics")
        assert status == 200
        for name in ("recorder", "analyzer", "tracer"):
            assert _value(text, "buildtel_up", name) == 1
            assert _value(text, "buildtel_consumer_lag", name) == 0
            assert _value(text, "buildtel_dead_letters_total", name) == 0
        assert _value(text, "buildtel_alerts_total", "analyzer") == 0
        assert _value(text, "buildtel_spans_consumer_lag", "tracer") == 0
        assert _value(text, "buildtel_events_persisted_total", "recorder") == 0
    finally:
        for svc in reversed(services):
            await svc.stop()
    assert metrics.current() is None
