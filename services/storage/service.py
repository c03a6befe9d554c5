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

The consume loop, dead letters, endpoints, lifecycle and /metrics are the service
skeleton's (``shared/service.py``); this module declares them and holds ingest; the query
handlers are ``queries.py``'s.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, NamedTuple

from nats.aio.msg import Msg

from buildtel.services.storage import (
    columns,
    failures,
    history,
    partmerge,
    rowcache,
    rowwork,
    tests_history,
)
from buildtel.services.storage import partition as layout
from buildtel.services.storage.api import (
    API_VERSION,
    ENDPOINTS,
    endpoint_subject,
)
from buildtel.services.storage.queries import StorageQueries
from buildtel.services.storage.router import Router
from buildtel.services.storage.store import (
    DEFAULT_SEGMENT_BYTES,
    DamageReport,
    StorageClosed,
    TelemetryStorage,
)
from buildtel.services.storage.summary import SessionFacts
from buildtel.shared import partitions
from buildtel.shared.bus import MAX_DELIVER, note_failure
from buildtel.shared.codec import MAX_SESSION_BYTES, DecodeError, decode_session
from buildtel.shared.service import (
    BusService,
    Consumer,
    Endpoint,
    Worker,
)
from buildtel.shared.settings import Settings

DURABLE = "storage"
# Ids become index keys and log fields; the protocol's are 32 hex digits, this is the lenient bound.
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,256}$")
# A write failure is usually the disk (full, read-only), not the session: give it longer than the
# other consumers' MAX_DELIVER before a session is parked on the dead-letter subject (~15 min with
# the growing delay below).  The sessions stream still holds it for 30 days after that.
STORAGE_MAX_DELIVER = max(MAX_DELIVER, 20)
WRITE_RETRY_S = 5.0  # times the delivery count, at most 60 s


class _Facts(NamedTuple):
    id: str
    outcome: str
    targets: int
    facts: SessionFacts  # what the store's index needs, from the one decode of the session


