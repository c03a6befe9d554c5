"""TraceStore: traces on disk in append-only segment files, with an in-memory index.

Layout: ``<traces_dir>/<number>.btt`` (format in ``segments.py``).  Every
ingest appends one record per trace it touched (a :class:`SpanChunk`), so a
trace whose spans arrive from several processes is several records, possibly
in several segments; the index maps trace id -> record locations, and a query
reads and merges them.  A span stored twice (a redelivered bus batch, a
client retry) is collapsed by span id on read, the later copy winning.

Single-threaded by design: the tracer calls every method from its event loop,
so there are no locks and retention can close a file no reader is using.
Reads are ``pread`` of a few records (page cache), cheap enough inline.

Durability: a write reaches the OS before :meth:`append` returns, so a crash
of the tracer loses nothing; with ``fsync=True`` the service calls
:meth:`sync` about once a second rather than per request, trading up to a
second of spans on power loss for ingest throughput (an OTLP client may send
thousands of requests a second).  A torn tail is cut off on open.

Retention drops whole segments, oldest first: older than ``retention_s``,
then while the store is over ``max_bytes`` or holds more than ``max_traces``
traces.  The active segment rolls at ``segment_bytes`` or when it holds an
eighth of ``max_traces``, so the caps hold to within a segment.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from buildtel.services.tracer import segments as fmt
from buildtel.shared.files import private_dir
from buildtel.shared.logs import get_logger
from buildtel.shared.tracemodel import SpanRecord, span_session_id

log = get_logger("tracer.store")

DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BYTES = 2 * 1024 * 1024 * 1024
SPANS_PER_RECORD = 5_000  # ~6 MB of typical spans: far under the 64 MiB record bound
DEFAULT_MAX_TRACES = 100_000


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    fd: int
    size: int
    newest: float = 0.0
    traces: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Ref:
    seg: int
    offset: int
    length: int


@dataclass(slots=True)
class TraceEntry:
    refs: list[_Ref] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0
    stored_at: float = 0.0
    sessions: set[str] = field(default_factory=set)


class OpenReport(msgspec.Struct, kw_only=True):
    segments: int = 0
    records: int = 0
    traces: int = 0
    damaged_regions: int = 0
    truncated_bytes: int = 0


class TraceSummary(msgspec.Struct, kw_only=True):
    trace_id: str
    sessions: list[str] = []
    start_ns: int = 0
    end_ns: int = 0
    stored_at: float = 0.0


def span_order(span: SpanRecord) -> tuple[int, int, str]:
    """The order of a trace's spans in answers; unique, so it also serves as a page cursor."""
    return (span.start_ns, span.end_ns, span.span_id)


