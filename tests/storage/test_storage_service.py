"""The storage service end to end on real NATS (JetStream) and Redis: ingest, query API, dead letters."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest

from buildtel.services.storage.api import StorageClient, StorageError, endpoint_subject
from buildtel.services.storage.service import StorageService
from buildtel.shared.bus import dead_letter_decoder
from buildtel.shared.codec import encode
from buildtel.shared.keys import Keys
from buildtel.shared.protocol import EventBatch
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def service(request: pytest.FixtureRequest, settings: Settings, nc) -> AsyncIterator[StorageService]:
    # Parametrised with overrides: the codec's 8 MiB limit is also the server's max payload, so
    # "oversized" is only publishable below a lowered limit; small reply pages exercise paging
    # without publishing tens of megabytes.
    options = request.param if hasattr(request, "param") else {}
    svc = StorageService(settings, settings.nats_url or "", settings.redis_url or "", **options)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def publish(nc, settings: Settings, payload: bytes, msg_id: str | None = None) -> None:
    js = nc.jetstream()
    await js.publish(Subjects(settings.namespace).sessions_completed, payload,
                     headers={"Nats-Msg-Id": msg_id} if msg_id else None)


async def test_published_sessions_are_queryable_with_filters(service: StorageService, settings: Settings, nc,
                                                             make_session) -> None:
    now = time.time()
    specs = [("success", "main", ["a1"], "//app:"), ("failed", "main", ["a1", "a2"], "//lib:"),
             ("failed", "dev", ["a2"], "//app:"), ("success", "dev", ["a3"], "//lib:"),
             ("abandoned", "main", ["a3"], "//app:")]
    sessions = [make_session(i, finish=now - 100 + i, outcome=o, branch=b, agents=a, target_prefix=t)
                for i, (o, b, a, t) in enumerate(specs * 2)]
    for s in sessions:
        await publish(nc, settings, encode(s), s.id)
    client = StorageClient(nc, Subjects(settings.namespace))

    async def all_stored() -> bool:
        return (await client.stats()).sessions == len(sessions)

    await eventually(all_stored)
    by_id = {s.id: s for s in sessions}
    newest_first = sorted(sessions, key=lambda s: s.finish, reverse=True)
    assert [s.id for s in await client.recent(4)] == [s.id for s in newest_first[:4]]
    assert await client.get(sessions[3].id) == sessions[3]
    failed_main = await client.query(outcome="failed", branch="main")
    assert [s.id for s in failed_main] == [s.id for s in newest_first if s.outcome == "failed"
                                           and s.environment.vcs.branch == "main"]
    assert {s.id for s in await client.query(agent="a2")} == {s.id for s in sessions if "a2" in s.agents}
    assert {s.id for s in await client.query(target="//lib:2")} == {
        s.id for s in sessions if s.targets[0].name.startswith("//lib:")}
    window = await client.range(now - 98, now - 94)
    assert [s.id for s in window] == [s.id for s in sessions[2:6]]  # oldest first, end exclusive
    assert all(by_id[s.id] == s for s in window)
    stats = await client.stats()
    assert stats.stored == len(sessions) and stats.dead_letters == 0 and service.stored == len(sessions)
    # Summaries: the same filters, a line per session, no record read.
    summaries = await client.summaries(outcome="failed", branch="main")
    assert [s.id for s in summaries] == [s.id for s in failed_main]
    first = summaries[0]
    src = by_id[first.id]
    assert (first.targets, first.failed, first.branch, first.commit, first.agents, first.labels) == (
        len(src.targets), src.totals.failed, "main", src.environment.vcs.commit, src.agents, src.labels)
    assert first.cache_hit_rate == pytest.approx(src.cache_hit_rate) and first.stored_bytes == len(encode(src))
    assert [s.id for s in await client.summaries(label="job=3")] == [sessions[3].id]
    assert [s.id for s in await client.summaries(order="oldest", limit=3)] == [s.id for s in sessions[:3]]
    assert {s.id for s in await client.summaries(target="//lib:2", agent="a3")} == {
        s.id for s in sessions if s.targets[0].name.startswith("//lib:") and "a3" in s.agents}


async def test_api_errors_are_clear(service: StorageService, settings: Settings, nc) -> None:
    client = StorageClient(nc, Subjects(settings.namespace))
    with pytest.raises(StorageError) as err:
        await client.get("f" * 32)
    assert err.value.not_found and "not stored" in err.value.description
    with pytest.raises(StorageError) as err:
        await client.query(outcome="exploded")
    assert err.value.code == 400 and "outcome" in err.value.description
    with pytest.raises(StorageError) as err:
        await client.range(100.0, 50.0)
    assert err.value.code == 400
    reply = await nc.request(endpoint_subject(Subjects(settings.namespace), "recent"), b"\xc1garbage", timeout=2)
    assert reply.headers["Nats-Service-Error-Code"] == "400"
    # Discoverable as a NATS micro service.
    info = msgspec.json.decode((await nc.request(f"$SRV.INFO.{settings.namespace}-storage", b"", timeout=2)).data)
    assert {e["subject"] for e in info["endpoints"]} >= {f"{settings.namespace}.storage.{n}" for n in
                                                         ("get", "recent", "range", "query", "stats")}


async def test_no_service_is_a_clear_error(settings: Settings, nc) -> None:
    client = StorageClient(nc, Subjects(settings.namespace), timeout=1.0)
    with pytest.raises(StorageError) as err:
        await client.stats()
    assert err.value.code == 503 and "no storage service" in err.value.description


@pytest.mark.parametrize("service", [{"max_reply_bytes": 512 * 1024}], indirect=True)
async def test_large_results_span_several_replies(service: StorageService, settings: Settings, nc,
                                                  make_session) -> None:
    # 40 of them are several times what one reply may carry.
    sessions = [make_session(i, targets=400, env_vars=40) for i in range(40)]
    assert len(encode(sessions[0])) * 40 > 3 * 512 * 1024
    for s in sessions:
        await publish(nc, settings, encode(s), s.id)
    client = StorageClient(nc, Subjects(settings.namespace))

    async def all_stored() -> bool:
        return (await client.stats()).sessions == 40

    await eventually(all_stored)
    requests = 0

    async def count_request(_msg) -> None:
        nonlocal requests
        requests += 1

    spy = await nc.subscribe(endpoint_subject(Subjects(settings.namespace), "recent"), cb=count_request)
    got = await client.recent(40)
    await spy.unsubscribe()
    assert requests >= 3  # the client followed the cursor over several replies
    assert [s.id for s in got] == [s.id for s in reversed(sessions)]
    assert got[0] == sessions[-1]
    assert len(await client.range(0, time.time())) == 40
    # Summaries page too: 40 in replies of at most 512 KiB // 2 KiB = 256 each, limit 25 per ask.
    assert [s.id for s in await client.summaries(limit=25)] == [s.id for s in reversed(sessions)][:25]


@pytest.mark.parametrize("service", [{"max_message_bytes": 64 * 1024}], indirect=True)
async def test_malformed_messages_are_dead_lettered(service: StorageService, settings: Settings, nc,
                                                    redis_client, make_session) -> None:
    subjects = Subjects(settings.namespace)
    dead: list = []

    async def on_dead_letter(m) -> None:
        dead.append(dead_letter_decoder.decode(m.data))

    sub = await nc.subscribe(subjects.dead_letter("storage"), cb=on_dead_letter)
    good = [make_session(i) for i in range(4)]
    bad = {
        "random bytes": os.urandom(300),
        "wrong types": msgspec.msgpack.encode({"type": "session", "id": 5, "finish": "yesterday"}),
        "another message type": encode(EventBatch(session_id="a" * 32, agent_id="x", events=[])),
        "oversized": encode(make_session(99, targets=800)),  # > the service's 64 KiB limit here
        "bad id": encode(make_session(98, session_id="../../etc/passwd")),
    }
    assert len(bad["oversized"]) > 64 * 1024
    await publish(nc, settings, encode(good[0]), good[0].id)
    for k, payload in enumerate(bad.values()):
        await publish(nc, settings, payload)
        await publish(nc, settings, encode(good[1 + k % 3]))  # good ones around them (no Nats-Msg-Id)
    for s in good[1:]:
        await publish(nc, settings, encode(s), s.id)
    client = StorageClient(nc, Subjects(settings.namespace))

    async def settled() -> bool:
        return len(dead) >= len(bad) and (await client.stats()).sessions == len(good)

    await eventually(settled)
    reasons = [d.reason for d in dead]
    assert len(dead) == len(bad) and service.dead_letters == len(bad)
    assert any("exceeds" in r for r in reasons) and any("invalid session id" in r for r in reasons)
    assert any("Expected `str`, got `int`" in r for r in reasons)
    assert {bytes(d.data) for d in dead if len(d.data) < 64 * 1024} >= {bad["random bytes"], bad["wrong types"]}
    assert all(d.service == "storage" and d.subject == subjects.sessions_completed for d in dead)
    assert int(await redis_client.get(Keys(settings.namespace).counter("deadletter:storage"))) == len(bad)
    assert {s.id for s in await client.recent(10)} == {s.id for s in good}
    assert service.duplicates >= 1  # the good sessions re-published without a Nats-Msg-Id
    # Everything was acked: nothing waits for redelivery, no dead letter comes twice.
    info = await nc.jetstream().consumer_info(subjects.sessions_stream, "storage")
    assert info.num_pending == 0 and info.num_ack_pending == 0
    await asyncio.sleep(0.3)
    assert len(dead) == len(bad)
    await sub.unsubscribe()


async def test_restart_resumes_without_duplicates(settings: Settings, nc, make_session) -> None:
    subjects = Subjects(settings.namespace)
    first = [make_session(i) for i in range(5)]
    svc = StorageService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    for s in first:
        await publish(nc, settings, encode(s), s.id)
    client = StorageClient(nc, subjects)

    async def count_is(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return (await client.stats()).sessions == n
        return check

    await eventually(await count_is(5))
    await svc.stop()
    await svc.stop()  # idempotent
    later = [make_session(10 + i) for i in range(3)]
    for s in later:  # published while storage is down: JetStream keeps them
        await publish(nc, settings, encode(s), s.id)
    svc = StorageService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    try:
        await eventually(await count_is(8))
        assert {s.id for s in await client.recent(20)} == {s.id for s in first + later}
        assert svc.stored == 3 and svc.duplicates == 0  # the durable consumer resumed where it was
        # The restart opened the first five from the index file written at stop; the background
        # verify then checksums that segment.
        assert svc.store is not None and svc.store.last_report.indexed_from_sidecars == 1

        async def verified() -> bool:
            return (await client.stats()).unverified_segments == 0

        await eventually(verified)
        assert (await client.stats()).open_s > 0
    finally:
        await svc.stop()
