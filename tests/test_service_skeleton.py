"""The service skeleton (shared/service.py) on real NATS and Redis: one declaration gives a
durable consumer whose failing message is retried then dead-lettered, micro endpoints whose
typed errors reach the client as codes, /metrics counters, and an idempotent start/stop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from buildtel.shared import micro
from buildtel.shared.bus import dead_letter_decoder
from buildtel.shared.service import NOT_FOUND, BusService, Consumer, Endpoint, ServiceError
from buildtel.shared.settings import Settings


class _Err(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code, self.text = code, text


class Probe(BusService):
    """A small service: the tracer's role (its permissions), its own durable on the sessions stream."""

    name = "tracer"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[bytes] = []

    def consumers(self) -> list[Consumer]:
        return [Consumer(stream=self.subjects.sessions_stream, subject=self.subjects.sessions_completed,
                         durable="probe", handler=self._on, what="probe", ack_wait_s=1.0,
                         poison_after=2, nak_delay=lambda n: 0.1)]

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("echo", self.subjects.endpoint("tracer", "echo"), self._echo)]

    def counters(self) -> dict[str, float]:
        return {"seen_total": len(self.seen)}

    async def _on(self, msg: Any) -> None:
        if msg.data == b"bad":
            raise RuntimeError("cannot use this")
        self.seen.append(msg.data)
        await msg.ack()

    async def _echo(self, data: bytes) -> bytes:
        if data == b"missing":
            raise ServiceError(NOT_FOUND, "no such thing")
        if data == b"crash":
            raise ValueError("unexpected")
        return data.upper()


@pytest.mark.timeout(60)
async def test_a_declared_service_consumes_dead_letters_serves_and_stops(settings: Settings, nc: Any) -> None:
    svc = Probe(settings, settings.nats_url or "", settings.redis_url or "")
    sub = await nc.subscribe(svc.subjects.dead_letter("tracer"))
    await svc.start()
    await svc.start()  # already started: nothing happens
    try:
        js = nc.jetstream()
        await js.publish(svc.subjects.sessions_completed, b"good")
        await js.publish(svc.subjects.sessions_completed, b"bad")
        letter = dead_letter_decoder.decode((await sub.next_msg(timeout=20)).data)
        assert letter.service == "tracer" and letter.data == b"bad"
        assert letter.reason == "probe failed 2 times (each delivery): RuntimeError: cannot use this"
        assert letter.headers["Buildtel-Reason-Code"] == "poison"
        assert svc.seen == [b"good"] and svc.rejected == {"poison": 1}

        async def ask(body: bytes) -> bytes:
            return await micro.request(nc, svc.subjects.endpoint("tracer", "echo"), body, timeout=5,
                                       service="probe", error=_Err)

        assert await ask(b"hi") == b"HI"
        with pytest.raises(_Err) as err:
            await ask(b"missing")
        assert (err.value.code, err.value.text) == (404, "no such thing")
        with pytest.raises(_Err) as err:
            await ask(b"crash")
        assert err.value.code == 500 and "ValueError: unexpected" in err.value.text
        m = await svc.metrics()
        assert m["seen_total"] == 1 and m["dead_letters_total"] == 1
        # The lag is JetStream's count of unacknowledged messages: under load the server may not
        # have counted the dead-lettered message's ack yet when the metrics are read.
        deadline = time.monotonic() + 30
        while m["consumer_lag"] != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            m = await svc.metrics()
        assert m["consumer_lag"] == 0
    finally:
        await svc.stop()
        await svc.stop()  # idempotent
        await sub.unsubscribe()
    assert svc.nc.is_closed and all(t.done() for t in svc._tasks)
    msgspec.msgpack.encode(svc.stopped_fields())  # plain data for the log


@pytest.mark.timeout(120)
async def test_a_started_service_answers_its_very_first_request(settings: Settings, nc: Any) -> None:
    # start() returns once the server has the endpoints: a CLI asking right after `up` must not
    # hear "no service is answering".  nats-py's own flush() let its PING overtake the queued
    # SUBs, which showed as a 503 on about one start in ten on a loaded machine.
    for attempt in range(10):
        svc = Probe(settings, settings.nats_url or "", settings.redis_url or "")
        await svc.start()
        try:
            reply = await micro.request(nc, svc.subjects.endpoint("tracer", "echo"), b"hi", timeout=10,
                                        service="probe", error=_Err)
            assert reply == b"HI", attempt
        except _Err as exc:
            raise AssertionError(f"start {attempt + 1}: {exc}") from None
        finally:
            await svc.stop()


async def test_bus_flush_is_a_barrier_for_queued_subscriptions(settings: Settings, nc: Any) -> None:
    from nats.errors import NoRespondersError

    from buildtel.shared.bus import connect_nats, flush

    server = await connect_nats(settings, settings.nats_url or "", name="barrier", role="operator")
    try:
        for i in range(300):
            subject = f"{settings.namespace}.barrier.{i}"

            async def answer(msg: Any) -> None:
                await msg.respond(b"ok")

            sub = await server.subscribe(subject, cb=answer)  # queued, not yet on the wire
            await flush(server)
            try:
                assert (await nc.request(subject, b"", timeout=10)).data == b"ok"
            except NoRespondersError:
                raise AssertionError(f"subscription {i}: no responders after flush()") from None
            await sub.unsubscribe()
    finally:
        await server.close()


class BigProbe(Probe):
    def consumers(self) -> list[Consumer]:
        return [Consumer(stream=self.subjects.sessions_stream, subject=self.subjects.sessions_completed,
                         durable="bigprobe", handler=self._on, what="probe", ack_wait_s=30.0)]


@pytest.mark.timeout(60)
async def test_a_message_over_the_limit_reaches_the_handler_whole(settings: Settings, nc: Any) -> None:
    # Published through the object store (shared/bigmsg.py): the handler sees the bytes, not the reference.
    from buildtel.shared import bigmsg

    svc = BigProbe(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    try:
        big = bytes(range(256)) * (12 * 4096)  # 12 MiB
        ack = await bigmsg.publish_session(nc.jetstream(), nc, svc.subjects, big, msg_id="big-1")
        raw = await nc.jetstream().get_msg(svc.subjects.sessions_stream, ack.seq)
        assert not raw.data and raw.headers[bigmsg.SIZE_HEADER] == str(len(big))
        await nc.jetstream().publish(svc.subjects.sessions_completed, b"small")
        for _ in range(400):
            if len(svc.seen) == 2:
                break
            await asyncio.sleep(0.05)
        assert svc.seen == [big, b"small"] and svc.dead_letters == 0
    finally:
        await svc.stop()