class TraceStore:
    def __init__(self, directory: Path, *, retention_s: float, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_traces: int = DEFAULT_MAX_TRACES, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.max_traces = max_traces
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._traces_per_segment = max(1, max_traces // 8)
        self._segments: dict[int, _Segment] = {}  # insertion order = age order
        self._active: _Segment | None = None
        self._next_number = 1
        self._dirty = False
        self.traces: dict[str, TraceEntry] = {}
        self.sessions: dict[str, str] = {}  # session id -> trace id
        self._synthesized: dict[str, int] = {}  # session id -> segment holding its synthesized spans
        self.spans_written = 0
        self.opened = False

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> OpenReport:
        private_dir(self.directory)
        report = OpenReport()
        paths = sorted(self.directory.glob(f"*{fmt.SEGMENT_SUFFIX}"), key=lambda p: (len(p.stem), p.stem))
        for i, path in enumerate(paths):
            try:
                number = int(path.stem)
            except ValueError:
                continue
            self._next_number = max(self._next_number, number + 1)
            data = path.read_bytes()
            scan = fmt.scan(data)
            report.damaged_regions += len(scan.damaged)
            last = i == len(paths) - 1
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            seg = _Segment(number, path, fd, len(data))
            if last and scan.ok_header and scan.data_end < len(data):
                # A torn tail (crash mid-write): cut it so new records follow intact ones.
                report.truncated_bytes += len(data) - scan.data_end
                os.ftruncate(fd, scan.data_end)
                seg.size = scan.data_end
            self._segments[number] = seg
            for found in scan.records:
                try:
                    head = fmt.head_decoder.decode(fmt.read_payload(data, found))
                except msgspec.DecodeError:
                    report.damaged_regions += 1
                    continue
                self._index(seg, head, found.offset, found.length, found.stored_at)
                report.records += 1
            if last and scan.ok_header:
                self._active = seg
        report.segments = len(self._segments)
        report.traces = len(self.traces)
        self.opened = True
        return report

    def close(self) -> None:
        if not self.opened:
            return
        self.sync()
        for seg in self._segments.values():
            with contextlib.suppress(OSError):
                os.close(seg.fd)
        self._segments.clear()
        self._active = None
        self.opened = False

    def sync(self) -> None:
        """fsync the active segment if anything was written since the last sync."""
        if self._dirty and self.fsync and self._active is not None:
            os.fsync(self._active.fd)
        self._dirty = False

    # -- writing -------------------------------------------------------------------------------
    def append(self, spans: Sequence[SpanRecord], *, source: str, session_id: str = "",
               now: float | None = None) -> int:
        """Store ``spans`` (any traces, any order) as one record per trace; returns records written."""
        if not spans:
            return 0
        now = time.time() if now is None else now
        groups: dict[str, list[SpanRecord]] = {}
        for span in spans:
            groups.setdefault(span.trace_id, []).append(span)
        seg = self._writable(len(groups))
        blob = bytearray()
        placed = []
        for trace_id, members in groups.items():
            sid = session_id or next((s for s in map(span_session_id, members) if s), "")
            # A huge trace (a 638,000-target build) is several records: one must stay under the
            # record bound, and a trace may have any number of them (TraceEntry.refs).
            for i in range(0, len(members), SPANS_PER_RECORD):
                part = members[i:i + SPANS_PER_RECORD]
                chunk = fmt.SpanChunk(trace_id=trace_id, session_id=sid, source=source,
                                      start_ns=min(s.start_ns for s in part), end_ns=max(s.end_ns for s in part),
                                      spans=part)
                payload = fmt.chunk_encoder.encode(chunk)
                placed.append((seg.size + len(blob), len(payload), chunk))
                blob += fmt.encode_record(payload, now)
        view = memoryview(blob)
        while view:
            written = os.write(seg.fd, view)
            view = view[written:]
        seg.size += len(blob)
        self._dirty = True
        for offset, length, chunk in placed:
            self._index(seg, chunk, offset, length, now)
        self.spans_written += len(spans)
        return len(placed)

    def _writable(self, new_traces: int) -> _Segment:
        seg = self._active
        if seg is not None and (seg.size >= self.segment_bytes or len(seg.traces) >= self._traces_per_segment):
            self.sync()
            seg = None
        if seg is None:
            number = self._next_number
            self._next_number += 1
            path = self.directory / f"{number:010d}{fmt.SEGMENT_SUFFIX}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            header = fmt.encode_header()
            os.write(fd, header)
            if self.fsync:
                os.fsync(fd)
                dfd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dfd)  # the new name must survive a power loss too
                finally:
                    os.close(dfd)
            seg = _Segment(number, path, fd, len(header))
            self._segments[number] = seg
            self._active = seg
        return seg

    def _index(self, seg: _Segment, head: fmt.ChunkHead | fmt.SpanChunk, offset: int, length: int,
               stored_at: float) -> None:
        entry = self.traces.get(head.trace_id)
        if entry is None:
            entry = self.traces[head.trace_id] = TraceEntry(start_ns=head.start_ns, end_ns=head.end_ns)
        else:
            entry.start_ns = min(entry.start_ns, head.start_ns) if entry.start_ns else head.start_ns
            entry.end_ns = max(entry.end_ns, head.end_ns)
        entry.refs.append(_Ref(seg.number, offset, length))
        entry.stored_at = max(entry.stored_at, stored_at)
        seg.traces.add(head.trace_id)
        seg.newest = max(seg.newest, stored_at)
        if head.session_id:
            entry.sessions.add(head.session_id)
            self.sessions[head.session_id] = head.trace_id
            if head.source == "session":
                self._synthesized[head.session_id] = seg.number

    # -- reading -------------------------------------------------------------------------------
    def get_trace(self, trace_id: str) -> list[SpanRecord]:
        """Every stored span of the trace, one per span id, by start time (empty if unknown)."""
        entry = self.traces.get(trace_id)
        if entry is None:
            return []
        by_id: dict[str, SpanRecord] = {}
        for ref in entry.refs:
            seg = self._segments.get(ref.seg)
            if seg is None:
                continue
            data = os.pread(seg.fd, fmt.RECORD_HEADER_LEN + ref.length, ref.offset)
            if not isinstance(fmt.check_record(data, 0), fmt.Found):
                log.warning("tracer.store.damaged_record", segment=str(seg.path), offset=ref.offset)
                continue
            chunk = fmt.chunk_decoder.decode(data[fmt.RECORD_HEADER_LEN:])
            for span in chunk.spans:
                by_id[span.span_id] = span
        return sorted(by_id.values(), key=span_order)

    def trace_of_session(self, session_id: str) -> str | None:
        return self.sessions.get(session_id)

    def has_synthesized(self, session_id: str) -> bool:
        """True when the spans of this completed session are already stored (idempotent ingest)."""
        return session_id in self._synthesized

    def resolve(self, any_id: str) -> str | None:
        """The trace id for a session id or a trace id."""
        tid = self.sessions.get(any_id)
        if tid is not None:
            return tid
        return any_id if any_id in self.traces else None

    def recent(self, n: int) -> list[TraceSummary]:
        newest = sorted(self.traces.items(), key=lambda kv: kv[1].stored_at, reverse=True)[:n]
        return [TraceSummary(trace_id=tid, sessions=sorted(e.sessions), start_ns=e.start_ns, end_ns=e.end_ns,
                             stored_at=e.stored_at) for tid, e in newest]

    def disk_bytes(self) -> int:
        return sum(seg.size for seg in self._segments.values())

    def segment_count(self) -> int:
        return len(self._segments)

    # -- retention -----------------------------------------------------------------------------
    def enforce_retention(self, now: float | None = None) -> int:
        """Drop segments past the age, size and count limits; returns segments dropped."""
        now = time.time() if now is None else now
        cutoff = now - self.retention_s
        dropped = 0
        for seg in list(self._segments.values()):
            if seg.newest and seg.newest < cutoff:
                self._drop(seg)
                dropped += 1
        while len(self._segments) > 1 and (self.disk_bytes() > self.max_bytes or len(self.traces) > self.max_traces):
            self._drop(next(iter(self._segments.values())))
            dropped += 1
        return dropped

    def _drop(self, seg: _Segment) -> None:
        for tid in seg.traces:
            entry = self.traces.get(tid)
            if entry is None:
                continue
            entry.refs = [r for r in entry.refs if r.seg != seg.number]
            if not entry.refs:
                del self.traces[tid]
                for sid in entry.sessions:
                    if self.sessions.get(sid) == tid:
                        del self.sessions[sid]
        for sid in [sid for sid, n in self._synthesized.items() if n == seg.number]:
            del self._synthesized[sid]
        del self._segments[seg.number]
        if self._active is seg:
            self._active = None
            self._dirty = False
        with contextlib.suppress(OSError):
            os.close(seg.fd)
        with contextlib.suppress(FileNotFoundError):
            seg.path.unlink()
        log.info("tracer.store.segment_dropped", segment=seg.path.name, traces=len(seg.traces))
