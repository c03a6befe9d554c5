"""A bounded cache of report rows in the storage process: each session's row and columns, made once.

Reducing a stored 200-target session to its report row costs ~0.2 ms (decoding the partial view,
building the columns); the columns of a report of 10,000 sessions would cost 2 s each time.
The cache keeps, per session, the :class:`Entry` that reduction made (~4.6 KB for 200 targets:
its row, name and worker ids into one interning table, durations and code bytes), least
recently used dropped first beyond ``max_bytes``.

An entry comes from, in this order: the cache; the report-row file of the session's sealed
segment (``rowfile.py``, loaded whole: every session of that segment enters the cache); else
the stored record, reduced here.  :meth:`RowCache.body_for` makes a row file's contents from
entries, for the background worker that writes them (``rowwork.py``).

Entries are keyed by (session id, stored length): a session's stored bytes never change (the
store is idempotent by id), and the length tells a session stored again under the same id
(after retention dropped the first) apart.  The id is read from the record's first bytes
(:func:`peek_id`) so a cached session costs no decode at all.  A session stored again with
exactly the same length would share the key: an entry found for an index ``Summary`` is used
only when its row agrees with the summary (times, outcome, cache counts), else it is made again.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable
from operator import attrgetter
from typing import Any, NamedTuple

import msgspec
import numpy as np
import structlog

from buildtel.services.storage import rowfile
from buildtel.services.storage.columns import CACHE_CODES, STATUS_CODES, ReportRow
from buildtel.services.storage.index import Filters
from buildtel.shared.protocol import CacheResult, HealthCheckpoint, SessionTotals, TargetStatus

DEFAULT_MAX_BYTES = 128 * 1024 * 1024
WARM_CHUNK = 256
_ENTRY_OVERHEAD = 1100  # row object, strings, array headers, dict slot: 3.76 KB an entry of 200 targets (tracemalloc)
_name, _dur, _status, _cache, _worker = (attrgetter("name"), attrgetter("duration_s"), attrgetter("status"),
                                         attrgetter("cache"), attrgetter("worker"))
_STATUS_BITS = {k: v << 2 for k, v in STATUS_CODES.items()}
Key = tuple[str, int]
_PREFIX = b"\xa4type\xa7session\xa2id"  # "type": "session", "id" as msgpack fixstrs
log = structlog.get_logger("buildtel.storage")


class _Target(msgspec.Struct, array_like=True, gc=False):
    """The first seven fields of ``TargetMetrics`` (array_like: the rest of the array is skipped)."""

    name: str
    start: float = 0.0
    end: float = 0.0
    duration_s: float = 0.0
    status: TargetStatus = "success"
    cache: CacheResult = "miss"
    worker: str = ""


class _MapTarget(msgspec.Struct, gc=False):
    """A target as records written before ``TargetMetrics`` became array_like encoded it."""

    name: str = ""
    duration_s: float = 0.0
    status: TargetStatus = "success"
    cache: CacheResult = "miss"
    worker: str = ""


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
    workers: array[int]  # 'I': ids into RowCache.names of each target's worker


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
        self.rows_loaded = 0  # row files read
        self.no_rows: dict[tuple[int, float, int], str] = {}  # sealed segments without a usable row file: why
        self.wake: Callable[[], None] | None = None  # called (from any thread) when a row file is refused
        self._lock = threading.Lock()

    def entry(self, payload: bytes, summary: Any = None) -> Entry:
        """The entry of one stored record; ``summary`` (its index summary), when given, must
        agree with a cached entry for it to be used (:func:`_agrees`)."""
        key = peek_id(payload)
        with self._lock:
            if key is not None:
                got = self.entries.get(key)
                if got is not None and summary is not None and not _agrees(got.row, summary):
                    got = None
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
        workers = array("I", map(self.names.__getitem__, map(_worker, ts)))
        return Entry(row, ids, durations, codes, _size(row), workers)

    def lookup_or_reduce(self, payload: bytes) -> Entry:
        """The cached entry of a stored session, else its reduction (not added to the cache,
        nothing counted: for a row file written in the background)."""
        key = peek_id(payload)
        with self._lock:
            got = self.entries.get(key) if key is not None else None
            return got if got is not None else self.reduce(payload)

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

    def _drop(self, key: Key) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size

    def full(self) -> bool:
        return self.bytes >= self.max_bytes * 0.95

    # -- entries by summary: the cache, else the segment's row file, else the record -------------
    def entry_of(self, s: Any, read: Any, spent: list[int]) -> Entry | None:
        """The entry of the session an index ``Summary`` describes; ``read(s)`` gives its stored
        bytes (None when damaged: no entry).  Adds the bytes read from disk to ``spent[0]``."""
        key = (s.id, s.length)
        with self._lock:
            got = self.entries.get(key)
            if got is not None and _agrees(got.row, s):
                self.entries.move_to_end(key)
                self.hits += 1
                return got
            if got is not None:  # another version of the session had this key: make it again
                self._drop(key)
            seg = s.segment
            if seg is not None and seg.wfd < 0 and _seg_key(seg) not in self.no_rows:
                e = self._load_rows(seg, key, spent)
                if e is not None and _agrees(e.row, s):
                    return e
                if e is not None:
                    self._drop(key)
        payload = read(s)
        if payload is None:
            return None
        spent[0] += len(payload)
        return self.entry(payload, s)

    def _load_rows(self, seg: Any, key: Key, spent: list[int]) -> Entry | None:
        """Every entry of ``seg``'s row file into the cache (the lock is held); ``key``'s, or None."""
        try:
            st = os.fstat(seg.fd)
            body = rowfile.read(seg.path, seg.number, seg.created, st.st_size, st.st_mtime_ns)
        except OSError as exc:
            body = f"unreadable: {exc}"
        if isinstance(body, str):
            self.no_rows[_seg_key(seg)] = body
            if self.wake is not None:
                self.wake()  # the row-file worker writes it (again)
            return None
        self.rows_loaded += 1
        spent[0] += len(body.name_ids) + len(body.durations) + len(body.codes) + len(body.worker_ids)
        found = None
        for k, e in self.from_body(body):
            if k not in self.entries:
                self._put(k, e)
            if k == key:
                found = e
        if found is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return found

    def from_body(self, body: rowfile.Body) -> list[tuple[Key, Entry]]:
        """The entries a row file holds (its name ids mapped onto this cache's table)."""
        lut = np.fromiter(map(self.names.__getitem__, body.names), dtype=np.uint32, count=len(body.names))
        ids = lut[np.frombuffer(body.name_ids, dtype="<u4")] if body.names else np.zeros(0, np.uint32)
        wids = lut[np.frombuffer(body.worker_ids, dtype="<u4")] if body.names else np.zeros(0, np.uint32)
        ids_b, wids_b = ids.astype(np.uint32).tobytes(), wids.astype(np.uint32).tobytes()
        durs = np.frombuffer(body.durations, dtype="<f8").astype(np.float64).tobytes()
        out = []
        pos = 0
        for row, n, length in zip(body.rows, rowfile.u32(body.counts), rowfile.u32(body.lengths), strict=True):
            a, w, d = array("I"), array("I"), array("d")
            a.frombytes(ids_b[4 * pos:4 * (pos + n)])
            w.frombytes(wids_b[4 * pos:4 * (pos + n)])
            d.frombytes(durs[8 * pos:8 * (pos + n)])
            out.append(((row.id, length), Entry(row, a, d, body.codes[pos:pos + n], _size(row), w)))
            pos += n
        return out

    def body_for(self, entries: list[tuple[int, Entry]]) -> rowfile.Body:
        """A row file's contents: (stored length, entry) per session in file order."""
        with self._lock:
            order = self.names.order
        local: dict[int, int] = {}
        ids, wids, counts, lengths = array("I"), array("I"), array("I"), array("I")
        durs = array("d")
        codes = bytearray()
        for length, e in entries:
            ids.extend(local.setdefault(i, len(local)) for i in e.ids)
            wids.extend(local.setdefault(i, len(local)) for i in e.workers)
            durs.extend(e.durations)
            codes += e.codes
            counts.append(len(e.ids))
            lengths.append(length)
        return rowfile.Body(rows=[e.row for _, e in entries], lengths=rowfile.le(lengths),
                            names=[order[i] for i in local], counts=rowfile.le(counts), name_ids=rowfile.le(ids),
                            durations=rowfile.le(durs), codes=bytes(codes), worker_ids=rowfile.le(wids))

    def refused(self) -> dict[tuple[int, float, int], str]:
        """Sealed segments whose row file a request found missing or not matching: why."""
        with self._lock:
            return dict(self.no_rows)

    def rows_written(self, seg: Any) -> None:
        """``seg`` has a row file now: try it again."""
        with self._lock:
            self.no_rows.pop(_seg_key(seg), None)


def _agrees(row: ReportRow, s: Any) -> bool:
    """Whether a cached row is of the stored version an index summary describes: a session
    stored again under its id (after retention dropped it) differs in these, whatever its length."""
    return bool(row.start == s.start and row.finish == s.finish and row.duration_s == s.duration_s
                and row.outcome == s.outcome and row.cache_hits == s.cache_hits
                and row.cache_misses == s.cache_misses)


def _seg_key(seg: Any) -> tuple[int, float, int]:
    return seg.number, seg.created, seg.size


def _size(row: ReportRow) -> int:
    """What an entry holds, about: 17 bytes a target (id, worker id, duration, code)."""
    size = _ENTRY_OVERHEAD + 17 * row.targets + len(row.id) + len(row.name)
    if row.health is not None:
        size += 400 + sum(len(r) + 50 for r in row.health.reasons)
    return size


def _warm_all(cache: RowCache, summaries: list[Any], read: Any) -> None:
    spent = [0]
    for s in summaries:
        cache.entry_of(s, read, spent)


async def warm(store: Any, cache: RowCache, stopping: Any) -> int:
    """Fill ``cache`` with the newest stored sessions (row files where their segments have them)
    until it is full or every session is in; how many.  Runs beside the service's requests."""
    cursor = None
    n = 0
    while not cache.full() and not stopping.is_set():
        summaries, cursor = await store.summaries(Filters(), desc=True, limit=WARM_CHUNK, cursor=cursor)
        await asyncio.to_thread(_warm_all, cache, summaries, store.read_summary)
        n += len(summaries)
        if cursor is None:
            break
    log.info("storage.row_cache_warm", sessions=n, bytes=cache.bytes, max_bytes=cache.max_bytes,
             row_files=cache.rows_loaded)
    return n
