"""The live stream of ``GET /api/v1/stream`` (server-sent events) and the per-tenant feed behind it.

**One feed per tenant** (:class:`Feed`), however many clients: two ordered JetStream consumers,
on the tenant's sessions stream (``<ns>.sessions.>``: the collector's ``SessionStarted`` and the
completed sessions) and on its alerts stream.  Each message becomes one :class:`LiveEvent`
(``session.started`` with the SessionStarted, ``session.finished`` with the session's summary,
``alert`` with the Alert), fed to the tenant's build figures (``figures.py``) and offered to
every client of the tenant.  A feed starts where the streams end when it is made, and follows a
stream created later (an analyzer started after the web service) from its first message.

**Positions.**  An event's SSE ``id`` is ``<sessions seq>-<alerts seq>``: the last stream
sequence the client has been given of each stream.  A client that reconnects with that id
(``Last-Event-ID``, or ``?last_event_id=``) is first replayed, from the streams, what came after
it up to where the streams end at its connection (a temporary ordered consumer per stream), then
given the feed's events past its position: nothing is missed, nothing repeated, across web
restarts too (sequences belong to the streams, not to this process).  Without an id the client
starts at "now".  The first thing sent is ``retry:`` and an ``id:`` line without data, which sets
the browser's last id to that start, so a client that saw no event yet still resumes exactly.

**Bounds.**  Each client has a queue of ``QUEUE_EVENTS``; one that falls that far behind is sent
a final comment saying so and disconnected (logged, counted); it reconnects with its last id and
loses nothing that is still in the streams.  At most ``max_per_tenant`` streams per tenant (429)
and ``max_streams`` per service (503), and ``MAX_FEEDS`` tenants.  A comment line every
``keepalive_s`` keeps proxies from closing an idle stream.  :meth:`Hub.stop` ends every stream
with a comment and stops the feeds; it is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from buildtel.services.analyzer.alerts import alert_decoder
from buildtel.services.storage.queries import summary_of
from buildtel.services.storage.summary import summarize, view_decoder
from buildtel.services.web.figures import TenantFigures
from buildtel.shared import bigmsg
from buildtel.shared.protocol import SessionStarted
from buildtel.shared.subjects import Subjects

SESSIONS, ALERTS = 0, 1  # index of a stream in a position
QUEUE_EVENTS = 1000
MAX_FEEDS = 64
RETRY_MS = 3000
_json = msgspec.json.Encoder()
_started = msgspec.msgpack.Decoder(SessionStarted)


class LiveEvent(NamedTuple):
    stream: int  # SESSIONS or ALERTS
    seq: int  # its stream sequence
    kind: str  # session.started, session.finished, alert
    data: bytes  # JSON
    obj: Any  # what data encodes (SessionStarted, SessionSummary or Alert), for the figures


class TooMany(Exception):
    """Over a limit of concurrent streams; ``per_tenant`` says which (429 or 503)."""

    def __init__(self, message: str, per_tenant: bool) -> None:
        super().__init__(message)
        self.per_tenant = per_tenant


def parse_position(text: str) -> tuple[int, int] | None:
    """``"<sessions seq>-<alerts seq>"`` -> the pair, None when it is not one."""
    a, sep, b = text.strip().partition("-")
    if not sep or not a.isdigit() or not b.isdigit() or len(a) > 19 or len(b) > 19:
        return None
    return int(a), int(b)


def position_id(pos: list[int]) -> str:
    return f"{pos[SESSIONS]}-{pos[ALERTS]}"


class Client:
    """One SSE connection's queue; ``reason`` says why it must end (overflow, shutdown)."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[LiveEvent] = asyncio.Queue(size)
        self.wake = asyncio.Event()
        self.reason: str | None = None

    def offer(self, ev: LiveEvent) -> None:
        if self.reason is not None:
            return
        try:
            self.queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.end(f"disconnected: client too slow ({self.queue.maxsize} events queued); reconnect with "
                     "Last-Event-ID to resume")
        self.wake.set()

    def end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.wake.set()


