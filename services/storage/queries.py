"""The storage service's query API: the handlers of its ``nats.micro`` endpoints (``api.py`` is
the client side), apart from ingest and the service's wiring (``service.py``).

:class:`StorageQueries` is mixed into ``StorageService``, which provides the store, the
connection and the counters these handlers read; each handler takes a request's bytes (or its
decoded request) and answers bytes, paged to fit one NATS message (``_budget``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from buildtel.services.storage import columns, failures, history, pages, partmerge, rowcache, tests_history
from buildtel.services.storage.api import (
    ChunkReply,
    Cursor,
    RawSessionsReply,
    SessionSummary,
    StatsReply,
    SummariesReply,
    decode_request,
)
from buildtel.services.storage.index import Filters
from buildtel.services.storage.store import Page, TelemetryStorage
from buildtel.services.storage.summary import Summary
from buildtel.shared.failclass import Rule
from buildtel.shared.service import BAD_REQUEST, NOT_FOUND, TOO_LARGE, ServiceError
from buildtel.shared.settings import Settings, SettingsError

_REPLY_OVERHEAD = 4096  # bytes of a reply that are not session payload (array header, cursor)
CHUNK_CACHE_S = 60.0  # how long a session being read in parts is kept for the next part

_encoder = msgspec.msgpack.Encoder()


class _Id(msgspec.Struct):
    """Only the id of a stored session (the rest of its bytes is skipped, not built)."""

    id: str


_id_decoder = msgspec.msgpack.Decoder(_Id)


class StorageQueries:
    """The query handlers; ``StorageService`` provides what is declared here."""

    settings: Settings
    nc: Any
    log: structlog.typing.FilteringBoundLogger
    store: TelemetryStorage | None
    partition: int | None
    max_reply_bytes: int | None
    row_cache: rowcache.RowCache
    stored: int
    duplicates: int
    dead_letters: int
    open_s: float
    # The last session read in parts (`chunk`): (id, bytes, when), so a client reading one
    # session of many replies costs one read of the record, not one per part.
    _chunked: tuple[str, bytes, float] | None

    async def _handle(self, endpoint: str, data: bytes) -> bytes:
        try:
            request = decode_request(endpoint, data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ServiceError(BAD_REQUEST, f"bad {endpoint} request: {exc}") from None
        # Any other failure: the skeleton answers 500 naming it, and logs storage.api_failed.
        handler: Callable[[Any], Awaitable[bytes]] = getattr(self, f"_api_{endpoint}")
        return await handler(request)

    @property
    def _budget(self) -> int:
        limit = int(self.nc.max_payload)
        if self.max_reply_bytes is not None:
            limit = min(limit, self.max_reply_bytes)
        return max(1024, limit - _REPLY_OVERHEAD)

    async def _api_get(self, req: Any) -> bytes:
        assert self.store is not None
        raw = await self.store.get_raw(req.id)
        if raw is None:
            raise ServiceError(NOT_FOUND, f"session {req.id} is not stored")
        if len(raw) > self._budget:
            self._chunked = (req.id, raw, time.monotonic())  # the client comes for its parts next
            raise ServiceError(TOO_LARGE, f"session {req.id} is {len(raw)} bytes, more than one reply may carry "
                                          f"({self._budget}): read it in parts with `chunk`")
        return raw

    async def _api_chunk(self, req: Any) -> bytes:
        """Stored bytes of one session from ``offset``, as many as one reply holds."""
        assert self.store is not None
        cached = self._chunked
        fresh = cached is not None and cached[0] == req.id and time.monotonic() - cached[2] < CHUNK_CACHE_S
        raw = cached[1] if cached is not None and fresh else await self.store.get_raw(req.id)
        if raw is None:
            raise ServiceError(NOT_FOUND, f"session {req.id} is not stored")
        if req.offset > len(raw):
            raise ServiceError(BAD_REQUEST, f"offset {req.offset} is past the end of session {req.id} "
                                            f"({len(raw)} bytes)")
        end = min(len(raw), req.offset + self._budget)
        # The last part read lets go of the bytes; a client that stops half-way leaves them for
        # CHUNK_CACHE_S (or until the next session read in parts).
        self._chunked = None if end == len(raw) else (req.id, raw, time.monotonic())
        return _encoder.encode(ChunkReply(size=len(raw), offset=req.offset, data=raw[req.offset:end]))

    async def _page(self, filters: Filters, *, desc: bool, limit: int | None, cursor: Cursor | None) -> bytes:
        assert self.store is not None
        page: Page = await self.store.page(filters, desc=desc, limit=limit,
                                           cursor=(cursor.t, cursor.id) if cursor else None, max_bytes=self._budget)
        cursor_out = Cursor(*page.cursor) if page.cursor else None
        if len(page.payloads) == 1 and len(page.payloads[0]) > self._budget:
            # A session larger than any page comes alone, by id: the client `get`s it in parts.
            sid = _id_decoder.decode(page.payloads[0]).id
            return _encoder.encode(RawSessionsReply(oversized=sid, cursor=cursor_out))
        keys = [Cursor(*k) for k in page.keys] if self.partition is not None else []  # for the merge (router.py)
        reply = RawSessionsReply(sessions=[msgspec.Raw(p) for p in page.payloads], cursor=cursor_out, keys=keys)
        return _encoder.encode(reply)

    async def _api_recent(self, req: Any) -> bytes:
        return await self._page(Filters(), desc=True, limit=req.n, cursor=req.cursor)

    async def _api_range(self, req: Any) -> bytes:
        if req.end < req.start:
            raise ServiceError(BAD_REQUEST, f"bad range request: end {req.end} is before start {req.start}")
        return await self._page(Filters(since=req.start, until=req.end), desc=False, limit=req.limit,
                                cursor=req.cursor)

    async def _api_query(self, req: Any) -> bytes:
        if req.since is not None and req.until is not None and req.until < req.since:
            raise ServiceError(BAD_REQUEST, f"bad query request: until {req.until} is before since {req.since}")
        f = Filters(outcome=req.outcome, branch=req.branch, agent=req.agent, name=req.name, label=req.label,
                    target=req.target, since=req.since, until=req.until)
        return await self._page(f, desc=True, limit=req.limit, cursor=req.cursor)

    async def _api_summaries(self, req: Any) -> bytes:
        assert self.store is not None
        if req.since is not None and req.until is not None and req.until < req.since:
            raise ServiceError(BAD_REQUEST, f"bad summaries request: until {req.until} is before since {req.since}")
        f = Filters(outcome=req.outcome, branch=req.branch, agent=req.agent, name=req.name, label=req.label,
                    target=req.target, since=req.since, until=req.until)
        # A summary is at most ~1 KB plus its names and labels: a page that surely fits one reply.
        limit = max(1, min(req.limit, self._budget // 2048))
        rows, cursor = await self.store.summaries(f, desc=req.order == "newest", limit=limit,
                                                  cursor=(req.cursor.t, req.cursor.id) if req.cursor else None)
        keys = [Cursor(*s.key) for s in rows] if self.partition is not None else []  # for the merge (router.py)
        return _encoder.encode(SummariesReply(summaries=[summary_of(s) for s in rows],
                                              cursor=Cursor(*cursor) if cursor else None, keys=keys))

    async def _api_stats(self, req: Any) -> bytes:
        assert self.store is not None
        st = self.store.stats()
        return _encoder.encode(StatsReply(
            sessions=st.sessions, segments=st.segments, disk_bytes=st.disk_bytes, oldest=st.oldest,
            newest=st.newest, damaged_regions=st.damaged_regions, stored=self.stored,
            duplicates=self.duplicates, dead_letters=self.dead_letters, max_sessions=self.store.max_sessions,
            retention_s=self.store.retention_s, open_s=self.open_s, unverified_segments=st.unverified_segments))

    async def _api_columns(self, data: bytes) -> bytes:
        """Report rows (services/storage/columns.py): compact per-session facts and per-target columns."""
        try:
            req = columns.request_decoder.decode(data or b"\x80")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ServiceError(BAD_REQUEST, f"bad columns request: {exc}") from None
        if req.since is not None and req.until is not None and req.until < req.since:
            raise ServiceError(BAD_REQUEST, f"bad columns request: until {req.until} is before since {req.since}")
        assert self.store is not None
        return await pages.serve_page(self.store, req, self._budget, self.row_cache)

    async def _api_trend(self, data: bytes) -> bytes:
        """Builds per time bucket (services/storage/history.py)."""
        assert self.store is not None
        return await history.serve_trend(self.store, data)

    async def _api_target_history(self, data: bytes) -> bytes:
        """One target's runs across sessions (services/storage/history.py)."""
        assert self.store is not None
        return await history.serve_target_history(self.store, self.row_cache, data, self._budget)

    async def _api_tests(self, data: bytes) -> bytes:
        """Per-test figures and flaky tests (services/storage/tests_history.py)."""
        assert self.store is not None
        return await tests_history.serve_tests(self.store, data, self._budget)

    async def _api_test_history(self, data: bytes) -> bytes:
        """One test's runs (services/storage/tests_history.py)."""
        assert self.store is not None
        return await tests_history.serve_test_history(self.store, data, self._budget)

    def _rules(self) -> tuple[Rule, ...]:
        try:
            return self.settings.failure_rule_table()
        except SettingsError as exc:  # the file went bad since start: said, and the built-in rules used
            self.log.warning("failure_rules.unusable", error=str(exc))
            return ()

    async def _api_failures(self, data: bytes) -> bytes:
        """Failures grouped by signature and class (services/storage/failures.py)."""
        assert self.store is not None
        return await failures.serve_failures(self.store, data, self._budget, self._rules())

    async def _api_tests_part(self, data: bytes) -> bytes:
        """This partition's rows for a merged ``tests``/``test_history`` (partmerge.py)."""
        assert self.store is not None
        return await partmerge.serve_tests_part(self.store, data, self._budget)

    async def _api_failures_part(self, data: bytes) -> bytes:
        """This partition's rows for a merged ``failures`` (partmerge.py)."""
        assert self.store is not None
        return await partmerge.serve_failures_part(self.store, data, self._budget, self._rules())

    async def _api_passed_part(self, data: bytes) -> bytes:
        """The flaky rule's passes in this partition (partmerge.py)."""
        assert self.store is not None
        return await partmerge.serve_passed_part(self.store, data)


def summary_of(s: Summary) -> SessionSummary:
    """The API's view of an index summary (labels back to a mapping, the hit rate computed)."""
    done = s.cache_hits + s.cache_misses
    return SessionSummary(
        id=s.id, name=s.name, start=s.start, finish=s.finish, duration_s=s.duration_s, outcome=s.outcome,
        exit_code=s.exit_code, branch=s.branch, commit=s.commit, agents=list(s.agents),
        labels=dict(lab.split("=", 1) for lab in s.labels), targets=s.targets, failed=s.failed,
        cache_hits=s.cache_hits, cache_misses=s.cache_misses, cache_hit_rate=s.cache_hits / done if done else 0.0,
        cpu_s=s.cpu_s, peak_rss_bytes=s.peak_rss_bytes, up_to_date=s.up_to_date, complete=s.complete,
        incomplete_reasons=[s.reason] if s.reason else [], more_reasons=max(0, s.reasons - 1), stored_bytes=s.length)