class StorageService(StorageQueries, BusService):
    """The storage process: one store, one durable consumer, one micro service."""

    name = "storage"
    api_version = API_VERSION
    description = "Builder Telemetry session store"

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *, batch_size: int = 32,
                 fetch_timeout_s: float = 1.0, ack_wait_s: float = 30.0, max_ack_pending: int = 1024,
                 retention_interval_s: float = 30.0, max_message_bytes: int = MAX_SESSION_BYTES,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, max_reply_bytes: int | None = None,
                 row_cache_bytes: int = rowcache.DEFAULT_MAX_BYTES, metrics_port: int | None = None,
                 partition: int | None = None) -> None:
        super().__init__(settings, nats_url, redis_url, metrics_port=metrics_port)
        # Storage partitions (shared/partitions.py): None is the one unpartitioned store (P = 1).
        self.partitions = settings.storage_partitions
        if self.partitions == 1:
            if partition not in (None, 0):
                raise ValueError(f"--partition {partition}: storage is not partitioned "
                                 "(BUILDER_TELEMETRY_STORAGE_PARTITIONS is 1)")
            partition = None
        elif partition is None or not 0 <= partition < self.partitions:
            raise ValueError(f"storage is partitioned (BUILDER_TELEMETRY_STORAGE_PARTITIONS={self.partitions}): "
                             f"give each instance --partition k, k in 0..{self.partitions - 1}")
        self.partition = partition
        self.router: Router | None = None
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
        # Counters for /metrics (monotonic since start); dead_letters is the skeleton's.
        self.stored = 0
        self.duplicates = 0
        self.write_failures = 0
        self.store: TelemetryStorage | None = None
        self.open_s = 0.0
        self.damage: DamageReport | None = None
        self._wake_retention = asyncio.Event()
        self._chunked = None  # queries.py: the last session read in parts
        # Report rows of recent sessions, decoded once (services/storage/rowcache.py); bounded.
        self.row_cache = rowcache.RowCache(row_cache_bytes)
        self._rows_due = asyncio.Event()  # appends or retention may have sealed a segment

    # -- declarations (shared/service.py) -------------------------------------------------------
    def consumers(self) -> list[Consumer]:
        # Whole fetches: the good sessions of one are appended with one fsync, then acked.  A fetch
        # in hand on stop is finished (append + acks, up to 10 s); an idle fetch is cancelled.
        return [Consumer(stream=self.subjects.sessions_stream, subject=self.subjects.sessions_completed,
                         durable=partitions.storage_durable(self.partition), handler=self.process,
                         filter_subjects=partitions.storage_filters(self.subjects, self.partition), batch=True,
                         what="process", fetch=self.batch_size,
                         fetch_timeout_s=self.fetch_timeout_s, ack_wait_s=self.ack_wait_s,
                         max_ack_pending=self.max_ack_pending, max_deliver=STORAGE_MAX_DELIVER,
                         cancel_idle_fetch=True, stop_timeout_s=10.0)]

    def _own(self) -> dict[str, Callable[[bytes], Awaitable[bytes]]]:
        """This store's endpoints by name."""
        return {**{ep: partial(self._handle, ep) for ep in ENDPOINTS}, columns.ENDPOINT: self._api_columns,
                history.TREND: self._api_trend, history.TARGET_HISTORY: self._api_target_history,
                tests_history.TESTS: self._api_tests, tests_history.TEST_HISTORY: self._api_test_history,
                failures.FAILURES: self._api_failures}

    def endpoints(self) -> list[Endpoint]:
        own = self._own()
        if self.partition is None:
            return [Endpoint(name, endpoint_subject(self.subjects, name), h) for name, h in own.items()]
        # Partition k: its own store on <ns>.storage.p<k>.*, and the usual subjects (any partition
        # takes each request, in one queue group) answered for all partitions, merged (router.py).
        k = self.partition
        parts = self._parts()  # asked by the router only: on the partition's subjects alone
        return [*(Endpoint(f"p{k}-{name}", self.subjects.storage_partition_endpoint(k, name), h)
                  for name, h in {**own, **parts}.items()),
                *(Endpoint(name, endpoint_subject(self.subjects, name), partial(self._route, name)) for name in own)]

    async def _local(self, endpoint: str, data: bytes) -> bytes:
        return await {**self._own(), **self._parts()}[endpoint](data)

    def _parts(self) -> dict[str, Callable[[bytes], Awaitable[bytes]]]:
        """A partition's parts of the merged tests, test_history and failures (partmerge.py)."""
        return {partmerge.TESTS_PART: self._api_tests_part, partmerge.FAILURES_PART: self._api_failures_part,
                partmerge.PASSED_PART: self._api_passed_part}

    async def _route(self, endpoint: str, data: bytes) -> bytes:
        if self.router is None:
            assert self.partition is not None
            self.router = Router(self.nc, self.subjects, self.partitions, self.partition, self._local,
                                 lambda: self._budget)
        return await self.router.handle(endpoint, data)

    def workers(self) -> list[Worker]:
        return [Worker("retention", self._retention_loop, cancel_on_stop=True),
                Worker("row-cache", self._warm_rows, cancel_on_stop=True),
                Worker("row-files", self._row_files, cancel_on_stop=True),
                Worker("verify", self._verify, cancel_on_stop=True)]

    def counters(self) -> dict[str, float]:
        return {"sessions_stored_total": self.stored, "duplicates_total": self.duplicates,
                "write_failures_total": self.write_failures}

    async def open(self, stack: AsyncExitStack) -> None:
        s = self.settings
        directory = partitions.store_dir(s.telemetry_dir, self.partition)
        layout.check_layout(s.telemetry_dir, self.partitions, self.partition)
        store = TelemetryStorage(directory, max_sessions=s.max_sessions, retention_s=s.retention_s,
                                 fsync=s.fsync, segment_bytes=self.segment_bytes)
        t0 = time.perf_counter()
        self.damage = await store.open()
        self.open_s = time.perf_counter() - t0
        stack.push_async_callback(store.close)  # closed last: after every reader and the writer
        self.store = store

    async def prepare(self, stack: AsyncExitStack) -> None:
        await layout.check_stream(self.js, self.subjects, self.partitions)

    async def started_fields(self) -> dict[str, Any]:
        store = self.store
        assert store is not None
        rep = store.last_report
        return {"directory": str(store.directory), "partition": self.partition, "sessions": await store.count(),
                "damaged_regions": len(rep.damages), "max_sessions": store.max_sessions,
                "open_s": round(self.open_s, 3), "segments": rep.segments,
                "from_index_files": rep.indexed_from_sidecars, "scanned_bytes": rep.scanned_bytes}

    def stopped_fields(self) -> dict[str, Any]:
        return {"stored": self.stored, "duplicates": self.duplicates, "dead_letters": self.dead_letters}

    # -- ingest ------------------------------------------------------------------------------
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
            flags = await store.append_encoded([m.data for m, _ in good], [f.facts for _, f in good])
        except Exception as exc:  # noqa: BLE001 - disk full, I/O error: retry later, never ack
            self.write_failures += 1
            self.log.error("storage.write_failed", error=repr(exc), sessions=len(good))
            for msg, _ in good:
                meta = msg.metadata
                await note_failure(self.redis, self.keys, stream=self.subjects.sessions_stream,
                                   consumer=partitions.storage_durable(self.partition),
                                   seq=meta.sequence.stream, reason=f"write failed: {exc!r}")
                await msg.nak(delay=min(60.0, WRITE_RETRY_S * meta.num_delivered))
            await asyncio.sleep(1.0)
            return
        for (msg, facts), new in zip(good, flags, strict=True):
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
        self._rows_due.set()  # a segment may have been sealed: its row file (rowwork.py)

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
        return _Facts(session.id, session.outcome, len(session.targets), SessionFacts.of(session))

    async def _dead_letter(self, bad: list[tuple[Msg, str]]) -> None:
        # Published together, flushed once, then acked: the dead letters leave before the originals go.
        await self.dead_letter_many(bad)

    async def _retention_loop(self) -> None:
        assert self.store is not None
        while not self.stopping.is_set():
            if await self.idle(self.retention_interval_s, self._wake_retention):
                return
            try:
                report = await self.store.enforce_retention()
                if report.segments_compacted:
                    self._rows_due.set()  # compacted segments need new row files
                await self._delete_logs(report.dropped_ids)
            except StorageClosed:
                return
            except Exception as exc:  # noqa: BLE001 - retry next round; ingest goes on
                self.log.error("storage.retention_failed", error=repr(exc))

    async def _delete_logs(self, ids: list[str]) -> None:
        """The build logs of sessions retention dropped go with them; one that cannot be deleted
        now ages out with the logs bucket (``shared/logstore.py``)."""
        from buildtel.shared.logstore import delete_logs

        deleted, error = await delete_logs(self.js, self.subjects, ids, stop=self.stopping)
        if deleted or error:
            self.log.info("storage.logs_deleted", logs=deleted, error=error or None)

    async def _verify(self) -> None:
        """Checksum, once, what the open took on trust from index files (a worker thread; logged)."""
        assert self.store is not None
        if not self.store.stats().unverified_segments:
            return
        rep = await self.store.verify()
        self.log.info("storage.verified", segments=rep.segments, records=rep.records, bytes=rep.scanned_bytes,
                      damaged_regions=len(rep.damages))

    async def _row_files(self) -> None:
        """Write the report-row file of every sealed segment that lacks one (rowwork.py)."""
        assert self.store is not None
        loop = asyncio.get_running_loop()

        def wake() -> None:  # from a request's worker thread
            loop.call_soon_threadsafe(self._rows_due.set)

        self.row_cache.wake = wake
        try:
            await rowwork.maintain(self.store, self.row_cache, self.stopping, self._rows_due, self.log)
        except StorageClosed:
            return

    async def _warm_rows(self) -> None:
        """Reduce the newest sessions into the row cache once the store is open (reports then skip it)."""
        assert self.store is not None
        try:
            await rowcache.warm(self.store, self.row_cache, self.stopping)
        except StorageClosed:
            return
        except Exception as exc:  # noqa: BLE001 - only a warm-up: reports reduce what they read anyway
            self.log.warning("storage.row_cache_warm_failed", error=repr(exc))
