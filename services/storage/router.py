"""Queries over partitioned storage: ask every partition, merge, and say what is missing.

With P > 1 storage partitions (``shared/partitions.py``) each instance answers its own store on
``<ns>.storage.p<k>.<endpoint>`` and, in one queue group with the other partitions, the usual
``<ns>.storage.<endpoint>``: whichever live instance takes such a request asks all P partitions
(its own store directly) and merges their answers, so every client (CLI, web API, analyzer) keeps
asking one subject and gets one answer in the unpartitioned reply format.

Merging follows the stores' keyset order, (t, id) with t the finish time: each partition's page
comes with the key of every item (``keys``); the merged page takes items in order while every
partition that may hold more has shown an item at or past them, so nothing is skipped between
pages.  The next cursor is the key of the merged page's last item: one keyset position that is
every partition's position (each resumes strictly after it).  A session stored twice (published
again across a change of P) comes once.

A partition that does not answer in ``timeout_s`` (stopped, killed, overloaded) is left out and
named in the reply's ``partial`` ("partial: partition k did not answer"); a ``get`` of a session
the answering partitions lack then fails 503 saying so, never a plain 404.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from buildtel.services.storage import columns, failures, history, pages, partmerge, tests_history
from buildtel.services.storage.api import (
    MAX_ITEMS,
    Cursor,
    RawSessionsReply,
    StatsReply,
    StorageError,
    SummariesReply,
    SummariesRequest,
    decode_request,
)
from buildtel.services.storage.partmerge import joined, missing
from buildtel.shared import micro
from buildtel.shared.service import BAD_REQUEST, NOT_FOUND, ServiceError
from buildtel.shared.subjects import Subjects

MERGED = ("get", "chunk", "recent", "range", "query", "summaries", "stats", columns.ENDPOINT,
          history.TARGET_HISTORY, history.TREND, tests_history.TESTS, tests_history.TEST_HISTORY, failures.FAILURES)
PARTITION_TIMEOUT_S = 2.5  # below the clients' 5 s: a missing partition is reported, not a timeout
_enc = msgspec.msgpack.Encoder()
_raw_dec = msgspec.msgpack.Decoder(RawSessionsReply)
_sum_dec = msgspec.msgpack.Decoder(SummariesReply)
_stats_dec = msgspec.msgpack.Decoder(StatsReply)


class Router:
    """Fan a request out to every partition and merge the answers (one per storage instance)."""

    def __init__(self, nc: Any, subjects: Subjects, partitions: int, own: int,
                 local: Callable[[str, bytes], Awaitable[bytes]], budget: Callable[[], int], *,
                 timeout_s: float = PARTITION_TIMEOUT_S) -> None:
        self.nc = nc
        self.subjects = subjects
        self.partitions = partitions
        self.own = own
        self.local = local  # this instance's own answer (no round trip)
        self.timeout_s = timeout_s
        self.budget = budget  # bytes one reply may carry

    async def _one(self, k: int, endpoint: str, data: bytes) -> bytes | ServiceError:
        try:
            if k == self.own:
                return await self.local(endpoint, data)
            return await micro.request(self.nc, self.subjects.storage_partition_endpoint(k, endpoint), data,
                                       timeout=self.timeout_s, service=f"storage partition {k}", error=StorageError)
        except StorageError as exc:  # a peer's refusal, passed on as this service's (same code and text)
            return ServiceError(exc.code, exc.description)
        except ServiceError as exc:
            return exc

    async def ask(self, endpoint: str, data: bytes) -> tuple[dict[int, bytes], list[str]]:
        """Each answering partition's reply, and the partial notes of those that did not answer.
        An error other than "not there" (a bad request) is raised as the answer."""
        answers = await asyncio.gather(*(self._one(k, endpoint, data) for k in range(self.partitions)))
        got: dict[int, bytes] = {}
        partial: list[str] = []
        errors: list[ServiceError] = []
        for k, a in enumerate(answers):
            if isinstance(a, bytes):
                got[k] = a
            elif a.code in (503, 504):
                partial.append(missing(k))
            else:
                errors.append(a)
        if errors and not got and endpoint not in ("get", "chunk"):
            raise errors[0]
        if errors and endpoint in ("get", "chunk"):
            other = [e for e in errors if e.code != NOT_FOUND]
            if other:
                raise other[0]
        return got, partial

    async def handle(self, endpoint: str, data: bytes) -> bytes:
        if endpoint not in MERGED:
            raise ServiceError(501, f"storage is partitioned ({self.partitions} partitions): the {endpoint} report "
                                    "is not merged across partitions yet; ask one partition on "
                                    f"{self.subjects.storage_partition_endpoint(0, endpoint)} (docs/scaling.md)")
        if endpoint == history.TREND:
            return await self._trend(data)
        if endpoint == tests_history.TESTS:  # grouped across partitions: partmerge.py
            return await partmerge.tests(self, data)
        if endpoint == tests_history.TEST_HISTORY:
            return await partmerge.test_history(self, data)
        if endpoint == failures.FAILURES:
            return await partmerge.failures(self, data)
        try:
            req: Any = (columns.request_decoder.decode(data or b"\x80") if endpoint == columns.ENDPOINT
                        else history.target_history_decoder.decode(data) if endpoint == history.TARGET_HISTORY
                        else decode_request(endpoint, data))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ServiceError(BAD_REQUEST, f"bad {endpoint} request: {exc}") from None
        got, partial = await self.ask(endpoint, data)
        if endpoint in ("get", "chunk"):
            for k in sorted(got):
                return got[k]
            if partial:
                raise ServiceError(503, f"session {req.id} is not in the partitions that answered; "
                                        + "; ".join(partial))
            raise ServiceError(NOT_FOUND, f"session {req.id} is not stored")
        if endpoint == columns.ENDPOINT:  # report rows: names renumbered into one table (pages.py)
            return _enc.encode(pages.merge_columns([columns.reply_decoder.decode(b) for b in got.values()],
                                                   limit=req.limit, budget=self.budget(), partial=partial))
        if endpoint == history.TARGET_HISTORY:  # one run per session, newest first: merged like a list
            runs = [history.target_history_reply_decoder.decode(b) for b in got.values()]
            merged, cursor = _merge([(list(r.runs), [Cursor(x.t, x.session_id) for x in r.runs], r.cursor)
                                     for r in runs], desc=True,
                                    limit=max(1, min(req.limit, self.budget() // history.RUN_BYTES)))
            return _enc.encode(history.TargetHistoryReply(target=req.target, runs=[x for x, _ in merged],
                                                          cursor=cursor, partial=partial))
        if endpoint == "stats":
            return _enc.encode(merge_stats([_stats_dec.decode(b) for b in got.values()], self.partitions, partial))
        if endpoint == "summaries":
            replies = [_sum_dec.decode(b) for b in got.values()]
            limit = max(1, min(req.limit, self.budget() // 2048))  # as one partition pages them
            return _enc.encode(merge_summaries(replies, desc=req.order == "newest", limit=limit, partial=partial))
        desc = endpoint != "range"
        limit = req.n if endpoint == "recent" else req.limit
        return _enc.encode(merge_sessions([_raw_dec.decode(b) for b in got.values()], desc=desc, limit=limit,
                                          partial=partial, max_bytes=self.budget()))


    async def _trend(self, data: bytes) -> bytes:
        """Builds per time bucket over all partitions, exactly as one store computes them: the
        per-bucket duration percentiles need every duration, so each partition's matching
        summaries (with their order time) are gathered and bucketed here (history.buckets)."""
        try:
            req = history.trend_decoder.decode(data or b"\x80")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ServiceError(BAD_REQUEST, f"bad trend request: {exc}") from None
        until = req.until if req.until is not None else time.time()
        since = req.since if req.since is not None else max(0.0, until - 30 * history.DAY)
        if (until - since) / req.bucket_s > history.MAX_BUCKETS:
            raise ServiceError(BAD_REQUEST, f"bad trend request: {until - since:.0f} s in buckets of "
                                            f"{req.bucket_s:.0f} s is more than {history.MAX_BUCKETS} buckets; "
                                            "ask for larger buckets")

        async def every(k: int) -> list[_Timed] | ServiceError:
            out: list[_Timed] = []
            cursor = None
            while True:
                page = SummariesRequest(branch=req.branch, agent=req.agent, name=req.name, label=req.label,
                                        target=req.target, since=since, until=until, order="oldest",
                                        limit=MAX_ITEMS, cursor=cursor)
                got = await self._one(k, "summaries", _enc.encode(page))
                if isinstance(got, ServiceError):
                    return got
                reply = _sum_dec.decode(got)
                out += [_Timed(key.t, s) for s, key in zip(reply.summaries, reply.keys, strict=True)]
                if reply.cursor is None or not reply.summaries:
                    return out
                cursor = reply.cursor

        rows, partial = joined(await asyncio.gather(*(every(k) for k in range(self.partitions))))
        out = await asyncio.to_thread(history.buckets, rows, since, until, req.bucket_s)
        return _enc.encode(history.TrendReply(since=since, until=until, bucket_s=req.bucket_s, builds=len(rows),
                                              buckets=out, partial=partial))


class _Timed:
    """A summary with the store's order time ``t``, as ``history.buckets`` reads index summaries."""

    __slots__ = ("cache_hits", "cache_misses", "complete", "duration_s", "outcome", "t")

    def __init__(self, t: float, s: Any) -> None:
        self.t = t
        self.outcome, self.complete, self.duration_s = s.outcome, s.complete, s.duration_s
        self.cache_hits, self.cache_misses = s.cache_hits, s.cache_misses


