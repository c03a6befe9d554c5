"""A bounded cache of report rows in the storage process: each session's row and columns, decoded once.

Reducing a stored 200-target session to its report row costs ~0.2 ms (decoding the partial view,
building the columns); the columns of a report of 10,000 sessions would cost 2 s each time.
The cache keeps, per session, the :class:`Entry` that reduction made (~3.8 KB for 200 targets:
its row, name ids into one interning table, durations and code bytes), least recently used
dropped first beyond ``max_bytes``.  It fills as reports read sessions, and a warm-up pass
(:func:`warm`) fills it with the newest sessions after the store opens.

Entries are keyed by (session id, stored length): a session's stored bytes never change (the
store is idempotent by id), and the length tells a session stored again under the same id
(after retention dropped the first) apart.  The id is read from the record's first bytes
(:func:`peek_id`) so a cached session costs no decode at all.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from array import array
from collections import OrderedDict
from operator import attrgetter
from typing import Any, NamedTuple

import msgspec
import structlog

from buildtel.services.storage.api import Cursor
from buildtel.services.storage.columns import CACHE_CODES, STATUS_CODES, ColumnsReply, ColumnsRequest, ReportRow
from buildtel.services.storage.index import Filters
from buildtel.shared.protocol import CacheResult, HealthCheckpoint, SessionTotals, TargetStatus
from buildtel.shared.service import TOO_LARGE, ServiceError

DEFAULT_MAX_BYTES = 128 * 1024 * 1024
SCAN_BYTES = 64 * 1024 * 1024  # stored bytes one request reads at most (filters that match little)
_NAMES_RESERVE = 256 * 1024  # name tables up to this size are counted whole in every page's estimate
_ROW_BYTES = 160  # a row without its strings and health checkpoint, encoded (an estimate for paging)
_TARGET_BYTES = 13  # 4 + 8 + 1
WARM_CHUNK = 256
_ENTRY_OVERHEAD = 1100  # row object, strings, array headers, dict slot: 3.76 KB an entry of 200 targets (tracemalloc)
_name, _dur, _status, _cache = (attrgetter("name"), attrgetter("duration_s"), attrgetter("status"),
                                attrgetter("cache"))
_STATUS_BITS = {k: v << 2 for k, v in STATUS_CODES.items()}
Key = tuple[str, int]
_PREFIX = b"\xa4type\xa7session\xa2id"  # "type": "session", "id" as msgpack fixstrs
log = structlog.get_logger("buildtel.storage")


class _Target(msgspec.Struct, array_like=True, gc=False):
    """The first six fields of ``TargetMetrics`` (array_like: the rest of the array is skipped)."""

    name: str
    start: float = 0.0
    end: float = 0.0
    duration_s: float = 0.0
    status: TargetStatus = "success"
    cache: CacheResult = "miss"


class _MapTarget(msgspec.Struct, gc=False):
    """A target as records written before ``TargetMetrics`` became array_like encoded it."""

    name: str = ""
    duration_s: float = 0.0
    status: TargetStatus = "success"
    cache: CacheResult = "miss"


class _Vcs(msgspec.Struct, gc=False):
    branch: str | None = None
    commit: str | None = None


class _Env(msgspec.Struct, gc=False):
    vcs: _Vcs | None = None


class _Completeness(msgspec.Struct, gc=False):
    complete: bool = True


class _ViewBase(msgspec.Struct, kw_only=True, tag="session", tag_field="type", gc=False):
    """The fields of ``BuildSession`` a report reads, same names and defaults; the rest is skipped."""

    id: str
    name: str = ""
    start: float = 0.0
    finish: float = 0.0
    duration_s: float = 0.0
    outcome: str = "success"
    environment: _Env | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    cache_hit_rate: float = 0.0
    totals: SessionTotals = msgspec.field(default_factory=SessionTotals)
    health: HealthCheckpoint | None = None
    completeness: _Completeness | None = None


class ReportView(_ViewBase, kw_only=True, tag="session", tag_field="type", gc=False):
    targets: list[_Target] = []


class _AnyTargetsView(_ViewBase, kw_only=True, tag="session", tag_field="type", gc=False):
    # Arrays as the protocol encodes targets now, maps as records written before TargetMetrics
    # became array_like (a second, slower decoder: only such records pay for it).
    targets: list[_Target | dict[str, msgspec.Raw]] = []


view_decoder = msgspec.msgpack.Decoder(ReportView)
_any_view_decoder = msgspec.msgpack.Decoder(_AnyTargetsView)
_map_target = msgspec.msgpack.Decoder(_MapTarget)
_enc = msgspec.msgpack.Encoder()


def decode_view(payload: bytes) -> tuple[_ViewBase, list[Any]]:
    """The view of a stored session and its targets (objects with name, duration_s, status, cache)."""
    try:
        v = view_decoder.decode(payload)
        return v, v.targets
    except msgspec.ValidationError:
        w = _any_view_decoder.decode(payload)
    # Old map-encoded targets: re-encode the few fields read and decode them as a struct.
    return w, [t if isinstance(t, _Target) else _map_target.decode(_enc.encode(t)) for t in w.targets]


class Entry(NamedTuple):
    row: ReportRow
    ids: array[int]  # 'I': ids into RowCache.names, one per target in stored order
    durations: array[float]  # 'd'
    codes: bytes  # cache code | status code << 2 (columns.py)
    size: int  # bytes it holds, about


class _Interner(dict):  # type: ignore[type-arg]
    """name -> id; ``order`` lists the names by id and ``bytes`` sums their lengths."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []
        self.bytes = 0

    def __missing__(self, key: str) -> int:
        v = self[key] = len(self)
        self.order.append(key)
        self.bytes += len(key) + 5
        return v


