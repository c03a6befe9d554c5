"""TelemetryStorage: the append-only session store (segment files, their index files, and an
in-memory index of compact summaries with postings).

Concurrency model.  One writer at a time (``_write_lock``) appends to the
*active* segment and then adds the new summaries to the :class:`Index` (which
only grows at its ends, never copied: ``index.py``); readers take a
:class:`Snapshot` (the index's bounds at that moment) and ``pread`` records
through the file descriptors the summaries point at, in worker threads, so a
read never waits for a write, a fsync or a compaction.  Retention moves the
index's bounds and then deletes or rewrites (atomically) segments nobody new can
reach; a reader still holding an older snapshot keeps the old descriptor alive,
and on POSIX an unlinked or replaced file stays readable through it.

fsync policy (``fsync=True``, the default): :meth:`append_many` writes every
new record of the batch and then calls fsync once on each file it touched
(normally one; two when the batch rolled over to a new segment) before it
returns, so a caller that acknowledges input after it returns never
acknowledges data a power loss could take back.  New segment files and
compacted rewrites are fsynced and their directory is fsynced after the
rename.  ``fsync=False`` leaves flushing to the OS (tests, throwaway stores).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
import weakref
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from buildtel.services.storage import format as fmt
from buildtel.services.storage import maintenance
from buildtel.services.storage.index import Filters, Index, Key, Snapshot

# Segment and the reports live in segments.py so maintenance.py need not import this module;
# they stay importable from here.
from buildtel.services.storage.segments import DamageReport as DamageReport  # re-exported: service.py
from buildtel.services.storage.segments import RetentionReport as RetentionReport
from buildtel.services.storage.segments import Segment
from buildtel.services.storage.summary import (
    Prepared,
    SessionFacts,
    Summary,
    prepare,
    sorted_hashes,
    summarize,
    view_decoder,
)
from buildtel.shared.codec import decode_session, encode
from buildtel.shared.files import private_dir
from buildtel.shared.logs import get_logger
from buildtel.shared.protocol import BuildSession

T = TypeVar("T")

DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
LOCK_FILE = "LOCK"


def _commit_rows(seg: Segment, placed: list[Prepared]) -> None:
    """Record written (and flushed) records in the rows of the segment's future index file."""
    if seg.rows is not None and seg.hashes is not None:
        for summary, hashes in placed:
            seg.rows.append(summary)
            seg.hashes.append(hashes)


def _take(snap: Snapshot, filters: Filters, desc: bool, limit: int, cursor: Key | None
          ) -> tuple[list[Summary], Key | None]:
    out: list[Summary] = []
    for s in snap.select(filters, desc=desc, cursor=cursor):
        if len(out) >= limit:
            return out, out[-1].key
        out.append(s)
    return out, None


class StorageClosed(RuntimeError):
    """The store is not open (never opened, or closed)."""


class StorageLocked(RuntimeError):
    """Another process has this directory open: two writers would interleave their appends."""


class StoreStats(msgspec.Struct, kw_only=True):
    sessions: int
    segments: int
    disk_bytes: int
    oldest: float | None
    newest: float | None
    damaged_regions: int  # found by the last open() (and verify())
    unverified_segments: int = 0  # opened from index files and not yet checksummed by verify()


@dataclass
class Page:
    """Raw msgpack payloads (``BuildSession`` each) in order; ``cursor`` is set when more may follow."""

    payloads: list[bytes] = field(default_factory=list)
    cursor: Key | None = None
    keys: list[Key] = field(default_factory=list)  # the (t, id) order key of each payload


