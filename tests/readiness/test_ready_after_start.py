"""A query service answers the first request sent the moment its start() returns.

On a loaded machine the endpoints' SUB commands could still be on their way to
the NATS server when start() returned, and the first request got "no ... is
answering" (503).  Here the service talks to NATS through a TCP relay that
holds every client-to-server chunk back for a while, which makes that window
wide on any machine; the request goes straight to the server.  start() is
ready only once the server has acknowledged the subscriptions (a flush), so
the request is answered however long the relay holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from yarl import URL

from buildtel.services.analyzer.api import AnalyzerError
from buildtel.services.analyzer.service import AnalyzerService
from buildtel.services.analyzer.subjects import AnalyzerSubjects
from buildtel.services.storage.api import StorageError, endpoint_subject
from buildtel.services.storage.service import StorageService
from buildtel.services.tracer.query import QueryError
from buildtel.services.tracer.service import TracerService
from buildtel.services.tracer.subjects import TracerSubjects
from buildtel.shared import micro
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

HOLD_S = 0.25  # how long the relay holds each chunk the service sends to NATS


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: float) -> None:
    # Chunks keep their order: each waits until its own due time, in arrival order.
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump() -> None:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not chunk:
                writer.close()
                return
            writer.write(chunk)
            await writer.drain()

    task = asyncio.create_task(pump())
    try:
        while True:
            chunk = await reader.read(65536)
            queue.put_nowait((time.monotonic() + hold, chunk))
            if not chunk:
                await task
                return
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task


@contextlib.asynccontextmanager
async def holding_relay(target: str, hold: float) -> AsyncIterator[str]:
    """A loopback relay to ``target`` (nats://host:port) delaying client-to-server bytes by ``hold``."""
    url = URL(target)
    pipes: set[asyncio.Task[Any]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        writers.append(client_w)
        server_r, server_w = await asyncio.open_connection(url.host, url.port)
        writers.append(server_w)
        both = [asyncio.create_task(_pipe(client_r, server_w, hold)),
                asyncio.create_task(_pipe(server_r, client_w, 0.0))]
        pipes.update(both)
        await asyncio.gather(*both, return_exceptions=True)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield str(url.with_host("127.0.0.1").with_port(port))
    finally:
        server.close()
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


Starter = Callable[[Settings, str], Awaitable[Any]]


async def _storage(settings: Settings, nats_url: str) -> Any:
    svc = StorageService(settings, nats_url, settings.redis_url or "")
    await svc.start()
    return svc


async def _analyzer(settings: Settings, nats_url: str) -> Any:
    svc = AnalyzerService(settings, nats_url, settings.redis_url or "")
    await svc.start()
    return svc


async def _tracer(settings: Settings, nats_url: str) -> Any:
    svc = TracerService(settings.with_(fsync=False), nats_url, settings.redis_url or "", otlp_port=0)
    await svc.start()
    return svc


CASES = [
    pytest.param(_storage, lambda ns: endpoint_subject(Subjects(ns), "stats"), StorageError, id="storage"),
    pytest.param(_analyzer, lambda ns: AnalyzerSubjects.of(ns).endpoint("stats"), AnalyzerError, id="analyzer"),
    pytest.param(_tracer, lambda ns: TracerSubjects(Subjects(ns)).endpoint("stats"), QueryError, id="tracer"),
]


@pytest.mark.parametrize(("start", "subject", "error"), CASES)
async def test_first_request_after_start_is_answered(start: Starter, subject: Callable[[str], str],
                                                     error: type[Exception], settings: Settings,
                                                     nc: Any, redis_client: Any) -> None:
    async with holding_relay(settings.nats_url or "", HOLD_S) as relayed:
        svc = await start(settings, relayed)
        try:
            # One attempt, no retry: a 503 here is the race this test is about.
            reply = await micro.request(nc, subject(settings.namespace), b"", timeout=30,
                                        service="service", error=error)
        finally:
            await svc.stop()
    assert reply  # a stats reply, not "no service is answering"
