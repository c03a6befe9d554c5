"""The asynchronous SDK client: emit build events without ever slowing or breaking the build.

Emit methods (``target_finished`` …) are plain functions: they validate cheaply,
stamp ``seq``/``ts``, append to an in-memory buffer under a lock and return.  A
background task cuts the buffer into :class:`EventBatch` messages (by size and by
time), encodes each once, and publishes it to JetStream with
``Nats-Msg-Id = "<session>:<agent>:<first seq>"``.  Several batches are in flight
at once; a failed publish is retried with the same bytes and Msg-Id so the
stream's duplicate window (and the collector's agent+seq check) absorb retries.

While the bus is away the client reconnects in the background with backoff and
keeps up to ``settings.buffer_limit`` un-acknowledged events; beyond that *new*
events are dropped and counted.  ``close(timeout)`` is bounded.  See
``docs/sdk.md``.  Argument sanitising, the thread-safe buffer and the emit
methods live in ``shared/emitter.py`` (class ``Emitter``); the synchronous wrapper is
``shared/client_sync.py``.  Applications import both from :mod:`buildtel.shared.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

# nats (with aiohttp) costs ~150 ms to import: pay it when the client module is imported,
# not in the background thread while the build emits its first events.
from nats.aio.client import Client
from nats.errors import MaxPayloadError, NoRespondersError

from buildtel.shared.bus import ensure_streams, nats_options
from buildtel.shared.codec import encode
from buildtel.shared.emitter import ClientStats, Emitter
from buildtel.shared.protocol import EventBatch, TargetStarted
from buildtel.shared.sanitize import fix_event, shrink
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

T = TypeVar("T")

__all__ = ["ClientStats", "TelemetryClient", "UrlSource"]

WINDOW = 8  # batches published concurrently: hides the ack round-trip without flooding
PUBLISH_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 2.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
# Well under NATS' default 1 MiB max_payload, so a batch is never refused for size.
MAX_BATCH_BYTES = 512 * 1024

# A URL, or a callable returning one (or a (URL, StackAuth) pair: a local stack's credentials).
UrlSource = str | Callable[[], Any] | None


class _Batch:
    __slots__ = ("count", "data", "msg_id")

    def __init__(self, count: int, data: bytes, msg_id: str) -> None:
        self.count, self.data, self.msg_id = count, data, msg_id


class TelemetryClient(Emitter):
    """Asynchronous agent-side client.  Emit methods (from :class:`Emitter`) are plain
    functions, safe from any thread; ``start``/``close`` run on the caller's event loop."""

    def __init__(self, settings: Settings, *, nats_url: UrlSource = None, session_id: str | None = None,
                 agent_id: str | None = None, name: str = "") -> None:
        super().__init__(settings, session_id=session_id, agent_id=agent_id, name=name)
        self._url = nats_url if nats_url is not None else settings.nats_url
        subjects = Subjects(settings.namespace)
        self._subject = subjects.events(self._sid)
        self._health_subject = subjects.health(self._sid)
        self._live_q: deque[Any] = deque(maxlen=16)  # latest health checkpoints for live watchers
        self._close_deadline: float | None = None
        self._outbox: deque[_Batch] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_tid = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._nc: Any = None
        self._js: Any = None
        self._ever_connected = False
        self._connect_failures = 0
        self._gave_up = False
        self._declare = True  # decided once the credentials are known (_supervise)
        self.last_error: str | None = None
        # Loop-bound lazily (Python >= 3.10), so creating them outside the loop is fine.
        self._wake, self._up, self._has_work = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._slots = asyncio.Semaphore(WINDOW)

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    @property
    def reached_bus(self) -> bool:
        """True once a connection to the bus has succeeded."""
        return self._ever_connected

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> Self:
        """Start the background tasks and return at once; connecting happens in the background."""
        if not self._on or self._loop is not None or not self._open:
            return self
        self._loop = asyncio.get_running_loop()
        self._loop_tid = threading.get_ident()
        self._tasks = [self._loop.create_task(c) for c in (self._supervise(), self._flusher(), self._sender())]
        self._started = True
        if len(self._pending) >= self._bs:  # emitted before start
            self._wake.set()
        return self

    async def with_jetstream(self, fn: Callable[[Any], Awaitable[T]], timeout: float) -> T:
        """``await fn(js)`` on this client's connection, waiting at most ``timeout`` for it (and for
        ``fn``); raises when the bus is not reached (``buildtel run`` stores the build's log so)."""
        await asyncio.wait_for(self._up.wait(), timeout)
        js = self._js
        if js is None:
            raise ConnectionError("not connected to the bus")
        return await asyncio.wait_for(fn(js), timeout)

    async def close(self, timeout: float = 2.0, *, warn: bool = True) -> ClientStats:
        """Flush and disconnect within ``timeout`` seconds; unsent events count as dropped.

        When the bus has never been reached and a connection attempt already failed,
        there is nothing to wait for: ``close`` returns at once.
        """
        if not self._on:
            return ClientStats()
        if not self._stop_accepting():
            return self.stats
        if self._loop is not None:
            await self._drain(timeout)
        return self._finish(warn)

    def abandon(self, *, warn: bool = True) -> ClientStats:
        """Close a client that was never started (no loop needed): everything buffered is dropped."""
        was_open = self._stop_accepting()
        return self._finish(warn) if was_open and self._on and self._loop is None else self.stats

    async def _drain(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = self._close_deadline = loop.time() + max(timeout, 0.0)
        self._cut(full_only=False)
        self._has_work.set()
        while self._buffered > 0 and loop.time() < deadline:
            if self._gave_up or (not self._ever_connected and self._connect_failures > 0):
                break
            await asyncio.sleep(min(0.005, max(deadline - loop.time(), 0)))
        tasks = self._tasks + list(self._inflight)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # the supervisor closes the connection

    def _finish(self, warn: bool) -> ClientStats:
        with self._lock:
            self._buffered_max = max(self._buffered_max, self._buffered)
            self._dropped += self._buffered
            self._acked = self._seq
            self._pending, self._outbox = [], deque()
        stats = self.stats
        if stats.dropped and warn:
            _log().warning("telemetry.dropped", session_id=self._sid, dropped=stats.dropped, sent=stats.sent,
                           buffered_max=stats.buffered_max, retries=stats.retries, last_error=self.last_error)
        return stats

    # -- batching ------------------------------------------------------------------------------
    def _live(self, ev: Any) -> None:
        self._live_q.append(ev)
        if self._started:
            self._kick()

    def _kick(self) -> None:
        """Wake the flusher; from a foreign thread through the loop's thread-safe queue."""
        try:
            if threading.get_ident() == self._loop_tid:
                self._wake.set()
            else:
                self._loop.call_soon_threadsafe(self._wake.set)  # type: ignore[union-attr]
        except RuntimeError:  # loop closed: close() accounts for the events
            pass

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._settings.flush_interval_s
        next_tick = loop.time() + interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(next_tick - loop.time(), 0)):
                    await self._wake.wait()
            self._wake.clear()
            now = loop.time()
            try:
                if now >= next_tick:  # by time: everything, so no event waits longer than the interval
                    self._cut(full_only=False)
                    next_tick = now + interval
                else:  # by size: whole batches only
                    self._cut(full_only=True)
            except Exception as exc:  # noqa: BLE001 - keep flushing whatever happens
                self.last_error = f"flush: {exc!r}"
            while self._live_q:  # core NATS, at most once: a checkpoint is superseded soon anyway
                ev = self._live_q.popleft()
                if self._up.is_set() and self._nc is not None:
                    with contextlib.suppress(Exception):
                        await self._nc.publish(self._health_subject, encode(ev))

    def _cut(self, *, full_only: bool) -> None:
        bs = self._bs
        with self._lock:
            p = self._pending
            n = len(p) - len(p) % bs if full_only else len(p)
            if n == 0:
                return
            if n == len(p):
                self._pending, taken = [], p
            else:
                taken = p[:n]
                del p[:n]
        for i in range(0, n, bs):
            self._enqueue(taken[i:i + bs])
        self._has_work.set()

    def _enqueue(self, events: list[Any]) -> None:
        data = self._encode(events)
        if data is None or len(data) > MAX_BATCH_BYTES:
            if len(events) > 1:  # split before it is ever published, so Msg-Ids stay stable
                half = len(events) // 2
                self._enqueue(events[:half])
                self._enqueue(events[half:])
                return
            # One event that will not encode (lone surrogate, huge int) or is too large:
            # sanitise it, then drop its collections, and as a last resort send a stub, so
            # the agent's seq stays contiguous whatever the caller passed.
            ev = events[0]
            data = self._encode([fix_event(ev)])
            if data is None or len(data) > MAX_BATCH_BYTES:
                data = self._encode([shrink(ev)])
            if data is None or len(data) > MAX_BATCH_BYTES:
                data = self._encode([TargetStarted(session_id=self._sid, agent_id=self._aid, seq=ev.seq,
                                                   ts=time.time(), target="[buildtel: unencodable event]")])
        self._outbox.append(_Batch(len(events), data, f"{self._sid}:{self._aid}:{events[0].seq}"))  # type: ignore[arg-type]

    def _encode(self, events: list[Any]) -> bytes | None:
        try:
            return encode(EventBatch(session_id=self._sid, agent_id=self._aid, events=events))
        except Exception:  # noqa: BLE001 - handled by the caller
            return None

    # -- publishing ----------------------------------------------------------------------------
    async def _sender(self) -> None:
        while True:
            if not self._outbox:
                self._has_work.clear()
                await self._has_work.wait()
                continue
            await self._slots.acquire()
            task = asyncio.get_running_loop().create_task(self._publish(self._outbox.popleft()))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _publish(self, b: _Batch) -> None:
        delay = BACKOFF_MIN_S
        try:
            while True:
                await self._up.wait()
                js = self._js
                try:
                    await js.publish(self._subject, b.data, timeout=PUBLISH_TIMEOUT_S,
                                     headers={"Nats-Msg-Id": b.msg_id})
                except MaxPayloadError as exc:  # refused locally, before sending: cannot succeed
                    self.last_error = repr(exc)
                    with self._lock:
                        self._acked += b.count
                        self._dropped += b.count
                        self._update_room()
                    return
                except Exception as exc:  # noqa: BLE001 - timeouts, lost connection, no stream yet
                    self.last_error = repr(exc)
                    self._retries += 1
                    if isinstance(exc, NoRespondersError) and self._declare:  # stream missing: declare again
                        await self._ensure_streams(js)
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                with self._lock:
                    self._buffered_max = max(self._buffered_max, self._buffered)
                    self._acked += b.count
                    self._sent += b.count
                    self._update_room()
                return
        finally:
            self._slots.release()

    # -- connection ----------------------------------------------------------------------------
    async def _resolve_url(self) -> str | tuple[str, Any]:
        src = self._url
        if isinstance(src, str):
            return src
        fn = src if callable(src) else _default_url(self._settings)
        # A daemon thread, not the loop's executor: resolving may block (auto-starting a
        # stack) and asyncio.run() would otherwise wait for it on exit.
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str | tuple[str, Any]] = loop.create_future()

        def work() -> None:
            try:
                res, err = fn(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the loop
                res, err = None, exc
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, fut, res, err)

        threading.Thread(target=work, daemon=True, name="buildtel-resolve").start()
        return await fut

    async def _supervise(self) -> None:
        try:
            resolved = await self._resolve_url()
        except Exception as exc:  # noqa: BLE001 - no stack: run without telemetry
            self.last_error, self._gave_up = f"{type(exc).__name__}: {exc}", True
            return
        # A resolver may hand back the local stack's credentials with its URL.
        url, auth = (resolved, None) if isinstance(resolved, str) else resolved
        settings = self._settings if auth is None else self._settings.with_(stack_auth=auth)
        delay = BACKOFF_MIN_S
        opts = nats_options(settings, name=f"buildtel-sdk {self._name or self._aid}".strip(), role="agent")
        # Agents with credentials rely on the services to declare the streams (their role may
        # not); only a client of an open server declares them itself.
        self._declare = not ("user" in opts or "token" in opts or "user_credentials" in opts)
        while True:
            nc, lost = Client(), asyncio.Event()  # one event per connection: a late callback of
            # an old connection cannot tear down the new one

            async def on_lost(*_: object, ev: asyncio.Event = lost) -> None:
                ev.set()

            async def on_error(exc: Exception) -> None:
                self.last_error = repr(exc)

            try:
                # No client-side reconnect: a lost connection is replaced by a new one here, so
                # one backoff policy covers both "never reached" and "lost mid-build".
                # (max_reconnect_attempts=1 and no wait: nats-py's own server loop gives up
                # after one quick retry instead of sleeping between 60 attempts.)
                await nc.connect(servers=[u.strip() for u in url.split(",")], allow_reconnect=False,
                                 max_reconnect_attempts=1, reconnect_time_wait=0,
                                 connect_timeout=CONNECT_TIMEOUT_S,  # type: ignore[arg-type]  # nats-py says int; a wait_for timeout
                                 error_cb=on_error,
                                 disconnected_cb=on_lost, closed_cb=on_lost, **opts)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await nc.close()
                if not isinstance(exc, Exception):
                    raise
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._connect_failures += 1
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            try:
                delay = BACKOFF_MIN_S
                js = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
                if self._declare:
                    await self._ensure_streams(js)
                self._nc, self._js, self._ever_connected = nc, js, True
                self._up.set()
                await lost.wait()
            finally:
                self._up.clear()
                self._nc = self._js = None
                loop = asyncio.get_running_loop()
                budget = 1.0 if self._close_deadline is None else self._close_deadline - loop.time()
                with contextlib.suppress(Exception):  # bounded: a hung server must not hold close()
                    await asyncio.wait_for(nc.close(), max(budget, 0.05))

    async def _ensure_streams(self, js: Any) -> None:
        # Idempotent; lets a client started before the services keep its events.  A client
        # without permission to declare streams relies on the services having done it.
        try:
            await ensure_streams(js, Subjects(self._settings.namespace), replicas=self._settings.replicas)
        except Exception as exc:  # noqa: BLE001 - any failure is kept in last_error; the client must start anyway
            self.last_error = f"ensure_streams: {exc!r}"


def _settle(fut: asyncio.Future[Any], res: Any, err: BaseException | None) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(res)


def _default_url(settings: Settings) -> Callable[[], str | tuple[str, Any]]:
    """settings.nats_url, else the local stack ``buildtel up`` wrote (with its agent
    credentials), else NATS' default port."""

    def resolve() -> str | tuple[str, Any]:
        with contextlib.suppress(Exception):
            from buildtel.shared.stackfile import read_stack, stack_auth_of

            info = read_stack(settings)
            if info:
                return str(info["nats_url"]), stack_auth_of(settings)
        return "nats://127.0.0.1:4222"

    return resolve


def _log() -> Any:
    import structlog

    from buildtel.shared import logs

    if not structlog.is_configured():  # an embedding application's own configuration wins
        logs.configure()
    return logs.get_logger("telemetry.client")