def _key(c: Cursor) -> tuple[float, str]:
    return (c.t, c.id)


def _merge(pages: list[tuple[list[Any], list[Cursor], Cursor | None]], *, desc: bool,
           limit: int | None) -> tuple[list[tuple[Any, Cursor]], Cursor | None]:
    """The merged items (with keys) and the next cursor.  ``pages``: (items, keys, cursor)."""
    # Items past a horizon of a partition that may hold more (a cursor) cannot be placed yet.
    horizons = [_key(cur) for _, _, cur in pages if cur is not None]
    horizon = (max(horizons) if desc else min(horizons)) if horizons else None
    items = [(key, item) for its, keys, _ in pages for item, key in zip(its, keys, strict=True)]
    items.sort(key=lambda kv: _key(kv[0]), reverse=desc)
    out: list[tuple[Any, Cursor]] = []
    more = horizon is not None
    seen: set[str] = set()
    for key, item in items:
        k = _key(key)
        if horizon is not None and ((k < horizon) if desc else (k > horizon)):
            break
        if limit is not None and len(out) >= limit:
            more = True
            break
        if key.id in seen:
            continue  # stored twice (across a change of P): once in the answer
        seen.add(key.id)
        out.append((item, key))
    cursor = out[-1][1] if more and out else (Cursor(*horizon) if more and horizon is not None else None)
    return out, cursor