def peek_id(payload: bytes) -> Key | None:
    """(id, length) from a record's first bytes: a map whose first keys are ``type: "session"`` and
    ``id`` (msgspec writes the tag first, then ``BuildSession.id``); None for any other layout."""
    b = payload
    head = b[0] if b else 0
    if 0x80 <= head <= 0x8F:
        i = 1
    elif head == 0xDE:
        i = 3
    elif head == 0xDF:
        i = 5
    else:
        return None
    if b[i:i + len(_PREFIX)] != _PREFIX:
        return None
    i += len(_PREFIX)
    if i >= len(b):
        return None
    h = b[i]
    if 0xA0 <= h <= 0xBF:
        n, i = h - 0xA0, i + 1
    elif h == 0xD9 and i + 1 < len(b):
        n, i = b[i + 1], i + 2
    else:
        return None
    raw = b[i:i + n]
    if len(raw) != n:
        return None
    try:
        return raw.decode("utf-8"), len(payload)
    except UnicodeDecodeError:
        return None


class RowCache:
    """Session key -> :class:`Entry`, LRU within ``max_bytes``.  Requests and the warm-up call
    :meth:`entry` from worker threads: a lock keeps the table and the name ids consistent."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Key, Entry] = OrderedDict()
        self.bytes = 0
        # Target names seen, never dropped: a farm has thousands, not millions, of distinct names.
        self.names = _Interner()
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def entry(self, payload: bytes) -> Entry:
        key = peek_id(payload)
        with self._lock:
            if key is not None:
                got = self.entries.get(key)
                if got is not None:
                    self.entries.move_to_end(key)
                    self.hits += 1
                    return got
            self.misses += 1
            e = self.reduce(payload)
            self._put(key or (e.row.id, len(payload)), e)
            return e

    def reduce(self, payload: bytes) -> Entry:
        """The entry of one stored session, from its partial view."""
        v, ts = decode_view(payload)
        ids = array("I", map(self.names.__getitem__, map(_name, ts)))
        durations = array("d", map(_dur, ts))
        codes = bytes(map(CACHE_CODES.__getitem__, map(_cache, ts)))
        statuses = list(map(_status, ts))
        if statuses.count("success") != len(statuses):  # rare: only then is the status merged in
            codes = bytes(c | _STATUS_BITS[st] for c, st in zip(codes, statuses, strict=True))
        vcs = v.environment.vcs if v.environment is not None else None
        row = ReportRow(id=v.id, name=v.name, start=v.start, finish=v.finish, duration_s=v.duration_s,
                        outcome=sys.intern(v.outcome), branch=vcs.branch if vcs else None,
                        commit=vcs.commit if vcs else None,
                        complete=v.completeness is None or v.completeness.complete, cache_hits=v.cache_hits,
                        cache_misses=v.cache_misses, cache_hit_rate=v.cache_hit_rate, totals=v.totals,
                        targets=len(ts), health=v.health)
        size = _ENTRY_OVERHEAD + 13 * len(ts) + len(v.id) + len(v.name)
        if v.health is not None:
            size += 400 + sum(len(r) + 50 for r in v.health.reasons)
        return Entry(row, ids, durations, codes, size)

    def _put(self, key: Key, e: Entry) -> None:
        if e.size > self.max_bytes:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self.entries[key] = e
        self.bytes += e.size
        while self.bytes > self.max_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= dropped.size

    def full(self) -> bool:
        return self.bytes >= self.max_bytes * 0.95


def _reduce_all(cache: RowCache, payloads: list[bytes]) -> None:
    for p in payloads:
        cache.entry(p)


async def warm(store: Any, cache: RowCache, stopping: Any) -> int:
    """Reduce the newest stored sessions into ``cache`` until it is full or every session is in;
    how many were reduced.  Runs beside the service's requests (chunks, in a thread each)."""
    cursor = None
    n = 0
    while not cache.full() and not stopping.is_set():
        page = await store.page(Filters(), desc=True, limit=WARM_CHUNK, cursor=cursor)
        await asyncio.to_thread(_reduce_all, cache, page.payloads)
        n += len(page.payloads)
        if page.cursor is None:
            break
        cursor = page.cursor
    log.info("storage.row_cache_warm", sessions=n, bytes=cache.bytes, max_bytes=cache.max_bytes)
    return n