class Stream(NamedTuple):
    """One admitted client: its feed and queue, its position, where the streams ended at its start."""

    feed: Feed
    client: Client
    pos: list[int]
    last: list[int]


class Feed:
    """One tenant's live events: two ordered consumers, its figures, its clients."""

    def __init__(self, hub: Hub, tenant: str) -> None:
        self.hub, self.tenant, self.subjects = hub, tenant, Subjects(tenant)
        self.clients: set[Client] = set()
        self.figures = TenantFigures()
        self.tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()  # both followers know where they start
        self._known = [False, False]
        self.seen = [0, 0]  # the last sequence the feed handed out, per stream

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._follow(i), name=f"web.feed.{self.tenant}.{i}")
                      for i in (SESSIONS, ALERTS)]

    def where(self, i: int) -> tuple[str, str]:
        s = self.subjects
        return (s.sessions_stream, s.sessions_all) if i == SESSIONS else (s.alerts_stream, s.alerts_all)

    async def last_seq(self, i: int) -> int:
        """The last sequence of stream ``i`` now; 0 when it does not exist (yet)."""
        try:
            return int((await self.hub.js.stream_info(self.where(i)[0])).state.last_seq)
        except NotFoundError:  # no such stream: nothing was ever published on it
            return 0

    async def _follow(self, i: int) -> None:
        """Follow stream ``i`` from where it ends now, for as long as the hub runs (re-subscribing
        after the position reached when a subscription fails)."""
        js, (stream, subject) = self.hub.js, self.where(i)
        pos, pause = -1, 0.5
        while not self.hub.stopping.is_set():
            try:
                if pos < 0:
                    pos = await self.last_seq(i)
                    self._mark(i)
                sub = await js.subscribe(subject, stream=stream, ordered_consumer=True,
                                         deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                         config=ConsumerConfig(opt_start_seq=pos + 1))
            except NotFoundError:  # no such stream yet (no analyzer started): look again each second
                await self.hub.idle(1.0)
                continue
            except Exception:  # noqa: BLE001 - NATS away or not permitted: try again, less and less often
                pause = min(30.0, pause * 2)  # (a refused subscription is logged by the connection each time)
                await self.hub.idle(pause)
                continue
            pause = 0.5
            try:
                while not self.hub.stopping.is_set():
                    try:
                        msg = await sub.next_msg(timeout=1.0)
                    except TimeoutError:
                        continue
                    pos = msg.metadata.sequence.stream
                    ev = await self.hub.decode(self.subjects, i, msg)
                    if ev is not None:
                        self._count(ev)
                        for c in list(self.clients):
                            c.offer(ev)
                    self.seen[i] = pos
            except Exception as exc:  # noqa: BLE001 - connection closed or the like: subscribe again
                if not self.hub.stopping.is_set():
                    self.hub.log.warning("web.feed_failed", tenant=self.tenant, stream=stream,
                                         error=f"{type(exc).__name__}: {exc}")
                    await self.hub.idle(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    def _mark(self, i: int) -> None:
        self._known[i] = True
        if all(self._known):
            self.ready.set()

    def _count(self, ev: LiveEvent) -> None:
        f, o = self.figures, ev.obj
        if ev.kind == "session.finished":
            f.finished(o.outcome, o.duration_s, o.cache_hits, o.cache_misses)
        elif ev.kind == "alert":
            f.alert(o.kind, o.direction)
        else:
            f.started += 1


class Hub:
    """Every feed and client of one web service."""

    def __init__(self, js: Any, log: Any, *, max_streams: int = 256, max_per_tenant: int = 16,
                 keepalive_s: float = 15.0, queue_events: int = QUEUE_EVENTS, write_timeout_s: float = 30.0) -> None:
        self.js, self.log = js, log
        self.max_streams, self.max_per_tenant = max_streams, max_per_tenant
        self.keepalive_s, self.queue_events, self.write_timeout_s = keepalive_s, queue_events, write_timeout_s
        self.feeds: dict[str, Feed] = {}
        self.stopping = asyncio.Event()
        self.handlers: set[asyncio.Task[Any]] = set()
        # Counters for /metrics (the service's counters()).
        self.clients_dropped: dict[str, int] = {"slow": 0, "shutdown": 0}
        self.events_sent = 0
        self.undecodable = 0

    @property
    def clients(self) -> int:
        return sum(len(f.clients) for f in self.feeds.values())

    async def idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    def feed(self, tenant: str) -> Feed:
        """The tenant's feed, started on first use; :class:`TooMany` beyond MAX_FEEDS tenants."""
        feed = self.feeds.get(tenant)
        if feed is None:
            if len(self.feeds) >= MAX_FEEDS:
                self.log.error("web.feed_refused", tenant=tenant, feeds=len(self.feeds))
                raise TooMany(f"this web service already follows {MAX_FEEDS} tenants", per_tenant=False)
            feed = self.feeds[tenant] = Feed(self, tenant)
            feed.start()
        return feed

    async def decode(self, subjects: Subjects, i: int, msg: Any) -> LiveEvent | None:
        """The event of a stream message; None (logged, counted) for one that cannot be read."""
        seq = msg.metadata.sequence.stream
        try:
            if i == ALERTS:
                alert = alert_decoder.decode(msg.data)
                return LiveEvent(i, seq, "alert", _json.encode(alert), alert)
            if msg.subject == subjects.sessions_started:
                started = _started.decode(msg.data)
                return LiveEvent(i, seq, "session.started", _json.encode(started), started)
            data = msg.data
            ref = bigmsg.reference(msg.headers)
            if ref is not None:
                data = await bigmsg.resolve(self.js, ref, expected_bucket=subjects.sessions_bucket)
            summary = summary_of(summarize(view_decoder.decode(data), time.time(), None, 0, len(data)))
            return LiveEvent(i, seq, "session.finished", _json.encode(summary), summary)
        except Exception as exc:  # noqa: BLE001 - bad input must not stop the feed
            self.undecodable += 1
            self.log.error("web.feed_undecodable", subject=msg.subject, seq=seq, error=f"{type(exc).__name__}: {exc}")
            return None

    async def open(self, tenant: str, start: tuple[int, int] | None) -> Stream:
        """Admit a client of ``tenant`` resuming after ``start`` (None: from now): :class:`TooMany`
        over a limit; NATS errors as they come (before any byte of the answer is sent)."""
        if self.stopping.is_set():
            raise TooMany("the web service is stopping", per_tenant=False)
        feed = self.feed(tenant)
        if self.clients >= self.max_streams:
            raise TooMany(f"this web service already serves {self.max_streams} streams", per_tenant=False)
        if len(feed.clients) >= self.max_per_tenant:
            raise TooMany(f"tenant {tenant} already has {self.max_per_tenant} open streams", per_tenant=True)
        client = Client(self.queue_events)
        feed.clients.add(client)  # first: whatever the feed sees from now on is queued
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(feed.ready.wait(), 10.0)
            last = [await feed.last_seq(SESSIONS), await feed.last_seq(ALERTS)]
        except BaseException:
            feed.clients.discard(client)
            raise
        # Past the end (a stream recreated): resume at its end rather than wait for old numbers.
        pos = list(last) if start is None else [min(start[0], last[0]), min(start[1], last[1])]
        return Stream(feed, client, pos, last)

    async def serve(self, st: Stream, write: Callable[[bytes], Awaitable[None]], closed: Callable[[], bool],
                    abort: Callable[[], None]) -> None:
        """Send ``st``'s events through ``write`` until the client goes (``closed()`` or a failed
        write), falls behind (a write blocked ``write_timeout_s``: ``abort()``), or the hub stops."""
        task = asyncio.current_task()
        if task is not None:
            self.handlers.add(task)

        async def send(data: bytes) -> None:
            try:
                await asyncio.wait_for(write(data), self.write_timeout_s)
            except TimeoutError:
                st.client.end(f"disconnected: client too slow (a write blocked {self.write_timeout_s:g} s)")
                abort()  # it does not read: the comment could not reach it anyway
                raise ConnectionResetError("client too slow") from None

        try:
            await send(f"retry: {RETRY_MS}\nid: {position_id(st.pos)}\n\n".encode())
            for i in (SESSIONS, ALERTS):
                if st.pos[i] < st.last[i]:
                    await self._replay(st.feed, i, st.pos, st.last[i], send)
            await self._live(st.client, st.pos, send, closed)
        except ConnectionError:
            pass  # the client went away (or was cut off above)
        except Exception as exc:  # noqa: BLE001 - NATS failed mid-replay: say so; the client resumes
            st.client.end(f"the stream failed ({type(exc).__name__}); reconnect with Last-Event-ID to resume")
            self.log.error("web.stream_failed", tenant=st.feed.tenant, error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                await send(f": {st.client.reason}\n\n".encode())
        finally:
            st.feed.clients.discard(st.client)
            if task is not None:
                self.handlers.discard(task)
            if st.client.reason is not None:
                why = "shutdown" if self.stopping.is_set() else "slow"
                self.clients_dropped[why] += 1
                self.log.warning("web.stream_ended", tenant=st.feed.tenant, reason=st.client.reason,
                                 at=position_id(st.pos))

    async def _replay(self, feed: Feed, i: int, pos: list[int], end: int,
                      write: Callable[[bytes], Awaitable[None]]) -> None:
        """What stream ``i`` holds after ``pos[i]`` up to ``end``, straight from the stream."""
        stream, subject = feed.where(i)
        sub = await self.js.subscribe(subject, stream=stream, ordered_consumer=True,
                                      deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                      config=ConsumerConfig(opt_start_seq=pos[i] + 1))
        try:
            while pos[i] < end and not self.stopping.is_set():
                msg = await sub.next_msg(timeout=10.0)
                ev = await self.decode(feed.subjects, i, msg)
                pos[i] = msg.metadata.sequence.stream
                if ev is not None:
                    await self._send(ev, pos, write)
                if not msg.metadata.num_pending:
                    break  # the stream holds nothing more (``end`` itself was removed): live goes on from here
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _live(self, client: Client, pos: list[int], write: Callable[[bytes], Awaitable[None]],
                    closed: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while True:
            while not client.queue.empty():
                ev = client.queue.get_nowait()
                if ev.seq > pos[ev.stream]:  # not already replayed, not from before the start
                    pos[ev.stream] = ev.seq
                    await self._send(ev, pos, write)
                    quiet_since = loop.time()
            if client.reason is not None:
                await write(f": {client.reason}\n\n".encode())
                return
            if closed():
                return
            if loop.time() - quiet_since >= self.keepalive_s:
                await write(b": keep-alive\n\n")
                quiet_since = loop.time()
            client.wake.clear()
            if client.queue.empty() and client.reason is None:
                with contextlib.suppress(TimeoutError):  # wake at least each second to notice a gone client
                    await asyncio.wait_for(client.wake.wait(), min(1.0, self.keepalive_s))

    async def _send(self, ev: LiveEvent, pos: list[int], write: Callable[[bytes], Awaitable[None]]) -> None:
        await write(b"event: " + ev.kind.encode() + b"\nid: " + position_id(pos).encode() + b"\ndata: " + ev.data
                    + b"\n\n")
        self.events_sent += 1

    async def stop(self) -> None:
        """End every stream (each gets a last comment), then stop the feeds.  Idempotent."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        for feed in self.feeds.values():
            for c in list(feed.clients):
                c.end("the web service is stopping; reconnect with Last-Event-ID to resume")
        if self.handlers:
            await asyncio.wait(list(self.handlers), timeout=5.0)
        tasks = [t for f in self.feeds.values() for t in f.tasks]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
