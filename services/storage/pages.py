"""Pages of the storage service's ``columns`` endpoint (``columns.py``): report rows of the sessions
a request's filters select, newest first, bounded in bytes and in the work one request does.

The index (``index.py``) chooses the sessions without reading a record; each one's row and columns
come from the row cache (``rowcache.py``), which takes them from its memory, a segment's report-row
file, or, failing both, the record itself.  A request stops after reading ``SCAN_BYTES`` from disk
or looking at ``SCAN_SESSIONS`` sessions (a filter the index cannot decide exactly, such as the VCS
branch against a "branch" label, may have to look at much of the history) and answers with a
cursor to go on from.
"""

from __future__ import annotations

import asyncio
from array import array
from typing import Any

import msgspec

from buildtel.services.storage.api import Cursor
from buildtel.services.storage.columns import ColumnsReply, ColumnsRequest, ReportRow
from buildtel.services.storage.index import Filters
from buildtel.services.storage.rowcache import Entry, RowCache
from buildtel.shared.service import TOO_LARGE, ServiceError

SCAN_BYTES = 64 * 1024 * 1024  # bytes one request reads from disk at most (filters that match little)
SCAN_SESSIONS = 200_000  # and sessions it looks at, per chunk (cached ones a filter the index cannot decide drops)
_NAMES_RESERVE = 256 * 1024  # name tables up to this size are counted whole in every page's estimate
_ROW_BYTES = 160  # a row without its strings and health checkpoint, encoded (an estimate for paging)
_TARGET_BYTES = 13  # 4 + 8 + 1
_enc = msgspec.msgpack.Encoder()


class PageBuilder:
    """Accumulates rows and columns of one reply; ``size`` estimates its encoded bytes.  Sessions
    are reduced through ``cache`` (``rowcache.RowCache``; a private one when none is given)."""

    def __init__(self, req: ColumnsRequest, cache: RowCache | None = None) -> None:
        self.req = req
        self.cache = cache if cache is not None else RowCache()
        self.rows: list[ReportRow] = []
        self.ids = array("I")  # ids of cache.names; encode() renumbers them into the page's own table
        self.durations = array("d")
        self.codes = bytearray()
        # The page's name table: the whole cache's (an upper bound) when that is small, else counted.
        self.names_bytes = 0
        self.seen: set[int] | None = set() if self.cache.names.bytes > _NAMES_RESERVE else None
        self.size = 64
        self.last: Cursor | None = None  # key of the last row added, when it has one

    def matches(self, r: ReportRow) -> bool:
        """The filters storage's index cannot decide exactly (name, VCS branch, finish bounds)."""
        q = self.req
        if q.name is not None and r.name != q.name:
            return False
        if q.branch is not None and r.branch != q.branch:
            return False  # the index also matches a "branch" label; reports mean the VCS branch
        if q.since is not None and r.finish < q.since:
            return False
        return q.until is None or r.finish < q.until

    def add(self, payload: bytes) -> int | None:
        """Add one stored session; its estimated bytes, or None when the filters leave it out."""
        return self.add_entry(self.cache.entry(payload))

    def add_entry(self, e: Entry) -> int | None:
        """Add one session's entry; its estimated bytes, or None when the filters leave it out."""
        r = e.row
        if not self.matches(r):
            return None
        if self.req.target is not None:
            tid = self.cache.names.get(self.req.target)
            if tid is None or tid not in e.ids:
                return None  # a 32-bit hash collision in the index
        self.rows.append(r)
        self.ids += e.ids
        self.durations += e.durations
        self.codes += e.codes
        added = _ROW_BYTES + len(r.id) + len(r.name) + 2 * 40 + _TARGET_BYTES * r.targets
        if r.health is not None:
            added += 256 + sum(len(x) + 3 for x in r.health.reasons)
        if self.seen is not None:
            new = set(e.ids) - self.seen
            if new:
                self.seen |= new
                order = self.cache.names.order
                added += sum(len(order[i]) + 5 for i in new)
        elif not self.names_bytes:
            self.names_bytes = self.cache.names.bytes
            added += self.names_bytes
        self.size += added
        # Storage orders by finish (start when there is none): the key to resume after this row.
        t = r.finish if r.finish > 0 else r.start
        self.last = Cursor(t, r.id) if t > 0 else None
        return added

    def encode(self, cursor: Cursor | None) -> bytes:
        import numpy as np

        order = self.cache.names.order
        ids = np.frombuffer(self.ids, dtype=np.uint32)
        used = np.flatnonzero(np.bincount(ids, minlength=len(order))) if len(ids) else ids
        lut = np.zeros(len(order), dtype="<u4")
        lut[used] = np.arange(len(used), dtype="<u4")
        durs = np.frombuffer(self.durations, dtype=np.float64).astype("<f8")
        return _enc.encode(ColumnsReply(sessions=self.rows, names=[order[i] for i in used.tolist()],
                                        name_ids=lut[ids].tobytes(), durations=durs.tobytes(),
                                        codes=bytes(self.codes), cursor=cursor))