def merge_sessions(replies: list[RawSessionsReply], *, desc: bool, limit: int | None,
                   partial: list[str], max_bytes: int) -> RawSessionsReply:
    pages: list[tuple[list[Any], list[Cursor], Cursor | None]] = []
    for r in replies:
        its: list[Any] = list(r.sessions)
        keys = list(r.keys)
        if r.oversized is not None and r.cursor is not None:
            its.append(r.oversized)  # in its place in the order: its key is the page's cursor
            keys.append(r.cursor)
        pages.append((its, keys, r.cursor))
    merged, cursor = _merge(pages, desc=desc, limit=limit)
    sessions: list[msgspec.Raw] = []
    total = 0
    for n, (item, key) in enumerate(merged):
        if isinstance(item, str):  # an oversized session: alone in a page, as one partition answers it
            if n == 0:
                return RawSessionsReply(oversized=item, cursor=key, partial=partial)
            return RawSessionsReply(sessions=sessions, cursor=merged[n - 1][1], partial=partial)
        size = len(memoryview(item))
        if sessions and total + size > max_bytes:  # P pages do not fit one reply: the rest next time
            return RawSessionsReply(sessions=sessions, cursor=merged[n - 1][1], partial=partial)
        total += size
        sessions.append(item)
    return RawSessionsReply(sessions=sessions, cursor=cursor, partial=partial)


def merge_summaries(replies: list[SummariesReply], *, desc: bool, limit: int, partial: list[str]) -> SummariesReply:
    merged, cursor = _merge([(list(r.summaries), list(r.keys), r.cursor) for r in replies], desc=desc, limit=limit)
    return SummariesReply(summaries=[s for s, _ in merged], cursor=cursor, partial=partial)


def merge_stats(replies: list[StatsReply], partitions: int, partial: list[str]) -> StatsReply:
    out = StatsReply(partitions=partitions, partial=partial)
    for r in replies:
        out.sessions += r.sessions
        out.segments += r.segments
        out.disk_bytes += r.disk_bytes
        out.damaged_regions += r.damaged_regions
        out.stored += r.stored
        out.duplicates += r.duplicates
        out.dead_letters += r.dead_letters
        out.max_sessions += r.max_sessions
        out.unverified_segments += r.unverified_segments
        out.retention_s = r.retention_s
        out.open_s = max(out.open_s, r.open_s)
        if r.oldest is not None:
            out.oldest = r.oldest if out.oldest is None else min(out.oldest, r.oldest)
        if r.newest is not None:
            out.newest = r.newest if out.newest is None else max(out.newest, r.newest)
    return out
