"""Where a report's sessions come from: the analyzer's own bounded history in Redis, else storage.

Every session the analyzer folds is also added (idempotently, by id) to a sorted
set by finish time plus a hash of its MessagePack bytes, trimmed to the newest
``cap`` (``BUILDER_TELEMETRY_MAX_SESSIONS``, default 1000).  Reports are served
from there, so the analyzer answers without the storage service and every
replica sees the same history.  When a request reaches further back than the
history holds, the storage service's query API (``StorageClient``) is asked; if
no storage service answers, the report is built from what the history has and
marked ``partial``.
"""

from __future__ import annotations

from typing import Any

from buildtel.services.analyzer.analytics import ReportFilter, select
from buildtel.services.analyzer.columns import gc_paused
from buildtel.shared.codec import decode_session
from buildtel.shared.keys import Keys
from buildtel.shared.protocol import BuildSession

CHUNK = 200  # HMGET size: bounded replies, Redis not blocked for long

class History:
    def __init__(self, redis: Any, keys: Keys, cap: int) -> None:
        self.r = redis
        self.cap = cap
        self.zset = keys.analyzer("history")
        self.data = keys.analyzer("history:data")
        self.stats = keys.analyzer("stats")

    async def add(self, script: Any, session: BuildSession, raw: bytes) -> bool:
        return bool(await script(keys=[self.zset, self.data, self.stats],
                                 args=[session.id, repr(session.finish), raw, self.cap]))

    async def count(self) -> int:
        return int(await self.r.zcard(self.zset))

    async def oldest_finish(self) -> float | None:
        first = await self.r.zrange(self.zset, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def raw(self, f: ReportFilter) -> list[bytes]:
        """Stored bytes of the sessions the filter's window can include (finish time order)."""
        lo = "-inf" if f.since is None else repr(f.since)
        hi = "+inf" if f.until is None else f"({f.until!r}"
        unfiltered = f.branch is None and f.outcome is None and f.name is None and f.target is None
        if f.last is not None and unfiltered:
            ids = await self.r.zrevrangebyscore(self.zset, hi, lo, start=0, num=max(f.last, 0))
        else:
            ids = await self.r.zrangebyscore(self.zset, lo, hi)
        out: list[bytes] = []
        for i in range(0, len(ids), CHUNK):
            out.extend(v for v in await self.r.hmget(self.data, ids[i:i + CHUNK]) if v is not None)
        return out

    @staticmethod
    def decode_select(raws: list[bytes], f: ReportFilter) -> list[BuildSession]:
        with gc_paused():
            return select((decode_session(r) for r in raws), f)

    async def covers(self, f: ReportFilter, matched: int) -> bool:
        """Whether the history certainly holds every session ``f`` asks for, given it matched ``matched``."""
        if await self.count() < self.cap:
            return True  # never trimmed: it holds everything the analyzer has seen
        if f.last is not None and matched >= f.last:
            return True
        oldest = await self.oldest_finish()
        return f.since is not None and oldest is not None and f.since >= oldest

    async def load(self, f: ReportFilter) -> tuple[list[BuildSession], bool]:
        """(matching sessions, whether the history certainly holds all of them)."""
        import asyncio

        raws = await self.raw(f)
        sessions = await asyncio.to_thread(self.decode_select, raws, f)
        return sessions, await self.covers(f, len(sessions))


async def from_storage(nc: Any, namespace: str, f: ReportFilter, timeout: float) -> list[BuildSession]:
    """The window from the storage service (raises ``StorageError``; 503 when none runs)."""
    import time

    from buildtel.services.storage.api import MAX_ITEMS, StorageClient
    from buildtel.shared.subjects import Subjects

    client = StorageClient(nc, Subjects(namespace), timeout=timeout)
    if f.last is not None:
        got = await client.query(outcome=f.outcome, branch=f.branch, target=f.target, since=f.since,
                                 until=f.until, limit=min(f.last, 10 * MAX_ITEMS))
    else:
        got = await client.range(f.since or 0.0, f.until if f.until is not None else time.time() + 86400.0)
    with gc_paused():
        return select(got, f)
