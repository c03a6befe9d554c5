"""StorageService: consume completed sessions from JetStream into the store; answer queries.

Ingest: a durable pull consumer ("storage") on ``<ns>.sessions.completed``
fetches batches; each message is decoded (``buildtel.shared.codec.decode_session``).
Bad input goes to ``<ns>.deadletter.storage`` with the reason and is acked (it
would fail the same way forever); good sessions are appended and fsynced in one
``append_many`` and only *then* acked, so an acknowledged message is on disk.  A
crash between the fsync and the ack means redelivery, which the store's
idempotency by session id turns into a no-op: every published session ends up
stored exactly once.

Queries: a ``nats.micro`` service (see ``services/storage/api.py``).  Retention
runs every ``retention_interval_s`` and as soon as an append takes the store
over ``max_sessions``.
"""

from __future__ import annotations

import asyncio
import re
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, NamedTuple

import msgspec
import nats.errors
import nats.micro
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.micro.request import Request, ServiceError

from buildtel.services.storage.api import (
    API_VERSION,
    ENDPOINTS,
    Cursor,
    RawSessionsReply,
    StatsReply,
    decode_request,
    endpoint_subject,
)
from buildtel.services.storage.index import Filters
from buildtel.services.storage.store import (
    DEFAULT_SEGMENT_BYTES,
    DamageReport,
    Page,
    StorageClosed,
    TelemetryStorage,
)
from buildtel.shared import metrics as metrics_http
from buildtel.shared.bus import (
    MAX_DELIVER,
    connect_nats,
    connect_redis,
    ensure_streams,
    note_failure,
    publish_dead_letter,
    watch_max_deliveries,
)
from buildtel.shared.codec import MAX_MESSAGE_BYTES, DecodeError, decode_session
from buildtel.shared.keys import Keys
from buildtel.shared.logs import get_logger
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

DURABLE = "storage"
# Ids become index keys and log fields; the protocol's are 32 hex digits, this is the lenient bound.
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,256}$")
_REPLY_OVERHEAD = 4096  # bytes of a reply that are not session payload (array header, cursor)

_encoder = msgspec.msgpack.Encoder()
# A write failure is usually the disk (full, read-only), not the session: give it longer than the
# other consumers' MAX_DELIVER before a session is parked on the dead-letter subject (~15 min with
# the growing delay below).  The sessions stream still holds it for 30 days after that.
STORAGE_MAX_DELIVER = max(MAX_DELIVER, 20)
WRITE_RETRY_S = 5.0  # times the delivery count, at most 60 s


class _Facts(NamedTuple):
    id: str
    outcome: str
    targets: int


