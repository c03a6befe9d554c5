"""``GET /api/v1/stream`` against a real stack: the collector's started events, finished sessions and
alerts arrive as server-sent events of the key's tenant only; ``Last-Event-ID`` resumes exactly
(also across a restart of the web service); limits, slow clients and shutdown end streams cleanly."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from buildtel.services.analyzer.alerts import Alert, encode_alert
from buildtel.services.collector.service import CollectorService
from buildtel.services.web.service import WebService
from buildtel.shared import apikeys
from buildtel.shared.bus import ensure_streams
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import batches, publish_events, synthetic_build
from tests.web.conftest import eventually, publish
from tests.web.sse import open_stream


@pytest.fixture
async def collector(settings: Settings, redis_client: Any) -> AsyncIterator[CollectorService]:
    svc = CollectorService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def key(settings: Settings, redis_client: Any) -> str:
    value, _ = await apikeys.create(redis_client, Keys(settings.namespace), tenant=settings.namespace, scope="read")
    return value


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start_web(settings: Settings, **hub: Any) -> WebService:
    web = WebService(settings, settings.nats_url or "", settings.redis_url or "")
    web.hub_options = hub
    await web.start()
    return web


@pytest.fixture
async def web(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[WebService]:
    svc = await start_web(settings)
    yield svc
    await svc.stop()


def make_alert(n: int, kind: str = "target", direction: str = "regression") -> Alert:
    return Alert(id=f"alert-{n}-{uuid.uuid4().hex[:8]}", kind=kind, direction=direction,  # type: ignore[arg-type]
                 series=f"target://pkg:t{n}", branch="main", target=f"//pkg:t{n}", cache=None,
                 before_median_s=1.0, after_median_s=2.0, change_pct=100.0, confidence=0.99, p_value=0.01,
                 first_session_id="a" * 32, first_session_start=time.time() - 10, last_good_session_id=None,
                 last_good_commit=None, first_bad_commit=None, commit_range=None, detected_session_id="b" * 32,
                 detected_at=time.time(), points_before=10, points_after=5)


async def publish_alert(nc: Any, ns: str, alert: Alert) -> None:
    subjects = Subjects(ns)
    await nc.jetstream().publish(subjects.alert(alert.kind, alert.branch, alert.target), encode_alert(alert),
                                 headers={"Nats-Msg-Id": alert.id})


async def ensure_alerts(nc: Any, ns: str) -> None:
    """The alerts stream as the analyzer declares it (these tests publish alerts themselves)."""
    from buildtel.services.analyzer.api import ensure_alerts_stream
    from buildtel.services.analyzer.subjects import AnalyzerSubjects

    await ensure_alerts_stream(nc.jetstream(), AnalyzerSubjects.of(ns))


async def test_started_finished_and_alert_events_of_real_builds(settings: Settings, nc: Any, collector: Any,
                                                                web: WebService, key: str, http: Any) -> None:
    await ensure_alerts(nc, settings.namespace)
    js, subjects = nc.jetstream(), Subjects(settings.namespace)
    sse = await open_stream(http, web.url, key)
    assert sse.retry == 3000 and sse.last_id is not None
    sid, per_agent, expected = synthetic_build(targets=30, seed=11)
    events = per_agent["agent-a"]
    await publish_events(js, subjects, sid, "agent-a", events[:1])  # BuildStarted alone
    started = await sse.next()
    assert (started.event, started.data["id"], started.data["name"]) == ("session.started", sid, "synthetic")
    assert started.data["agent"] == "agent-a" and started.data["type"] == "session_started"
    # The same BuildStarted delivered again (another Msg-Id, so JetStream cannot drop the batch):
    # the collector announces it again and the stream's Nats-Msg-Id keeps one announcement.
    await js.publish(subjects.events(sid), batches(sid, "agent-a", events[:1])[0][1], headers={"Nats-Msg-Id": "again"})
    await eventually(lambda: _announced(collector, 2))
    await publish_events(js, subjects, sid, "agent-a", events[1:])
    finished = await sse.next()
    assert finished.event == "session.finished" and finished.data["id"] == sid
    assert finished.data["outcome"] == "success" and finished.data["targets"] == expected["targets"]
    assert (finished.data["cache_hits"], finished.data["cache_misses"]) == (expected["hits"], expected["misses"])
    alert = make_alert(1)
    await publish_alert(nc, settings.namespace, alert)
    got = await sse.next()
    assert (got.event, got.data["id"], got.data["direction"]) == ("alert", alert.id, "regression")
    # Ids are positions of both streams and only grow.
    s1, a1 = map(int, started.id.split("-"))
    s2, a2 = map(int, finished.id.split("-"))
    s3, a3 = map(int, got.id.split("-"))
    assert s1 < s2 == s3 and a1 == a2 < a3
    assert collector.announce_failures == 0
    sse.resp.close()


async def _announced(collector: CollectorService, n: int) -> bool:
    return collector.sessions_started >= n


async def test_resume_with_last_event_id_gets_exactly_what_was_missed(settings: Settings, nc: Any,
                                                                      make_session: Any, web: WebService,
                                                                      key: str, http: Any) -> None:
    await ensure_alerts(nc, settings.namespace)
    sse = await open_stream(http, web.url, key)
    first = make_session(0)
    await publish(nc, settings, [first])
    assert (await sse.next()).data["id"] == first.id
    resume = sse.last_id
    assert resume is not None
    sse.resp.close()
    missed = [make_session(i) for i in range(1, 4)]
    await publish(nc, settings, missed[:2])
    alert = make_alert(7)
    await publish_alert(nc, settings.namespace, alert)
    await publish(nc, settings, missed[2:])
    # The header; replayed: the sessions stream's, then the alerts stream's; then live.
    again = await open_stream(http, web.url, key, last_id=resume)
    assert [e.data["id"] for e in await again.events(4)] == [m.id for m in missed] + [alert.id]
    live = make_session(9)
    await publish(nc, settings, [live])
    assert (await again.next()).data["id"] == live.id
    again.resp.close()
    # The query parameter, for clients that cannot set headers: the same, and the live one now too.
    by_query = await open_stream(http, web.url, key, last_event_id=resume)
    assert [e.data["id"] for e in await by_query.events(5)] == [m.id for m in [*missed, live]] + [alert.id]
    assert by_query.last_id == again.last_id
    last = make_session(10)
    await publish(nc, settings, [last])
    assert (await by_query.next()).data["id"] == last.id
    by_query.resp.close()
    # Without an id: from now, nothing old.
    fresh = await open_stream(http, web.url, key)
    newest = make_session(20)
    await publish(nc, settings, [newest])
    assert (await fresh.next()).data["id"] == newest.id
    fresh.resp.close()


async def test_web_restart_mid_stream_misses_and_repeats_nothing(settings: Settings, nc: Any, make_session: Any,
                                                                 key: str, http: Any, redis_client: Any) -> None:
    await ensure_alerts(nc, settings.namespace)
    web = await start_web(settings)
    try:
        sse = await open_stream(http, web.url, key)
        before = make_session(0)
        await publish(nc, settings, [before])
        assert (await sse.next()).data["id"] == before.id
    finally:
        await web.stop()
        await web.stop()  # idempotent
    tail = await sse.until_end()  # the service said goodbye and closed the stream
    assert tail == [] and any("stopping" in c for c in sse.comments)
    while_down = [make_session(i) for i in range(1, 4)]
    await publish(nc, settings, while_down)
    alert = make_alert(3, kind="build", direction="improvement")
    await publish_alert(nc, settings.namespace, alert)
    web2 = await start_web(settings)
    try:
        again = await open_stream(http, web2.url, key, last_id=sse.last_id)
        got = await again.events(4)
        assert sorted(e.data["id"] for e in got) == sorted([s.id for s in while_down] + [alert.id])
        assert [e.data["id"] for e in got if e.event == "session.finished"] == [s.id for s in while_down]
        after = make_session(5)
        await publish(nc, settings, [after])
        assert (await again.next()).data["id"] == after.id
        again.resp.close()
    finally:
        await web2.stop()


async def test_another_tenants_events_never_appear(settings: Settings, nc: Any, make_session: Any,
                                                   web: WebService, key: str, http: Any) -> None:
    other = settings.with_(namespace="t" + uuid.uuid4().hex[:12])
    await ensure_streams(nc.jetstream(), Subjects(other.namespace))
    await ensure_alerts(nc, other.namespace)
    try:
        sse = await open_stream(http, web.url, key)
        theirs = [make_session(i) for i in range(3)]
        await publish(nc, other, theirs)
        await publish_alert(nc, other.namespace, make_alert(1))
        mine = make_session(10)
        await publish(nc, settings, [mine])
        # Theirs were published first: had any leaked, it would come before mine.
        assert (await sse.next()).data["id"] == mine.id
        sse.resp.close()
    finally:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name.startswith(other.namespace.upper()):
                await js.delete_stream(info.config.name)


async def test_no_key_wrong_key_bad_id_and_limits_are_problems(settings: Settings, nc: Any, key: str,
                                                               http: Any, redis_client: Any) -> None:
    web = await start_web(settings, max_per_tenant=1)
    try:
        url = web.url + "/api/v1/stream"
        for headers in ({}, {"Authorization": "Bearer btk_000000000000_" + "x" * 43}):
            async with http.get(url, headers=headers) as resp:
                body = await resp.json(content_type=None)
                assert (resp.status, resp.content_type) == (401, "application/problem+json"), body
                assert body["status"] == 401 and "key" in body["detail"]
        auth = {"Authorization": f"Bearer {key}"}
        async with http.get(url, headers={**auth, "Last-Event-ID": "nonsense"}) as resp:
            assert (resp.status, resp.content_type) == (400, "application/problem+json")
        sse = await open_stream(http, web.url, key)
        async with http.get(url, headers=auth) as resp:
            body = await resp.json(content_type=None)
            assert (resp.status, resp.content_type) == (429, "application/problem+json"), body
            assert "open streams" in body["detail"] and resp.headers["Retry-After"]
        sse.resp.close()
        await eventually(lambda: _no_clients(web))
        (await open_stream(http, web.url, key)).resp.close()  # the slot is free again
    finally:
        await web.stop()
    web = await start_web(settings, max_streams=1)  # the service's own limit: 503
    try:
        sse = await open_stream(http, web.url, key)
        async with http.get(web.url + "/api/v1/stream", headers={"Authorization": f"Bearer {key}"}) as resp:
            body = await resp.json(content_type=None)
            assert (resp.status, resp.content_type) == (503, "application/problem+json"), body
            assert "already serves 1 streams" in body["detail"]
        sse.resp.close()
    finally:
        await web.stop()


async def _no_clients(web: WebService) -> bool:
    return web.hub is not None and web.hub.clients == 0


async def test_a_client_that_stops_reading_is_cut_off_with_bounded_memory(settings: Settings, nc: Any,
                                                                          make_session: Any, key: str,
                                                                          redis_client: Any) -> None:
    web = await start_web(settings, queue_events=4, write_timeout_s=1.0)
    try:
        assert web.hub is not None
        # A raw socket with a small receive buffer that never reads.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((web.host, web.port))
        sock.sendall(f"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
        await eventually(lambda: _clients(web, 1))
        big = []
        for i in range(400):  # ~4 KB each: far more than the socket buffers hold
            s = make_session(i)
            s.labels = {"padding": "x" * 4000}
            big.append(s)
        feed = web.hub.feeds[settings.namespace]
        n = 0
        while not web.hub.clients_dropped["slow"] and all(c.reason is None for c in feed.clients):
            assert n < len(big), "the slow client was never cut off"
            await publish(nc, settings, big[n:n + 20])
            n += 20
            await eventually(lambda: _feed_caught_up(web, settings, nc), timeout=20)
        assert all(c.queue.qsize() <= 4 for c in feed.clients)  # never more than its bound
        await eventually(lambda: _dropped(web))
        assert web.hub.clients == 0
        # The server closed the connection.
        sock.settimeout(20)
        while sock.recv(65536):
            pass
        sock.close()
    finally:
        await web.stop()


async def test_a_client_that_falls_behind_gets_a_final_comment_saying_why(settings: Settings, nc: Any,
                                                                          make_session: Any, key: str,
                                                                          redis_client: Any) -> None:
    web = await start_web(settings, queue_events=4)  # writes may block long (the default 30 s)
    try:
        assert web.hub is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((web.host, web.port))
        sock.sendall(f"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
        await eventually(lambda: _clients(web, 1))
        feed = web.hub.feeds[settings.namespace]
        n = 0
        while all(c.reason is None for c in feed.clients):  # until its queue overflows
            assert n < 400, "the client's queue never overflowed"
            batch = [make_session(n + i) for i in range(20)]
            for s in batch:
                s.labels = {"padding": "x" * 4000}
            await publish(nc, settings, batch)
            n += 20
            await eventually(lambda: _feed_caught_up(web, settings, nc), timeout=20)
        # Now it reads: it gets what was queued, then the reason, then the end of the stream.
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        received = bytearray()
        async with asyncio.timeout(30):
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
        sock.close()
        assert b": disconnected: client too slow (4 events queued)" in received
        await eventually(lambda: _dropped(web))
    finally:
        await web.stop()


async def _dropped(web: WebService) -> bool:
    return web.hub is not None and web.hub.clients_dropped["slow"] == 1


async def _clients(web: WebService, n: int) -> bool:
    return web.hub is not None and web.hub.clients == n


async def _feed_caught_up(web: WebService, settings: Settings, nc: Any) -> bool:
    """The feed has handed every published session to its clients (or the client is gone)."""
    hub = web.hub
    assert hub is not None
    last = (await nc.jetstream().stream_info(Subjects(settings.namespace).sessions_stream)).state.last_seq
    feed = hub.feeds[settings.namespace]
    return hub.clients_dropped["slow"] > 0 or feed.seen[0] >= last


async def test_stop_ends_open_streams_with_a_comment(settings: Settings, key: str, http: Any,
                                                     redis_client: Any) -> None:
    web = await start_web(settings)
    sse = await open_stream(http, web.url, key)
    task = asyncio.create_task(sse.until_end())
    await web.stop()
    assert await task == []
    assert web.hub is not None and web.hub.clients == 0 and web.hub.clients_dropped["shutdown"] == 1
    assert sse.comments[-1].startswith("the web service is stopping")


async def test_openapi_describes_the_stream_and_its_event_payloads(settings: Settings, nc: Any, make_session: Any,
                                                                   web: WebService, key: str, http: Any) -> None:
    import jsonschema
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    async with http.get(web.url + "/api/v1/openapi.json") as resp:
        doc = await resp.json()
    op = doc["paths"]["/api/v1/stream"]["get"]
    events = op["responses"]["200"]["content"]["text/event-stream"]["x-events"]
    assert set(events) == {"session.started", "session.finished", "alert"}
    registry: Registry[Any] = Registry().with_resource("urn:api", DRAFT202012.create_resource(doc))
    await ensure_alerts(nc, settings.namespace)
    sse = await open_stream(http, web.url, key)
    await publish(nc, settings, [make_session(0)])
    await publish_alert(nc, settings.namespace, make_alert(0))
    for got in await sse.events(2):
        ref = events[got.event]["$ref"].replace("#", "urn:api#", 1)
        jsonschema.Draft202012Validator({"$ref": ref}, registry=registry).validate(got.data)
    sse.resp.close()


async def test_a_session_over_one_message_arrives_whole(settings: Settings, nc: Any, make_session: Any,
                                                        web: WebService, key: str, http: Any) -> None:
    from buildtel.shared import bigmsg
    from buildtel.shared.codec import encode

    big = make_session(0, targets=50)
    big.environment.env = {"PAD": "x" * 9_000_000}  # not in a summary: the event stays small
    data = encode(big)
    assert len(data) > bigmsg.message_limit(nc)  # so it travels as an object reference
    sse = await open_stream(http, web.url, key)
    await bigmsg.publish_session(nc.jetstream(), nc, Subjects(settings.namespace), data, msg_id=big.id)
    got = await sse.next()
    assert (got.event, got.data["id"], got.data["targets"]) == ("session.finished", big.id, 50)
    assert got.data["stored_bytes"] == len(data)
    sse.resp.close()


async def test_an_idle_stream_gets_keep_alive_comments(settings: Settings, key: str, http: Any,
                                                       redis_client: Any) -> None:
    web = await start_web(settings, keepalive_s=0.2)
    try:
        sse = await open_stream(http, web.url, key)
        async with asyncio.timeout(20):
            while sse.comments.count("keep-alive") < 2:
                assert await sse._block() is None  # comment blocks only: nothing was published
        sse.resp.close()
    finally:
        await web.stop()