# -- pages of the columns endpoint ---------------------------------------------------------------
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
        e = self.cache.entry(payload)
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


def _add_all(b: PageBuilder, payloads: list[bytes], budget: int, per_session: list[int]) -> int:
    """Add payloads while the reply stays within ``budget``; how many were consumed.
    ``per_session`` is [sessions added, their bytes, the largest]: the estimates that size chunks."""
    for i, payload in enumerate(payloads):
        if b.rows and b.last is not None and b.size + per_session[2] > budget:
            return i  # the next one might not fit: resume after the last row
        added = b.add(payload)
        if added is not None:
            per_session[0] += 1
            per_session[1] += added
            per_session[2] = max(per_session[2], added)
    return len(payloads)


async def serve_page(store: Any, req: ColumnsRequest, budget: int, cache: RowCache | None = None) -> bytes:
    """One reply of the ``columns`` endpoint from ``store`` (a ``TelemetryStorage``): stored records
    are read through ``store.page`` in small chunks and reduced to rows as they come, so the
    request holds one chunk of whole records at a time, and the reply stays within ``budget``."""
    f = Filters(outcome=req.outcome, branch=req.branch, agent=req.agent, target=req.target, since=req.since,
                until=req.until)
    b = PageBuilder(req, cache)
    cursor: tuple[float, str] | None = (req.cursor.t, req.cursor.id) if req.cursor else None
    per_session = [1, _ROW_BYTES, _ROW_BYTES]
    scanned = 0
    out: Cursor | None = None
    while True:
        room = req.limit - len(b.rows)
        avg = per_session[1] / per_session[0]
        chunk = max(1, min(room, 512, int((budget - b.size) // max(avg, 1.0))))
        page = await store.page(f, desc=True, limit=chunk, cursor=cursor)
        used = await asyncio.to_thread(_add_all, b, page.payloads, budget, per_session)
        if used < len(page.payloads):
            out = b.last  # stopped for size: resume after the last row taken
            break
        cursor = page.cursor
        scanned += sum(map(len, page.payloads))
        if cursor is None:
            break  # nothing more matches
        if len(b.rows) >= req.limit or scanned >= SCAN_BYTES:
            out = Cursor(*cursor)
            break
    data = await asyncio.to_thread(b.encode, out)
    if len(data) > budget:
        raise ServiceError(TOO_LARGE, f"the report rows of session {b.rows[-1].id} are {len(data)} bytes, more "
                                      f"than one reply may carry ({budget})")
    return data
