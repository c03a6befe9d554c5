"""Opening (index files, else a scan; damage handling), sealing, verification and retention
(drop, delete, compact) of the store.

Split from ``store.py`` only to keep modules small; these functions work on a
:class:`~buildtel.services.storage.store.TelemetryStorage` and respect its locks:
``_retention_lock`` makes retention runs sequential, ``_write_lock`` is held
only for the moments the index or the segment list changes, never during
file I/O, so appends keep flowing while a segment is rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from buildtel.services.storage import format as fmt
from buildtel.services.storage import rowfile, sidecar
from buildtel.services.storage.index import Index
from buildtel.services.storage.segments import DamageReport, RetentionReport, Segment
from buildtel.services.storage.summary import Summary, sorted_hashes, summarize, view_decoder
from buildtel.services.storage.targets import Chunk, chunk_from_bytes, chunk_from_lists
from buildtel.shared.codec import DecodeError

if TYPE_CHECKING:  # annotations only: store.py imports this module, never the other way round
    from buildtel.services.storage.store import TelemetryStorage

Part = tuple[list[Summary], Chunk]  # one segment's indexed summaries (file order), their target hashes


def load(store: TelemetryStorage) -> DamageReport:
    """Index every segment (runs in a worker thread, before open returns): from its verified
    index file plus a scan of what was appended after it, else by scanning it whole."""
    fmt.remove_leftovers(store.directory)
    found = fmt.list_segments(store.directory)
    report = DamageReport(segments=len(found))
    loaded: list[Part] = []
    segments: list[Segment] = []
    for i, (number, path) in enumerate(found):
        store._next_number = max(store._next_number, number + 1)
        with _mapped(path) as data:
            part = _load_segment(store, report, segments, number, path, data, last=i == len(found) - 1)
        if part is not None:
            loaded.append(part)
    parts = _latest_records(loaded, report)
    for suffix in (sidecar.SUFFIX, rowfile.SUFFIX):
        for idx_path in store.directory.glob(f"seg-*{suffix}"):
            if not idx_path.with_suffix(fmt.SEGMENT_SUFFIX).exists():
                idx_path.unlink(missing_ok=True)  # its segment was deleted after retention
    store._segments = segments
    store._index = Index.from_segments(parts)
    store._live = {}
    for rows, _ in parts:
        for s in rows:
            store._live[s.segment] = store._live.get(s.segment, 0) + fmt.RECORD_HEADER_LEN + s.length
    report.sessions = sum(len(rows) for rows, _ in parts)
    return report


@contextlib.contextmanager
def _mapped(path: Path, length: int | None = None) -> Iterator[bytes | mmap.mmap]:
    """The file's bytes (the first ``length``) without copying them onto the heap: a 16 MiB read
    at start-up would otherwise stay in the allocator's high-water mark (RSS) for the process's life."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if length is not None:
            size = min(size, length)
        if size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
            yield m


def _latest_records(loaded: list[Part], report: DamageReport) -> list[Part]:
    """Keep, of every id, only its last record (segments in number order, records in file order).

    The writer never writes an id while the index holds it, so a later record of an id was
    written after every earlier one had left the index: dropped by retention and then published
    again (a redelivery, a re-import), or left behind unindexed by a failed batch.  The last
    record is the one that was live; the earlier ones are dead weight (``superseded``) that
    compaction reclaims, and never come back, whatever the limits at this open."""
    last: dict[str, Summary] = {}
    for rows, _ in loaded:
        for row in rows:
            last[row.id] = row
    parts: list[Part] = []
    first = 0
    for rows, chunk in loaded:
        kept = [r for r in rows if last[r.id] is r]
        if len(kept) < len(rows):  # rare: the columns of the kept rows only
            report.superseded += len(rows) - len(kept)
            chunk = chunk_from_lists(0, [_as_array(chunk.hashes[chunk.offsets[i]:chunk.offsets[i + 1]])
                                         for i, r in enumerate(rows) if last[r.id] is r])
        chunk.first = first  # the part's first ordinal (Index.from_segments)
        parts.append((kept, chunk))
        first += len(kept)
    return parts


