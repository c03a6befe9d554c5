"""The SDK for synchronous code: :class:`SyncTelemetryClient` runs the asynchronous
:class:`buildtel.shared.client_async.TelemetryClient` on a private event loop in a daemon
thread.  The event buffer and emit methods both share are :class:`buildtel.shared.emitter.Emitter`.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

from buildtel.shared.client_async import TelemetryClient, UrlSource
from buildtel.shared.emitter import ClientStats
from buildtel.shared.settings import Settings

T = TypeVar("T")

__all__ = ["ClientStats", "SyncTelemetryClient"]


class SyncTelemetryClient:
    """The client for synchronous code: the async client on a private loop in a daemon thread.

    Emit methods are the async client's own (bound once here, so a call costs the same);
    they only take a lock, so any thread may call them.  ``close()`` blocks at most
    ``timeout`` (plus thread teardown); an ``atexit`` hook closes a forgotten client.
    """

    def __init__(self, settings: Settings, *, nats_url: UrlSource = None, session_id: str | None = None,
                 agent_id: str | None = None, name: str = "") -> None:
        self._client: TelemetryClient = TelemetryClient(settings, nats_url=nats_url, session_id=session_id,
                                                        agent_id=agent_id, name=name)
        c = self._client
        self.build_started, self.target_started, self.target_finished = (
            c.build_started, c.target_started, c.target_finished)
        self.health, self.build_finished, self.test_results = c.health, c.build_finished, c.test_results
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed: ClientStats | None = None

    session_id = property(lambda self: self._client.session_id)
    agent_id = property(lambda self: self._client.agent_id)
    events_emitted = property(lambda self: self._client.events_emitted)
    dropped = property(lambda self: self._client.dropped)
    connected = property(lambda self: self._client.connected)
    reached_bus = property(lambda self: self._client.reached_bus)
    stats = property(lambda self: self._client.stats)
    last_error = property(lambda self: self._client.last_error)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Self:
        if not self._client._on or self._thread is not None or self._closed is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name="buildtel-telemetry", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        asyncio.run_coroutine_threadsafe(self._client.start(), loop).result()
        atexit.register(self._atexit)
        if hasattr(os, "register_at_fork"):
            ref: weakref.ReferenceType[SyncTelemetryClient] = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _forked_child(ref))
        return self

    def _forked(self) -> None:
        # A forked child has no loop thread: it must neither buffer forever nor wait in close().
        self._client._stop_accepting()
        self._closed = ClientStats()
        atexit.unregister(self._atexit)

    def with_jetstream(self, fn: Callable[[Any], Awaitable[T]], timeout: float) -> T:
        """``fn(js)`` run on the client's loop (see ``TelemetryClient.with_jetstream``)."""
        loop = self._loop
        if loop is None or self._closed is not None:
            raise ConnectionError("telemetry client not running")
        return asyncio.run_coroutine_threadsafe(self._client.with_jetstream(fn, timeout), loop).result(timeout + 1.0)

    def close(self, timeout: float = 2.0, *, warn: bool = True) -> ClientStats:
        if self._closed is not None:
            return self._closed
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:  # never started (or disabled): nothing was sent
            self._closed = self._client.abandon(warn=warn)
            return self._closed
        atexit.unregister(self._atexit)
        fut = asyncio.run_coroutine_threadsafe(self._client.close(timeout, warn=warn), loop)
        try:
            stats = fut.result(timeout + 1.0)
        except Exception:  # noqa: BLE001 - close must not raise either
            stats = self._client.stats
        loop.call_soon_threadsafe(loop.stop)
        thread.join(1.0)
        self._closed = stats
        return stats

    def _atexit(self) -> None:
        self.close(timeout=2.0)


def _forked_child(ref: weakref.ReferenceType[SyncTelemetryClient]) -> None:
    """After os.fork(), in the child: a client still alive stops accepting (it has no loop thread)."""
    client = ref()
    if client is not None:
        client._forked()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

