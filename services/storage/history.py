"""Time series of the stored history, for dashboards and the HTTP API: build trends per time
bucket, and one target's runs across sessions.  Computed in the storage process from the index's
summaries and the report rows (``rowcache.py``: memory, else the segments' row files), never
from whole sessions.

Endpoints (``<ns>.storage.trend``, ``<ns>.storage.target_history``), MessagePack bodies of the
structs below, errors as the other storage endpoints (400 with the reason):

* ``trend``: per bucket of ``bucket_s`` seconds (aligned to the Unix epoch, so a day is a UTC day)
  over the builds that *finished* in ``[since, until)`` and match the filters: builds by outcome,
  success rate (succeeded / builds that were not cancelled or unknown, as ``buildtel report``),
  build-time p50/p95 (linear interpolation, as the report; cancelled and unknown builds left
  out), cache hits, misses and hit rate, incomplete builds.  Empty buckets are listed (zeros, no
  rates), so a chart's x axis has no gaps that hide "no builds".
* ``target_history``: the newest ``limit`` runs of one target (sessions that ran it, matching the
  filters), newest first, keyset-paginated like ``summaries``: the session's id, time, branch,
  commit and outcome, and the target's duration, status, cache result and worker.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Annotated, Any

import msgspec
import numpy as np

from buildtel.services.storage.api import Cursor, StorageError
from buildtel.services.storage.columns import STATUSES, ReportRow
from buildtel.services.storage.index import Filters
from buildtel.services.storage.rowcache import RowCache
from buildtel.shared import micro
from buildtel.shared.protocol import Outcome
from buildtel.shared.service import BAD_REQUEST, ServiceError
from buildtel.shared.subjects import Subjects

TREND, TARGET_HISTORY = "trend", "target_history"
DAY = 86_400.0
MAX_BUCKETS = 2_000
MAX_RUNS = 10_000
RUN_BYTES = 200  # a run's encoded bytes with ids, commit, short branch and worker names (paging estimate)
CACHE_RESULTS = ("miss", "hit", "uncacheable")  # cache codes of columns.py (a hit: local or remote)

Time = Annotated[float, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class TrendRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    since: Time | None = None  # finish time, inclusive; default: until - 30 days
    until: Time | None = None  # exclusive; default: now
    bucket_s: Annotated[float, msgspec.Meta(ge=60, le=366 * DAY)] = DAY
    branch: Name | None = None
    agent: Name | None = None
    name: Name | None = None
    label: Name | None = None  # "key=value"
    target: Name | None = None


class TrendBucket(msgspec.Struct, kw_only=True):
    start: float  # Unix s, inclusive; the bucket ends at start + bucket_s
    builds: int = 0
    succeeded: int = 0
    failed: int = 0
    abandoned: int = 0
    cancelled: int = 0  # stopped by a user or a signal: not in success_rate nor the durations
    unknown: int = 0  # nothing said how they ended (imports without evidence): likewise
    incomplete: int = 0  # builds that lost events (counted in their outcome too)
    # succeeded / (builds - cancelled - unknown); None without such builds
    success_rate: float | None = None
    duration_p50_s: float | None = None
    duration_p95_s: float | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    cache_hit_rate: float | None = None  # hits / (hits + misses); None when neither


class TrendReply(msgspec.Struct, kw_only=True):
    since: float
    until: float
    bucket_s: float
    builds: int
    buckets: list[TrendBucket]
    partial: list[str] = []  # partitions that did not answer (docs/scaling.md, Partitions)


class TargetHistoryRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    target: Name
    since: Time | None = None
    until: Time | None = None
    branch: Name | None = None
    outcome: Outcome | None = None
    agent: Name | None = None
    name: Name | None = None
    label: Name | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_RUNS)] = 1000
    cursor: Cursor | None = None


class TargetRun(msgspec.Struct, kw_only=True):
    session_id: str
    t: float  # the session's finish time (its start when it has none)
    branch: str | None
    commit: str | None
    outcome: str  # the session's
    duration_s: float  # the target's
    status: str
    cache: str  # "hit", "miss" or "uncacheable"
    worker: str


class TargetHistoryReply(msgspec.Struct, kw_only=True):
    target: str
    runs: list[TargetRun]
    cursor: Cursor | None = None  # set: ask again with it for older runs
    partial: list[str] = []  # partitions that did not answer (docs/scaling.md, Partitions)


trend_decoder = msgspec.msgpack.Decoder(TrendRequest)
target_history_decoder = msgspec.msgpack.Decoder(TargetHistoryRequest)
trend_reply_decoder = msgspec.msgpack.Decoder(TrendReply)
target_history_reply_decoder = msgspec.msgpack.Decoder(TargetHistoryReply)
_enc = msgspec.msgpack.Encoder()


def _decode(decoder: Any, what: str, data: bytes) -> Any:
    try:
        req = decoder.decode(data or b"\x80")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ServiceError(BAD_REQUEST, f"bad {what} request: {exc}") from None
    if req.since is not None and req.until is not None and req.until < req.since:
        raise ServiceError(BAD_REQUEST, f"bad {what} request: until {req.until} is before since {req.since}")
    return req


# -- trend ------------------------------------------------------------------------------------
def buckets(summaries: list[Any], since: float, until: float, bucket_s: float) -> list[TrendBucket]:
    """The buckets of ``[since, until)`` (epoch-aligned) over ``summaries`` (index ``Summary``)."""
    first = np.floor(since / bucket_s) * bucket_s
    n = max(1, int(np.ceil((until - first) / bucket_s)))
    out = [TrendBucket(start=float(first + i * bucket_s)) for i in range(n)]
    if not summaries:
        return out
    t = np.fromiter((s.t for s in summaries), dtype=np.float64, count=len(summaries))
    idx = np.minimum(((t - first) // bucket_s).astype(np.int64), n - 1)
    durations: list[list[float]] = [[] for _ in range(n)]
    for s, i in zip(summaries, idx.tolist(), strict=True):
        b = out[i]
        b.builds += 1
        if s.outcome == "success":
            b.succeeded += 1
        elif s.outcome == "failed":
            b.failed += 1
        elif s.outcome == "cancelled":
            b.cancelled += 1
        elif s.outcome == "unknown":
            b.unknown += 1
        else:
            b.abandoned += 1
        if not s.complete:
            b.incomplete += 1
        b.cache_hits += s.cache_hits
        b.cache_misses += s.cache_misses
        # A cancelled or unknown build's duration is not known to be a whole build's.
        if s.duration_s > 0 and s.outcome not in ("cancelled", "unknown"):
            durations[i].append(s.duration_s)
    for b, ds in zip(out, durations, strict=True):
        if rated := b.builds - b.cancelled - b.unknown:
            b.success_rate = b.succeeded / rated
        if ds:
            p50, p95 = np.percentile(np.asarray(ds), [50, 95], method="linear").tolist()
            b.duration_p50_s, b.duration_p95_s = float(p50), float(p95)
        if b.cache_hits + b.cache_misses:
            b.cache_hit_rate = b.cache_hits / (b.cache_hits + b.cache_misses)
    return out


async def serve_trend(store: Any, data: bytes) -> bytes:
    req: TrendRequest = _decode(trend_decoder, TREND, data)
    until = req.until if req.until is not None else time.time()
    since = req.since if req.since is not None else max(0.0, until - 30 * DAY)
    if (until - since) / req.bucket_s > MAX_BUCKETS:
        raise ServiceError(BAD_REQUEST, f"bad trend request: {until - since:.0f} s in buckets of {req.bucket_s:.0f} s "
                                        f"is more than {MAX_BUCKETS} buckets; ask for larger buckets")
    f = Filters(branch=req.branch, agent=req.agent, name=req.name, label=req.label, target=req.target,
                since=since, until=until)
    summaries, _ = await store.summaries(f, desc=False, limit=sys.maxsize)
    out = await asyncio.to_thread(buckets, summaries, since, until, req.bucket_s)
    return _enc.encode(TrendReply(since=since, until=until, bucket_s=req.bucket_s, builds=len(summaries),
                                  buckets=out))


# -- one target's runs ------------------------------------------------------------------------
def runs_of(cache: RowCache, target: str, summaries: list[Any], read: Any) -> list[TargetRun]:
    """The target's run in each session (report rows; a session lacking it is left out: a name-hash
    collision in the index)."""
    spent = [0]
    out = []
    for s in summaries:
        e = cache.entry_of(s, read, spent)
        tid = cache.names.get(target)
        if e is None or tid is None:
            continue
        try:
            k = len(e.ids) - 1 - e.ids[::-1].index(tid)  # the last run of a name wins, as in the session
        except ValueError:
            continue
        row: ReportRow = e.row
        code = e.codes[k]
        out.append(TargetRun(session_id=row.id, t=s.t, branch=row.branch, commit=row.commit, outcome=row.outcome,
                             duration_s=e.durations[k], status=STATUSES[code >> 2], cache=CACHE_RESULTS[code & 3],
                             worker=cache.names.order[e.workers[k]]))
    return out


async def serve_target_history(store: Any, cache: RowCache, data: bytes, budget: int) -> bytes:
    """One page: at most ``limit`` runs, and no more than a reply of ``budget`` bytes holds (cut
    short with a cursor after the last run it holds)."""
    req: TargetHistoryRequest = _decode(target_history_decoder, TARGET_HISTORY, data)
    f = Filters(outcome=req.outcome, branch=req.branch, agent=req.agent, name=req.name, label=req.label,
                target=req.target, since=req.since, until=req.until)
    limit = max(1, min(req.limit, budget // RUN_BYTES))
    summaries, cursor = await store.summaries(f, desc=True, limit=limit,
                                              cursor=(req.cursor.t, req.cursor.id) if req.cursor else None)
    runs = await asyncio.to_thread(runs_of, cache, req.target, summaries, store.read_summary)
    while True:
        out = _enc.encode(TargetHistoryReply(target=req.target, runs=runs, cursor=Cursor(*cursor) if cursor else None))
        if len(out) <= budget or len(runs) <= 1:
            return out
        runs = runs[:len(runs) * budget // len(out) * 9 // 10 or 1]  # long names: fewer runs, then the rest
        cursor = (runs[-1].t, runs[-1].session_id)


# -- clients ----------------------------------------------------------------------------------
async def trend(nc: Any, subjects: Subjects, req: TrendRequest, *, timeout: float = 10.0) -> TrendReply:
    """Ask the storage service for a trend (raises ``StorageError``: 503 none answering, 400 bad)."""
    data = await micro.request(nc, subjects.endpoint("storage", TREND), _enc.encode(req), timeout=timeout,
                               service="storage service", error=StorageError)
    return trend_reply_decoder.decode(data)


async def target_history(nc: Any, subjects: Subjects, req: TargetHistoryRequest, *, limit: int | None = None,
                         timeout: float = 10.0) -> TargetHistoryReply:
    """One target's newest runs, following cursors up to ``limit`` (default: the request's)."""
    want = limit if limit is not None else req.limit
    runs: list[TargetRun] = []
    partial: set[str] = set()
    cursor = req.cursor
    while True:
        page_req = msgspec.structs.replace(req, cursor=cursor, limit=min(MAX_RUNS, want - len(runs)))
        data = await micro.request(nc, subjects.endpoint("storage", TARGET_HISTORY), _enc.encode(page_req),
                                   timeout=timeout, service="storage service", error=StorageError)
        page = target_history_reply_decoder.decode(data)
        runs += page.runs
        partial.update(page.partial)
        cursor = page.cursor
        if cursor is None or len(runs) >= want:
            return TargetHistoryReply(target=req.target, runs=runs[:want], cursor=cursor, partial=sorted(partial))