def _load_segment(store: TelemetryStorage, report: DamageReport, segments: list[Segment],
                  number: int, path: Path, data: bytes | mmap.mmap, *, last: bool) -> Part | None:
    """The segment's intact records (all of them, in file order) and their target columns."""
    header, _ = fmt.parse_header(data)
    side: sidecar.Loaded | str = "no valid header"
    if header is not None and header.version == fmt.FORMAT_VERSION:
        side = sidecar.read(path, number, header.created, data, os.stat(path).st_mtime_ns)
    start = side.covered if isinstance(side, sidecar.Loaded) else None  # the end: nothing to scan
    res = fmt.scan(data, str(path), start=start)
    if res.header is not None and res.header.version != fmt.FORMAT_VERSION:
        # A newer writer's file: not ours to read, index, append to, compact or delete.
        report.damages.extend(res.damages)
        return None
    size = len(data)
    report.scanned_bytes += size - (start or 0)
    if res.tail_damaged and last and res.header is not None:
        # The tail of the segment we were appending to when we died: cut it off so new
        # records follow the last intact one (and the next open is clean).
        _truncate(path, res.data_end)
        res.damages[-1].action = "truncated"
        size = res.data_end
    report.damages.extend(res.damages)
    clean = res.header is not None and all(d.action == "truncated" for d in res.damages)
    writable = last and clean and size < store.segment_bytes
    seg = Segment(number, path, size, res.header.header_len if res.header else 0, writable=writable,
                  created=res.header.created if res.header else 0.0)
    seg.verified = start is None
    store._all_segments.add(seg)
    segments.append(seg)
    rows: list[Summary] = []
    hashes: list[array[int]] = []
    for ref in res.records:  # none when the index file was used: it covers the whole file
        try:
            view = view_decoder.decode(fmt.payload_of(data, ref))
        except DecodeError:
            # Intact bytes that are no session (a bug, or a foreign writer): skip, report.
            report.damages.append(fmt.Damage(file=str(path), offset=ref.offset, reason=fmt.UNDECODABLE,
                                             bytes_skipped=fmt.RECORD_HEADER_LEN + ref.length))
            continue
        rows.append(summarize(view, ref.stored_at, None, ref.offset, ref.length))
        hashes.append(array("I", sorted_hashes(view.target_names())))
    if isinstance(side, sidecar.Loaded):
        report.indexed_from_sidecars += 1
        rows = side.rows
        chunk = chunk_from_bytes(0, side.counts, side.hashes)  # placed by _latest_records
        if writable:  # it takes appends again: its next index file needs the rows' hashes
            hashes = [_as_array(chunk.hashes[chunk.offsets[i]:chunk.offsets[i + 1]]) for i in range(chunk.n)]
    else:
        chunk = chunk_from_lists(0, hashes)
        if not writable and res.header is not None:
            _write_sidecar(store, seg, rows, hashes)  # the next open reads this instead
    report.records += len(rows)
    for row in rows:
        row.segment = seg
    if writable:
        store._active = seg
        seg.rows, seg.hashes = list(rows), hashes  # its index file is written when it is sealed
    return list(rows), chunk


def _as_array(column: Any) -> array[int]:
    out = array("I")
    out.frombytes(column.astype("<u4").tobytes())
    return out


def _write_sidecar(store: TelemetryStorage, seg: Segment, rows: list[Summary], hashes: list[array[int]]) -> None:
    try:
        sidecar.write(seg.path, seg.number, seg.created, rows, hashes, fsync=store.fsync)
    except OSError as exc:  # a cache: the segment is scanned at the next open instead
        store.log.warning("storage.index_file_failed", file=str(seg.path), error=str(exc))


def seal(store: TelemetryStorage, seg: Segment) -> None:
    """Write the index file of a segment that takes no more appends (full, retired, or at close)."""
    if seg.rows is None or seg.hashes is None:
        return
    rows, hashes = seg.rows, seg.hashes
    seg.rows = seg.hashes = None
    _write_sidecar(store, seg, rows, hashes)


def verify(store: TelemetryStorage) -> DamageReport:
    """Checksum every record of every segment opened from its index file (a worker thread);
    damage is logged and reported; the records stay indexed (reads check them again)."""
    report = DamageReport()
    for seg in list(store._segments):
        if seg.verified or store._closed:
            continue
        with _mapped(seg.path, seg.size) as data:  # the active one may grow meanwhile: what is indexed
            res = fmt.scan(data, str(seg.path))
        report.segments += 1
        report.records += len(res.records)
        report.scanned_bytes += seg.size
        report.damages.extend(res.damages)
        seg.verified = True
    for d in report.damages:
        store.log.warning("storage.damaged", file=d.file, offset=d.offset, bytes_skipped=d.bytes_skipped,
                          reason=d.reason, action=d.action, found_by="verify")
    return report