def _add_all(b: PageBuilder, summaries: list[Any], read: Any, budget: int, per_session: list[int],
             spent: list[int]) -> int:
    """Add sessions while the reply stays within ``budget`` and the bytes read within
    ``SCAN_BYTES``; how many summaries were consumed.  ``per_session`` is [sessions added, their
    bytes, the largest]: the estimates that size chunks."""
    for i, s in enumerate(summaries):
        if b.rows and b.last is not None and (b.size + per_session[2] > budget or spent[0] >= SCAN_BYTES):
            return i  # the next one might not fit: resume after the last row
        e = b.cache.entry_of(s, read, spent)
        if e is None:
            continue  # damaged since it was indexed: the store logged it
        added = b.add_entry(e)
        if added is not None:
            per_session[0] += 1
            per_session[1] += added
            per_session[2] = max(per_session[2], added)
    return len(summaries)


async def serve_page(store: Any, req: ColumnsRequest, budget: int, cache: RowCache | None = None) -> bytes:
    """One reply of the ``columns`` endpoint from ``store`` (a ``TelemetryStorage``): the index
    picks the sessions in small chunks and each becomes its entry (``RowCache.entry_of``), so the
    request holds no whole records beyond the few it reduces, and the reply stays within ``budget``."""
    f = Filters(outcome=req.outcome, branch=req.branch, agent=req.agent, name=req.name, target=req.target,
                since=req.since, until=req.until)
    b = PageBuilder(req, cache)
    cursor: tuple[float, str] | None = (req.cursor.t, req.cursor.id) if req.cursor else None
    per_session = [1, _ROW_BYTES, _ROW_BYTES]
    spent = [0]
    visited = 0
    out: Cursor | None = None
    while True:
        room = req.limit - len(b.rows)
        avg = per_session[1] / per_session[0]
        chunk = max(1, min(room, 2048, int((budget - b.size) // max(avg, 1.0))))
        summaries, cursor = await store.summaries(f, desc=True, limit=chunk, cursor=cursor)
        used = await asyncio.to_thread(_add_all, b, summaries, store.read_summary, budget, per_session, spent)
        if used < len(summaries):
            out = b.last  # stopped for size or for the bytes read: resume after the last row taken
            break
        if cursor is None:
            break  # nothing more matches
        visited += len(summaries)
        if len(b.rows) >= req.limit or spent[0] >= SCAN_BYTES or visited >= SCAN_SESSIONS:
            out = Cursor(*cursor)
            break
    data = await asyncio.to_thread(b.encode, out)
    if len(data) > budget:
        raise ServiceError(TOO_LARGE, f"the report rows of session {b.rows[-1].id} are {len(data)} bytes, more "
                                      f"than one reply may carry ({budget})")
    return data


def _row_key(r: ReportRow) -> tuple[float, str]:
    """The store's order key of a row (finish, else start), as :meth:`PageBuilder.add_entry` has it."""
    return (r.finish if r.finish > 0 else r.start, r.id)


def merge_columns(replies: list[ColumnsReply], *, limit: int, budget: int, partial: list[str]) -> ColumnsReply:
    """One page of several partitions' pages (``router.py``), newest first: rows are taken while
    every partition that may hold more has shown a row at or past them, within ``limit`` and an
    estimate of ``budget`` bytes; each row's target columns come along, their names renumbered
    into the merged page's own table."""
    items: list[tuple[tuple[float, str], ReportRow, array[int], ColumnsReply, int]] = []
    horizons = [(r.cursor.t, r.cursor.id) for r in replies if r.cursor is not None]
    for r in replies:
        ids = array("I")
        ids.frombytes(r.name_ids)
        off = 0
        for row in r.sessions:
            items.append((_row_key(row), row, ids, r, off))
            off += row.targets
    items.sort(key=lambda it: it[0], reverse=True)
    horizon = max(horizons) if horizons else None
    rows: list[ReportRow] = []
    names: dict[str, int] = {}
    out_ids = array("I")
    durations, codes = bytearray(), bytearray()
    size, more, last = 64, horizon is not None, None
    for key, row, ids, page, off in items:
        if horizon is not None and key < horizon:
            break
        n = row.targets
        fresh = {page.names[i] for i in ids[off:off + n]} - names.keys()
        est = _ROW_BYTES + len(row.id) + len(row.name) + 80 + _TARGET_BYTES * n + sum(len(x) + 5 for x in fresh)
        if rows and (len(rows) >= limit or size + est > budget):
            more = True
            break
        size += est
        rows.append(row)
        for i in ids[off:off + n]:
            out_ids.append(names.setdefault(page.names[i], len(names)))
        durations += page.durations[off * 8:(off + n) * 8]
        codes += page.codes[off:off + n]
        last = key
    cursor = Cursor(*last) if more and last is not None else (Cursor(*horizon) if more and horizon else None)
    return ColumnsReply(sessions=rows, names=list(names), name_ids=out_ids.tobytes(), durations=bytes(durations),
                        codes=bytes(codes), cursor=cursor, partial=partial)
