"""The storage service's row-file worker: writes a report-row file (``rowfile.py``) for every
sealed segment that lacks a current one, newest first, in the background.

It runs once the store is open (which covers stores written before row files existed, and
segments compacted since: their old row file no longer matches) and again whenever appends or
retention may have sealed a segment (``due`` is set).  A segment's rows come from the row cache
where it holds them (sessions reported on, or warmed) and are otherwise reduced from the
segment's records, read once, checksummed (``format.scan``), in a worker thread.  A failure
to write (disk full) is logged and retried at the next wake-up; reports reduce the records
meanwhile, so nothing depends on a row file being there.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from typing import Any

import msgspec

from buildtel.services.storage import format as fmt
from buildtel.services.storage import rowfile
from buildtel.services.storage.rowcache import Entry, RowCache


def current(seg: Any) -> bool:
    """Whether ``seg`` has a row file that matches it as it is now (the head only; a report
    that loads the file checks its CRC too)."""
    st = os.fstat(seg.fd)
    return rowfile.matches(seg.path, seg.number, seg.created, st.st_size, st.st_mtime_ns)


def build(store: Any, cache: RowCache, seg: Any) -> int:
    """Write ``seg``'s row file (blocking); how many sessions it holds."""
    st = os.fstat(seg.fd)
    entries: list[tuple[int, Entry]] = []
    with mmap.mmap(seg.fd, st.st_size, prot=mmap.PROT_READ) if st.st_size else contextlib.nullcontext(b"") as data:
        res = fmt.scan(data, str(seg.path))
        for ref in res.records:
            payload = fmt.payload_of(data, ref)
            try:
                entries.append((ref.length, cache.lookup_or_reduce(payload)))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not a session (the index skipped it too, and reported it at open)
    body = cache.body_for(entries)
    rowfile.write(seg.path, seg.number, seg.created, st.st_size, st.st_mtime_ns, body, fsync=store.fsync)
    if not seg.path.exists():  # retention deleted the segment meanwhile
        rowfile.remove(seg.path)
    cache.rows_written(seg)
    return len(entries)


async def maintain(store: Any, cache: RowCache, stopping: asyncio.Event, due: asyncio.Event, log: Any) -> None:
    """Keep every sealed segment's row file current until ``stopping`` is set."""
    done: set[tuple[int, float, int]] = set()
    while not stopping.is_set():
        due.clear()
        written = sessions = 0
        segments = store.sealed_segments()
        refused = cache.refused()  # e.g. a checksum mismatch behind a good head
        for seg in reversed(segments):
            key = (seg.number, seg.created, seg.size)
            why = refused.get(key)
            if (key in done and why is None) or stopping.is_set():
                continue
            try:
                if why is not None or not await asyncio.to_thread(current, seg):
                    if why not in (None, "missing"):
                        log.warning("storage.row_file_rewritten", file=str(rowfile.path_for(seg.path)), reason=why)
                    sessions += await asyncio.to_thread(build, store, cache, seg)
                    written += 1
            except (OSError, ValueError) as exc:  # ValueError: an mmap of a file closed under it
                if seg.fd < 0:
                    return  # the store closed
                log.warning("storage.row_file_failed", file=str(seg.path), error=str(exc))
                continue
            done.add(key)
        done &= {(s.number, s.created, s.size) for s in segments}
        if written:
            log.info("storage.row_files_written", files=written, sessions=sessions)
        stop = asyncio.ensure_future(stopping.wait())
        wake = asyncio.ensure_future(due.wait())
        try:
            await asyncio.wait([stop, wake], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            wake.cancel()