class TelemetryStorage:
    """Completed build sessions on disk, idempotent by session id, bounded by count and age."""

    def __init__(self, directory: str | os.PathLike[str], *, max_sessions: int = 1000,
                 retention_s: float = 90 * 86400.0, fsync: bool = True,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, compact_below: float = 0.5) -> None:
        if max_sessions < 1 or retention_s <= 0:
            raise ValueError("max_sessions must be >= 1 and retention_s > 0")
        self.directory = Path(directory)
        self.max_sessions = max_sessions
        self.retention_s = retention_s
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.compact_below = compact_below  # rewrite a segment once live bytes fall below this share
        self.log = get_logger("storage", directory=str(self.directory))
        self._index = Index()
        self._live: dict[Segment, int] = {}  # bytes of indexed records per segment
        self._retention_dirty = True  # the first run after open looks at every segment
        self._segments: list[Segment] = []
        self._all_segments: weakref.WeakSet[Segment] = weakref.WeakSet()
        self._active: Segment | None = None
        self._next_number = 1
        self._write_lock = asyncio.Lock()
        self._retention_lock = asyncio.Lock()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = False
        self._closed = False
        self._lock_fd = -1
        self.last_report = DamageReport()

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> DamageReport:
        """Index every intact record; report (and log) damage instead of failing on it."""
        if self._open or self._closed:
            raise StorageClosed("open() may be called once")
        private_dir(self.directory)
        self._lock()
        try:
            report = await asyncio.to_thread(self._load)
        except BaseException:
            self._unlock()
            raise
        for d in report.damages:
            self.log.warning("storage.damaged", file=d.file, offset=d.offset, bytes_skipped=d.bytes_skipped,
                             reason=d.reason, action=d.action)
        self.last_report = report
        self._open = True
        await self.enforce_retention()
        return report

    async def close(self) -> None:
        """Wait for the write and reads in flight, then close every descriptor.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        async with self._retention_lock, self._write_lock:
            await self._idle.wait()
            active = self._active
            if active is not None:
                await asyncio.to_thread(maintenance.seal, self, active)  # the next open reads it
            for seg in list(self._all_segments):
                seg.close()
            self._segments = []
            self._active = None
            self._index = Index()
            self._unlock()

    def _lock(self) -> None:
        # flock, not a pid file: the kernel releases it when the holder dies, even by SIGKILL.
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageLocked(f"{self.directory} is in use by another storage process") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- writes ------------------------------------------------------------------------------
    async def append_many(self, sessions: Sequence[BuildSession], *,
                          raw: Sequence[bytes] | None = None) -> list[bool]:
        """Store the sessions whose id is not indexed (live) yet; ``[True]`` where a session was new.
        One retention dropped is stored again (docs/storage-format.md, Idempotency).

        ``raw[i]``, when given, must be the msgpack encoding of ``sessions[i]`` as received:
        it is stored verbatim, so fields added by a newer producer survive.  Durable (one
        fsync per touched file) before it returns; see the module docstring.
        """
        self._check_open()
        if raw is not None and len(raw) != len(sessions):
            raise ValueError("raw must have one entry per session")
        ids = [s.id for s in sessions]
        get: Callable[[int], bytes] = raw.__getitem__ if raw is not None else (lambda i: encode(sessions[i]))
        # Shielded: once started, a batch is written and indexed even if the caller is cancelled,
        # so the index never disagrees with what is on disk.
        return await asyncio.shield(self._append(ids, get, None, time.time()))

    async def append_encoded(self, payloads: Sequence[bytes],
                             facts: Sequence[SessionFacts] | None = None) -> list[bool]:
        """:meth:`append_many` for sessions as received on the bus (msgpack ``BuildSession``s the
        caller has validated), stored verbatim; the caller need not keep decoded sessions around.
        ``facts[i]`` (from the caller's own decode of ``payloads[i]``) spares decoding them again."""
        self._check_open()
        now = time.time()
        if facts is None:
            prepared = await asyncio.to_thread(prepare, payloads, now)
        else:
            if len(facts) != len(payloads):
                raise ValueError(f"facts must have one entry per payload ({len(facts)} for {len(payloads)})")
            # SessionFacts has the attributes of index.SessionView that summarize reads.
            prepared = [(summarize(f, now, None, 0, len(p)), array("I", sorted_hashes(f.names)))
                        for f, p in zip(facts, payloads, strict=True)]
        return await asyncio.shield(self._append([p[0].id for p in prepared], payloads.__getitem__, prepared, now))

    async def _append(self, ids: list[str], get: Callable[[int], bytes],
                      prepared: list[Prepared] | None, now: float) -> list[bool]:
        async with self._write_lock:
            self._check_open()
            known = self._index
            flags: list[bool] = []
            todo: list[int] = []
            seen: set[str] = set()
            for i, sid in enumerate(ids):
                new = sid not in known and sid not in seen
                flags.append(new)
                if new:
                    seen.add(sid)
                    todo.append(i)
            if todo:
                placed = await asyncio.to_thread(self._write_batch, [get(i) for i in todo],
                                                 None if prepared is None else [prepared[i] for i in todo], now,
                                                 self._index.next_ord)
                self._index.add(placed)  # visible to readers from here on: after the fsync
                live = self._live
                for summary, _ in placed:
                    live[summary.segment] = live.get(summary.segment, 0) + fmt.RECORD_HEADER_LEN + summary.length
            return flags

    def _write_batch(self, payloads: list[bytes], prepared: list[Prepared] | None, now: float,
                     first_ord: int) -> list[Prepared]:
        if prepared is None:
            prepared = prepare(payloads, now)  # fails before anything is written
        seg = self._active or self._new_segment()
        base = seg.size  # where this batch starts in the current segment
        out: list[Prepared] = []
        placed: list[Prepared] = []  # in ``seg``, not yet in its rows (see _commit_rows)
        chunks: list[bytes] = []  # header, payload, header, payload…: written by writev, never joined
        pending = 0
        try:
            for k, (p, item) in enumerate(zip(payloads, prepared, strict=True)):
                head = fmt.record_header(p, stored_at=now)
                size = len(head) + len(p)
                if chunks and seg.size + pending + size > self.segment_bytes:
                    self._flush(seg, chunks, pending)
                    _commit_rows(seg, placed)
                    seg = self._roll()
                    base = seg.size
                    chunks, pending, placed = [], 0, []
                summary = item[0]  # ours alone until the index publishes it: filled in place
                summary.segment, summary.offset, summary.ord = seg, seg.size + pending, first_ord + k
                placed.append(item)
                out.append(item)
                chunks += (head, p)
                pending += size
            self._flush(seg, chunks, pending)
            if self.fsync:
                os.fsync(seg.wfd)  # segments rolled over above were fsynced by _roll
        except BaseException:
            self._abandon(seg, base)
            raise
        _commit_rows(seg, placed)
        if seg.size >= self.segment_bytes:
            seg.close_writer()  # full: the next append starts a new segment
            self._active = None
            maintenance.seal(self, seg)
        return out

    def _flush(self, seg: Segment, chunks: list[bytes], pending: int) -> None:
        fmt.write_chunks(seg.wfd, chunks)
        seg.size += pending

    def _abandon(self, seg: Segment, base: int) -> None:
        """After a failed write or fsync (disk full, I/O error): cut the segment back to where the
        batch began, so no record the index does not know is left half-written, and stop appending
        to it (after a failed fsync its page cache state is unknown); the next batch starts a new
        segment.  If the cut fails too, the next open reports the tail as damage."""
        try:
            os.ftruncate(seg.wfd, base)
            seg.size = base
        except OSError:
            pass
        seg.close_writer()
        seg.rows = seg.hashes = None  # no index file: the next open scans it (and reports any torn tail)
        if self._active is seg:
            self._active = None

    def _new_segment(self) -> Segment:
        number = self._next_number
        self._next_number += 1
        path = self.directory / fmt.segment_name(number)
        created = time.time()
        header = fmt.encode_header(created)
        fmt.atomic_write(path, [header], fsync=self.fsync)
        seg = Segment(number, path, len(header), len(header), writable=True, created=created)
        seg.rows, seg.hashes, seg.verified = [], [], True
        self._all_segments.add(seg)
        self._segments.append(seg)
        self._active = seg
        return seg

    def _roll(self) -> Segment:
        old = self._active
        if old is not None:
            if self.fsync:
                os.fsync(old.wfd)
            old.close_writer()
            self._active = None
            maintenance.seal(self, old)
        return self._new_segment()

    # -- reads -------------------------------------------------------------------------------
    async def get(self, session_id: str) -> BuildSession | None:
        payload = await self.get_raw(session_id)
        return None if payload is None else decode_session(payload)

    async def get_raw(self, session_id: str) -> bytes | None:
        self._check_open()
        s = self._index.snapshot().get(session_id)
        if s is None:
            return None
        return await self._in_thread(self._read, s)

    async def recent(self, n: int = 20) -> list[BuildSession]:
        """The ``n`` most recently finished sessions, newest first."""
        return await self._sessions(Filters(), desc=True, limit=n)

    async def range(self, start: float, end: float, *, limit: int | None = None) -> list[BuildSession]:
        """Sessions that finished in ``[start, end)``, oldest first."""
        return await self._sessions(Filters(since=start, until=end), desc=False, limit=limit)

    async def query(self, outcome: str | None = None, branch: str | None = None, agent: str | None = None,
                    target: str | None = None, since: float | None = None, until: float | None = None,
                    limit: int = 100, *, name: str | None = None, label: str | None = None) -> list[BuildSession]:
        """Sessions matching every given filter, newest first; times are finish times."""
        f = Filters(outcome=outcome, branch=branch, agent=agent, name=name, label=label, target=target,
                    since=since, until=until)
        return await self._sessions(f, desc=True, limit=limit)

    async def summaries(self, filters: Filters, *, desc: bool = True, limit: int = 100,
                        cursor: Key | None = None) -> tuple[list[Summary], Key | None]:
        """Compact summaries (no record is read) and the cursor of the next page (None: no more).

        A target filter matches by name hash here; a collision (1 in 4 billion per pair of
        names) would list a session that lacks the target."""
        self._check_open()
        snap = self._index.snapshot()
        return await self._in_thread(_take, snap, filters, desc, limit, cursor)

    async def verify(self) -> DamageReport:
        """Checksum every record not checksummed since open (segments opened from their index
        files); logs and returns the damage found."""
        self._check_open()
        report = await self._in_thread(maintenance.verify, self)
        self.last_report.damages.extend(report.damages)
        return report

    async def page(self, filters: Filters, *, desc: bool = True, limit: int | None = None,
                   cursor: Key | None = None, max_bytes: int | None = None) -> Page:
        """Raw payloads for the query API: keyset-paginated and bounded in bytes (at least one item)."""
        self._check_open()
        snap = self._index.snapshot()
        return await self._in_thread(self._collect, snap, filters, desc, limit, cursor, max_bytes)

    async def count(self) -> int:
        return self._index.count

    def stats(self) -> StoreStats:
        snap = self._index.snapshot()
        oldest, newest = snap.oldest(), snap.newest()
        return StoreStats(sessions=snap.count, segments=len(self._segments),
                          disk_bytes=sum(s.size for s in self._segments),
                          oldest=oldest.t if oldest else None, newest=newest.t if newest else None,
                          damaged_regions=len(self.last_report.damages),
                          unverified_segments=sum(1 for s in self._segments if not s.verified))

    async def _sessions(self, filters: Filters, *, desc: bool, limit: int | None) -> list[BuildSession]:
        if limit is not None and limit <= 0:
            return []
        page = await self.page(filters, desc=desc, limit=limit)
        return [decode_session(p) for p in page.payloads]

    def _collect(self, snap: Snapshot, filters: Filters, desc: bool, limit: int | None,
                 cursor: Key | None, max_bytes: int | None) -> Page:
        page = Page()
        total = 0
        last: Key | None = None
        for s in snap.select(filters, desc=desc, cursor=cursor):
            if (limit is not None and len(page.payloads) >= limit) or (
                    max_bytes is not None and page.payloads and total + s.length > max_bytes):
                page.cursor = last
                break
            payload = self._read(s)
            if payload is None:
                continue
            if filters.target is not None and filters.target not in view_decoder.decode(payload).target_names():
                continue  # a 32-bit hash collision: the index said maybe, the record says no
            page.payloads.append(payload)
            page.keys.append(s.key)
            total += len(payload)
            last = s.key
        return page

    def read_summary(self, s: Summary) -> bytes | None:
        """The stored bytes of the session ``s`` describes (from ``summaries``), None when they
        went bad since they were indexed (logged).  Blocking: call it from a worker thread."""
        return self._read(s)

    def sealed_segments(self) -> list[Segment]:
        """The segments that take no more appends, oldest first (their files no longer change)."""
        return [s for s in self._segments if s is not self._active and s.wfd < 0]

    def _read(self, s: Summary) -> bytes | None:
        seg = s.segment
        if seg.fd < 0:
            raise StorageClosed("store closed during a read")
        data = os.pread(seg.fd, fmt.RECORD_HEADER_LEN + s.length, s.offset)
        ref = fmt.check_record(data, 0)
        if isinstance(ref, fmt.RecordRef) and ref.length == s.length:
            return data[fmt.RECORD_HEADER_LEN:]
        # Went bad after it was indexed (bit rot, a foreign writer): say so, serve the rest.
        reason = ref if isinstance(ref, str) else fmt.BAD_LENGTH
        self.log.warning("storage.damaged", file=str(seg.path), offset=s.offset,
                         bytes_skipped=fmt.RECORD_HEADER_LEN + s.length, reason=reason, session_id=s.id)
        return None

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        self._inflight += 1
        self._idle.clear()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def _check_open(self) -> None:
        if not self._open or self._closed:
            raise StorageClosed(f"storage at {self.directory} is not open")

    # -- loading and retention (services/storage/maintenance.py, to keep modules small) -----
    def _load(self) -> DamageReport:
        return maintenance.load(self)

    async def enforce_retention(self, now: float | None = None) -> RetentionReport:
        """Drop sessions beyond ``max_sessions`` (oldest first) or finished before
        ``now - retention_s``; delete segments with nothing live, rewrite mostly-dead ones."""
        self._check_open()
        return await maintenance.enforce_retention(self, time.time() if now is None else now)