def _truncate(path: os.PathLike[str], size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _mostly_dead(seg: Segment, live: int, threshold: float) -> bool:
    data = seg.size - seg.header_len
    return data > 0 and live < threshold * data


async def enforce_retention(store: TelemetryStorage, now: float) -> RetentionReport:
    report = RetentionReport()
    async with store._retention_lock:
        async with store._write_lock:
            if store._closed:
                return report
            index = store._index
            drop = max(index.count_older(now - store.retention_s), index.count - store.max_sessions)
            if drop <= 0 and not store._retention_dirty:
                return report  # nothing expired: two bisections, nothing else
            store._retention_dirty = False
            for s in index.drop_oldest(drop):
                store._live[s.segment] -= fmt.RECORD_HEADER_LEN + s.length
                report.dropped_ids.append(s.id)
            report.dropped = max(drop, 0)
            live = store._live
            active = store._active
            if active is not None and _mostly_dead(active, live.get(active, 0), store.compact_below):
                # Retire a mostly-dead active segment so it becomes reclaimable below; the next
                # append starts a new one.  (Its records are already durable.)
                active.close_writer()
                store._active = None
                seal(store, active)
            idle = [s for s in store._segments if s is not store._active]
            doomed = [s for s in idle if live.get(s, 0) == 0]
            for seg in doomed:
                store._segments.remove(seg)
                live.pop(seg, None)
            to_compact = [s for s in idle if s not in doomed and _mostly_dead(s, live[s], store.compact_below)]
        if doomed:
            await asyncio.to_thread(_unlink, [s.path for s in doomed], store.fsync)
            report.segments_deleted = len(doomed)
        for seg in to_compact:
            members = [s for s in store._index.by_id.values() if s.segment is seg]
            new_seg, moved = await asyncio.to_thread(_rewrite, store, seg, members)
            async with store._write_lock:
                if store._closed:
                    new_seg.close()
                    return report
                # Only retention removes entries and appends never touch this segment, so the
                # index still holds exactly ``members`` for it.
                for old in members:
                    new = moved.get(old.id)
                    if new is not None:
                        store._index.replace(old, new)
                        live[seg] -= fmt.RECORD_HEADER_LEN + new.length
                        live[new_seg] = live.get(new_seg, 0) + fmt.RECORD_HEADER_LEN + new.length
                if not live[seg]:
                    del live[seg]
                store._segments[store._segments.index(seg)] = new_seg
            report.segments_compacted += 1
    if report.dropped or report.segments_deleted or report.segments_compacted:
        store.log.info("storage.retention", dropped=report.dropped, segments_deleted=report.segments_deleted,
                       segments_compacted=report.segments_compacted, sessions=store._index.count)
    return report


def _unlink(paths: list[Path], fsync: bool) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
        sidecar.remove(p)
        rowfile.remove(p)
    if fsync and paths:
        fmt.fsync_dir(paths[0].parent)


def _rewrite(store: TelemetryStorage, seg: Segment, members: list[Summary]) -> tuple[Segment, dict[str, Summary]]:
    """Copy the live records of ``seg`` (verbatim: same bytes, same stored_at) into a new file
    that atomically replaces it, then its index file.  Runs in a worker thread."""
    created = fmt.new_created(seg.created)
    header = fmt.encode_header(created)
    members = sorted(members, key=lambda s: s.offset)  # sequential reads, original order
    chunks: list[bytes] = [header]
    kept: list[tuple[Summary, int, array[int]]] = []
    offset = len(header)
    for s in members:
        data = os.pread(seg.fd, fmt.RECORD_HEADER_LEN + s.length, s.offset)
        ref = fmt.check_record(data, 0)
        if not isinstance(ref, fmt.RecordRef) or ref.length != s.length:
            store.log.warning("storage.damaged", file=str(seg.path), offset=s.offset, session_id=s.id,
                              bytes_skipped=fmt.RECORD_HEADER_LEN + s.length,
                              reason=ref if isinstance(ref, str) else fmt.BAD_LENGTH, action="kept")
            continue  # left indexed on the old file (its descriptor stays open): reads report it
        names = view_decoder.decode(data[fmt.RECORD_HEADER_LEN:]).target_names()
        chunks.append(data)
        kept.append((s, offset, array("I", sorted_hashes(names))))
        offset += len(data)
    fmt.atomic_write(seg.path, chunks, fsync=store.fsync)
    new_seg = Segment(seg.number, seg.path, offset, len(header), created=created)
    new_seg.verified = True
    store._all_segments.add(new_seg)
    moved = {s.id: msgspec.structs.replace(s, segment=new_seg, offset=off) for s, off, _ in kept}
    _write_sidecar(store, new_seg, [moved[s.id] for s, _, _ in kept], [h for _, _, h in kept])
    return new_seg, moved