class StorageService:
    """The storage process: one store, one durable consumer, one micro service."""

    name = "storage"

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *, batch_size: int = 32,
                 fetch_timeout_s: float = 1.0, ack_wait_s: float = 30.0, max_ack_pending: int = 1024,
                 retention_interval_s: float = 30.0, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, max_reply_bytes: int | None = None,
                 metrics_port: int | None = None) -> None:
        self.settings = settings
        self.metrics_port = metrics_port  # /metrics + /healthz (shared/metrics.py); None: none
        self.nats_url = nats_url
        self.redis_url = redis_url
        self.subjects = Subjects(settings.namespace)
        self.keys = Keys(settings.namespace)
        self.batch_size = batch_size
        self.fetch_timeout_s = fetch_timeout_s
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.retention_interval_s = retention_interval_s
        self.max_message_bytes = max_message_bytes
        self.segment_bytes = segment_bytes
        # Replies are paged to fit one NATS message (the server's max_payload), or this if smaller:
        # small pages answer the first screenful sooner and bound the memory a query holds.
        self.max_reply_bytes = max_reply_bytes
        self.log = get_logger("storage", service="storage", namespace=settings.namespace)
        # Counters for /metrics (monotonic since start).
        self.stored = 0
        self.duplicates = 0
        self.dead_letters = 0
        self.write_failures = 0
        self.store: TelemetryStorage | None = None
        self.damage: DamageReport | None = None
        self.nc: Any = None
        self.redis: Any = None
        self._stack: AsyncExitStack | None = None
        self._stopping = False
        self._fetching = False
        self._consumer: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._wake_retention = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._stack is not None:
            return
        self._stopping = False
        stack = AsyncExitStack()
        try:
            await self._start(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        await metrics_http.attach(self, self.settings, port=self.metrics_port)
        store = self.store
        assert store is not None
        self.log.info("storage.started", directory=str(store.directory), sessions=await store.count(),
                      damaged_regions=len(store.last_report.damages), max_sessions=store.max_sessions)

    async def _start(self, stack: AsyncExitStack) -> None:
        s = self.settings
        store = TelemetryStorage(s.telemetry_dir, max_sessions=s.max_sessions, retention_s=s.retention_s,
                                 fsync=s.fsync, segment_bytes=self.segment_bytes)
        self.damage = await store.open()
        stack.push_async_callback(store.close)  # closed last: after every reader and the writer
        self.store = store
        self.nc = await connect_nats(s, self.nats_url, name=f"{s.namespace}-storage", role="storage")
        stack.push_async_callback(self._close_nats)
        self.redis = connect_redis(self.redis_url)
        stack.push_async_callback(self.redis.aclose)
        js = self.nc.jetstream()
        await ensure_streams(js, self.subjects)
        psub = await js.pull_subscribe(
            self.subjects.sessions_completed, durable=DURABLE, stream=self.subjects.sessions_stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s,
                                  max_ack_pending=self.max_ack_pending, deliver_policy=DeliverPolicy.ALL,
                                  max_deliver=STORAGE_MAX_DELIVER),
        )
        stack.push_async_callback(psub.unsubscribe)
        advisories = await watch_max_deliveries(
            self.nc, self.redis, self.subjects, self.keys, service="storage", stream=self.subjects.sessions_stream,
            consumer=DURABLE, counter=self._count_advisory)
        stack.push_async_callback(advisories.unsubscribe)
        micro = await nats.micro.add_service(
            self.nc, name=self.subjects.service_name("storage"), version=API_VERSION,
            description="Builder Telemetry session store", metadata={"namespace": s.namespace})
        stack.push_async_callback(micro.stop)
        for ep in ENDPOINTS:
            await micro.add_endpoint(name=ep, subject=endpoint_subject(self.subjects, ep),
                                     handler=partial(self._handle, ep))
        await self.nc.flush()  # the server knows the endpoints before start() says we are ready
        self._consumer = asyncio.create_task(self._consume(psub), name="storage-consume")
        self._retention = asyncio.create_task(self._retention_loop(), name="storage-retention")
        stack.push_async_callback(self._stop_tasks)  # first to run on stop: no new work

    async def stop(self) -> None:
        """Stop taking messages, finish the batch in flight (append + acks), stop answering,
        drain NATS, close the store.  Idempotent."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        await metrics_http.detach(self)
        await stack.aclose()
        self.log.info("storage.stopped", stored=self.stored, duplicates=self.duplicates,
                      dead_letters=self.dead_letters)

    async def _stop_tasks(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._retention, self._consumer) if t is not None]
        if self._retention is not None:
            self._retention.cancel()
        if self._consumer is not None:
            if self._fetching:
                self._consumer.cancel()  # idle in a fetch: nothing in flight to lose
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(self._consumer), 10.0)
                except Exception:  # noqa: BLE001 - timed out or failed: cancel below either way
                    self._consumer.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_nats(self) -> None:
        try:
            await self.nc.drain()  # flushes acks still buffered
        except Exception:  # noqa: BLE001 - already closed or unreachable: close quietly
            await self.nc.close()

    async def metrics(self) -> dict[str, float]:
        """Counters for /metrics (shared/metrics.py)."""
        lag = await metrics_http.consumer_lag(self.nc.jetstream(), self.subjects.sessions_stream, DURABLE)
        return {"sessions_stored_total": self.stored, "duplicates_total": self.duplicates,
                "dead_letters_total": self.dead_letters, "write_failures_total": self.write_failures,
                "consumer_lag": lag}

    # -- ingest ------------------------------------------------------------------------------
    async def _consume(self, psub: Any) -> None:
        while not self._stopping:
            self._fetching = True
            try:
                msgs = await psub.fetch(self.batch_size, timeout=self.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                return
            except Exception as exc:  # noqa: BLE001 - NATS away: the client reconnects, keep polling
                self.log.warning("storage.fetch_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            finally:
                self._fetching = False
            await self.process(msgs)
            del msgs  # do not hold a batch of payloads across the next (possibly long) fetch

    async def process(self, msgs: list[Msg]) -> None:
        """Dead-letter the bad messages, append the good ones (one fsync), then ack."""
        good: list[tuple[Msg, _Facts]] = []
        bad: list[tuple[Msg, str]] = []
        for msg in msgs:
            checked = self._check(msg.data)
            if isinstance(checked, str):
                bad.append((msg, checked))
            else:
                good.append((msg, checked))
        if bad:
            await self._dead_letter(bad)
        if not good:
            return
        store = self.store
        assert store is not None
        try:
            # The bytes as published are stored (validated above, not re-encoded): fields a newer
            # collector added survive, and no decoded batch is held while it is written.
            flags = await store.append_encoded([m.data for m, _ in good])
        except Exception as exc:  # noqa: BLE001 - disk full, I/O error: retry later, never ack
            self.write_failures += 1
            self.log.error("storage.write_failed", error=repr(exc), sessions=len(good))
            for msg, _ in good:
                meta = msg.metadata
                await note_failure(self.redis, self.keys, stream=self.subjects.sessions_stream, consumer=DURABLE,
                                   seq=meta.sequence.stream, reason=f"write failed: {exc!r}")
                await msg.nak(delay=min(60.0, WRITE_RETRY_S * meta.num_delivered))
            await asyncio.sleep(1.0)
            return
        for (msg, facts), new in zip(good, flags):
            await msg.ack()
            if new:
                self.stored += 1
                self.log.info("session.stored", session_id=facts.id, outcome=facts.outcome,
                              targets=facts.targets, bytes=len(msg.data))
            else:
                self.duplicates += 1
                self.log.info("session.duplicate", session_id=facts.id)
        if await store.count() > store.max_sessions:
            self._wake_retention.set()

    def _check(self, data: bytes) -> _Facts | str:
        """What the log needs to know of a valid session, or why the message is not one."""
        if len(data) > self.max_message_bytes:
            return f"message of {len(data)} bytes exceeds the {self.max_message_bytes}-byte limit"
        try:
            session = decode_session(data)
        except DecodeError as exc:
            return f"not a BuildSession: {exc}"
        if not _SESSION_ID.match(session.id):
            return f"invalid session id {session.id[:80]!r}"
        return _Facts(session.id, session.outcome, len(session.targets))

    async def _dead_letter(self, bad: list[tuple[Msg, str]]) -> None:
        for msg, reason in bad:
            await publish_dead_letter(self.nc, self.redis, self.subjects, self.keys, service="storage",
                                      subject=msg.subject, reason=reason, data=msg.data,
                                      headers=dict(msg.headers or {}))
        try:
            await self.nc.flush(timeout=5)  # the dead letters leave before the originals are acked
        except Exception as exc:  # noqa: BLE001 - acking anyway: redelivery would fail identically
            self.log.warning("storage.dead_letter_flush_failed", error=repr(exc))
        for msg, reason in bad:
            await msg.ack()
            self.dead_letters += 1
            self.log.warning("storage.dead_letter", reason=reason, subject=msg.subject, bytes=len(msg.data))

    def _count_advisory(self, reason: str) -> None:
        self.dead_letters += 1
        self.log.warning("storage.dead_letter", reason=reason[:300], code="max_deliver")

    async def _retention_loop(self) -> None:
        assert self.store is not None
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake_retention.wait(), self.retention_interval_s)
            except TimeoutError:
                pass
            self._wake_retention.clear()
            try:
                await self.store.enforce_retention()
            except StorageClosed:
                return
            except Exception as exc:  # noqa: BLE001 - retry next round; ingest goes on
                self.log.error("storage.retention_failed", error=repr(exc))

    # -- query API ---------------------------------------------------------------------------
    async def _handle(self, endpoint: str, req: Request) -> None:
        try:
            request = decode_request(endpoint, req.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ServiceError("400", f"bad {endpoint} request: {exc}") from None
        try:
            data = await getattr(self, f"_api_{endpoint}")(request)
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - the caller gets a 500 naming it; we log it
            self.log.error("storage.api_failed", endpoint=endpoint, error=repr(exc))
            raise ServiceError("500", f"{type(exc).__name__}: {exc}") from None
        await req.respond(data)

    @property
    def _budget(self) -> int:
        limit = int(self.nc.max_payload)
        if self.max_reply_bytes is not None:
            limit = min(limit, self.max_reply_bytes)
        return max(1024, limit - _REPLY_OVERHEAD)

    def _check_size(self, what: str, size: int) -> None:
        if size > self._budget:
            raise ServiceError("413", f"{what} is {size} bytes, more than one reply may carry ({self._budget})")

    async def _api_get(self, req: Any) -> bytes:
        assert self.store is not None
        raw = await self.store.get_raw(req.id)
        if raw is None:
            raise ServiceError("404", f"session {req.id} is not stored")
        self._check_size(f"session {req.id}", len(raw))
        return raw

    async def _page(self, filters: Filters, *, desc: bool, limit: int | None, cursor: Cursor | None) -> bytes:
        assert self.store is not None
        page: Page = await self.store.page(filters, desc=desc, limit=limit,
                                           cursor=(cursor.t, cursor.id) if cursor else None, max_bytes=self._budget)
        if len(page.payloads) == 1:
            self._check_size("a matching session", len(page.payloads[0]))
        reply = RawSessionsReply(sessions=[msgspec.Raw(p) for p in page.payloads],
                                 cursor=Cursor(*page.cursor) if page.cursor else None)
        return _encoder.encode(reply)

    async def _api_recent(self, req: Any) -> bytes:
        return await self._page(Filters(), desc=True, limit=req.n, cursor=req.cursor)

    async def _api_range(self, req: Any) -> bytes:
        if req.end < req.start:
            raise ServiceError("400", f"bad range request: end {req.end} is before start {req.start}")
        return await self._page(Filters(since=req.start, until=req.end), desc=False, limit=req.limit,
                                cursor=req.cursor)

    async def _api_query(self, req: Any) -> bytes:
        if req.since is not None and req.until is not None and req.until < req.since:
            raise ServiceError("400", f"bad query request: until {req.until} is before since {req.since}")
        f = Filters(outcome=req.outcome, branch=req.branch, agent=req.agent, target=req.target,
                    since=req.since, until=req.until)
        return await self._page(f, desc=True, limit=req.limit, cursor=req.cursor)

    async def _api_stats(self, req: Any) -> bytes:
        assert self.store is not None
        st = self.store.stats()
        return _encoder.encode(StatsReply(
            sessions=st.sessions, segments=st.segments, disk_bytes=st.disk_bytes, oldest=st.oldest,
            newest=st.newest, damaged_regions=st.damaged_regions, stored=self.stored,
            duplicates=self.duplicates, dead_letters=self.dead_letters, max_sessions=self.store.max_sessions,
            retention_s=self.store.retention_s))
