"""The on-disk format of the session store: segment files of checksummed, length-prefixed records.

Pure and synchronous: bytes in, structures out, plus the few file helpers that
must get durability right (create a segment atomically, rewrite one
atomically, fsync a directory).  No asyncio, no logging, no index: the store
(``store.py``) orchestrates.  ``docs/storage-format.md`` is the normative
description; this module is its implementation.

A segment file::

    file header (HEADER_LEN bytes, version 1)
      magic     8s  b"\\x89BTSEG\\r\\n"   (binary-safe, catches text-mode mangling)
      version   u16 FORMAT_VERSION
      hdr_len   u16 where records start (grows when header fields are added)
      created   f64 Unix seconds
      ...       future header fields (hdr_len > 24)
      crc       u32 crc32 of every header byte before it
    record*  (RECORD_HEADER_LEN + length bytes each)
      magic     4s  b"\\xd3BTR"          (what resync scans for)
      kind      u8  1 = session
      flags     u8  0
      reserved  u16 0
      length    u32 payload bytes
      stored_at f64 when storage wrote it (Unix seconds)
      crc       u32 crc32 of kind..stored_at and the payload
      payload   length bytes: a msgpack BuildSession (buildtel.shared.codec)

All integers little-endian.  The checksum covers the length, so a flipped
length is caught instead of making the reader skip a random distance.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

# A segment image: read into memory, or mapped (recovery maps whole segments rather than copy them).
Image = bytes | mmap.mmap

FORMAT_VERSION = 1
FILE_MAGIC = b"\x89BTSEG\r\n"
SEGMENT_SUFFIX = ".btl"
TMP_SUFFIX = ".tmp"

_HEADER_PREFIX = struct.Struct("<8sHH")  # magic, version, header length
_HEADER_V1 = struct.Struct("<8sHHd")  # ... created; the CRC follows at hdr_len - 4
HEADER_LEN = _HEADER_V1.size + 4
MAX_HEADER_LEN = 4096

REC_MAGIC = b"\xd3BTR"
KIND_SESSION = 1
_REC = struct.Struct("<4sBBHIdI")
RECORD_HEADER_LEN = _REC.size  # 24
# A sanity bound: a length beyond it is damage, not data.  It is the bound of one completed session
# (shared/codec.py MAX_SESSION_BYTES; sessions over one message come through the object store).
# It was 64 MiB before: an older reader reports a longer record as `bad_length` (docs/storage-format.md).
MAX_RECORD_BYTES = 1024 * 1024 * 1024

# Damage reasons (stable strings: logs and tests match on them).
BAD_HEADER = "bad_header"
UNSUPPORTED_VERSION = "unsupported_version"
BAD_MAGIC = "bad_magic"
BAD_LENGTH = "bad_length"
CHECKSUM_MISMATCH = "checksum_mismatch"
UNKNOWN_KIND = "unknown_kind"
TRUNCATED = "truncated"
TORN_TAIL = "torn_tail"
UNDECODABLE = "undecodable"


class Damage(msgspec.Struct, kw_only=True):
    """One damaged region of one file: what a reader skipped and why."""

    file: str
    offset: int
    bytes_skipped: int
    reason: str
    action: str = "kept"  # "kept": file left as found; "truncated": torn tail cut off; "skipped": file ignored


class SegmentHeader(msgspec.Struct, frozen=True):
    version: int
    header_len: int
    created: float


@dataclass(slots=True)
class RecordRef:
    """Where an intact record is: ``offset`` of its header; the payload follows."""

    offset: int
    length: int  # payload bytes
    stored_at: float
    kind: int = KIND_SESSION

    @property
    def end(self) -> int:
        return self.offset + RECORD_HEADER_LEN + self.length


@dataclass(slots=True)
class ScanResult:
    header: SegmentHeader | None
    records: list[RecordRef] = field(default_factory=list)
    damages: list[Damage] = field(default_factory=list)
    data_end: int = 0  # end of the last intact record (or of the header)
    tail_damaged: bool = False  # damage runs to end of file with no intact record after it


# -- encoding ---------------------------------------------------------------------------------

def encode_header(created: float | None = None) -> bytes:
    body = _HEADER_V1.pack(FILE_MAGIC, FORMAT_VERSION, HEADER_LEN, time.time() if created is None else created)
    return body + struct.pack("<I", zlib.crc32(body))


def new_created(previous: float) -> float:
    """A header time for a rewrite of a segment created at ``previous``: now, and never equal to
    it (index files are matched to their segment by it)."""
    now = time.time()
    return now if now != previous else now + 1e-6


def record_header(payload: bytes, *, stored_at: float | None = None, kind: int = KIND_SESSION) -> bytes:
    """The 24 bytes that precede ``payload`` on disk (written with it via writev: no copy)."""
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(payload)} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")
    ts = time.time() if stored_at is None else stored_at
    head = _REC.pack(REC_MAGIC, kind, 0, 0, len(payload), ts, 0)
    crc = zlib.crc32(payload, zlib.crc32(head[4:20]))
    return head[:20] + struct.pack("<I", crc)


def encode_record(payload: bytes, *, stored_at: float | None = None, kind: int = KIND_SESSION) -> bytes:
    return record_header(payload, stored_at=stored_at, kind=kind) + payload


# -- decoding ---------------------------------------------------------------------------------

def parse_header(data: Image) -> tuple[SegmentHeader | None, str | None]:
    """The header, or ``(None, reason)``; a newer version is reported with its number."""
    if len(data) < _HEADER_PREFIX.size:
        return None, BAD_HEADER
    magic, version, hdr_len = _HEADER_PREFIX.unpack_from(data, 0)
    if magic != FILE_MAGIC or not HEADER_LEN <= hdr_len <= MAX_HEADER_LEN or len(data) < hdr_len:
        return None, BAD_HEADER
    (crc,) = struct.unpack_from("<I", data, hdr_len - 4)
    if zlib.crc32(data[: hdr_len - 4]) != crc:
        return None, BAD_HEADER
    if version > FORMAT_VERSION or version < 1:
        return SegmentHeader(version, hdr_len, 0.0), UNSUPPORTED_VERSION
    _, _, _, created = _HEADER_V1.unpack_from(data, 0)
    return SegmentHeader(version, hdr_len, created), None


def check_record(data: Image | memoryview, pos: int) -> RecordRef | str:
    """The intact record at ``pos``, or the reason it is not one."""
    size = len(data)
    if size - pos < RECORD_HEADER_LEN:
        return TRUNCATED
    magic, kind, _flags, _res, length, stored_at, crc = _REC.unpack_from(data, pos)
    if magic != REC_MAGIC:
        return BAD_MAGIC
    if length > MAX_RECORD_BYTES:
        return BAD_LENGTH
    end = pos + RECORD_HEADER_LEN + length
    if end > size:
        return TRUNCATED
    with memoryview(data) as mv:  # released at once: ``data`` may be an mmap that is closed later
        ok = zlib.crc32(mv[pos + RECORD_HEADER_LEN : end], zlib.crc32(mv[pos + 4 : pos + 20])) == crc
    if not ok:
        return CHECKSUM_MISMATCH
    if kind != KIND_SESSION:
        # Version 1 knows one kind; a new kind comes with a version bump (see the docs).
        return UNKNOWN_KIND
    return RecordRef(pos, length, stored_at, kind)


def payload_of(data: Image, ref: RecordRef) -> bytes:
    return data[ref.offset + RECORD_HEADER_LEN : ref.end]


def _resync(data: Image, start: int) -> RecordRef | None:
    """The next intact record at or after ``start``, found by its magic."""
    pos = data.find(REC_MAGIC, start)
    while pos != -1:
        found = check_record(data, pos)
        if isinstance(found, RecordRef):
            return found
        pos = data.find(REC_MAGIC, pos + 1)
    return None


def scan(data: Image, file: str, start: int | None = None) -> ScanResult:
    """Every intact record of a segment image, and a :class:`Damage` per damaged region;
    from ``start`` (a record boundary past the header) when given: the bytes before it are
    known already (a verified index file describes them).

    Never raises on bad input: a reader must come up with whatever survived.
    """
    header, problem = parse_header(data)
    if problem == UNSUPPORTED_VERSION:
        # A newer writer: its record framing may differ, so do not guess; leave it alone.
        return ScanResult(header, damages=[Damage(file=file, offset=0, bytes_skipped=len(data),
                                                  reason=UNSUPPORTED_VERSION, action="skipped")])
    result = ScanResult(header)
    pos = header.header_len if header else 0
    if start is not None and header is not None:
        pos = max(pos, start)
    if header is None:
        # Unreadable header: salvage records by scanning for their magic from the start.
        first = _resync(data, 0)
        skipped = (first.offset if first else len(data))
        result.damages.append(Damage(file=file, offset=0, bytes_skipped=skipped, reason=BAD_HEADER))
        if first is None:
            result.tail_damaged = True
            return result
        pos = first.offset
    result.data_end = pos
    while pos < len(data):
        found = check_record(data, pos)
        if isinstance(found, RecordRef):
            result.records.append(found)
            pos = result.data_end = found.end
            continue
        nxt = _resync(data, pos + 1)
        if nxt is None:
            reason = TORN_TAIL if _looks_torn(data, pos, found) else found
            result.damages.append(Damage(file=file, offset=pos, bytes_skipped=len(data) - pos, reason=reason))
            result.tail_damaged = True
            break
        # "Runs past the end" with intact records after it means the length itself is wrong.
        reason = BAD_LENGTH if found == TRUNCATED else found
        result.damages.append(Damage(file=file, offset=pos, bytes_skipped=nxt.offset - pos, reason=reason))
        pos = nxt.offset
    return result


def _looks_torn(data: Image, pos: int, reason: str) -> bool:
    """A partial last record (an interrupted append), as opposed to a corrupted one.

    A record running past the end of file is what a crash mid-write leaves; an all-zero
    tail is what some filesystems leave after power loss (size updated, data not).
    """
    return reason == TRUNCATED or not data[pos:].strip(b"\0")


# -- files ------------------------------------------------------------------------------------

def segment_name(number: int) -> str:
    return f"seg-{number:010d}{SEGMENT_SUFFIX}"


def segment_number(path: Path) -> int | None:
    name = path.name
    if not (name.startswith("seg-") and name.endswith(SEGMENT_SUFFIX)):
        return None
    digits = name[4 : -len(SEGMENT_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    found = [(n, p) for p in directory.iterdir() if (n := segment_number(p)) is not None and p.is_file()]
    return sorted(found)


def fsync_dir(directory: Path) -> None:
    """Make a create/rename/unlink in ``directory`` durable (POSIX needs the directory fsynced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_IOV_MAX = 512


def write_chunks(fd: int, chunks: list[bytes]) -> int:
    """Write ``chunks`` in order with writev (no concatenated copy of a batch); bytes written."""
    total = 0
    for i in range(0, len(chunks), _IOV_MAX):
        group = chunks[i : i + _IOV_MAX]
        want = sum(len(c) for c in group)
        done = os.writev(fd, group)
        if done < want:  # a short write (signal, quota): finish this group the slow way
            write_all(fd, b"".join(group)[done:])
        total += want
    return total


def atomic_write(path: Path, chunks: Iterable[bytes], *, fsync: bool = True) -> None:
    """Write ``path`` so that a crash leaves either the old file or the complete new one.

    Write a temporary sibling, fsync it, rename it over ``path``, fsync the directory.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # history is private
    try:
        for chunk in chunks:
            write_all(fd, chunk)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def remove_leftovers(directory: Path) -> list[Path]:
    """Temporary files of an interrupted create or compaction: never the only copy of anything."""
    removed = []
    for p in [*directory.glob(f"seg-*{SEGMENT_SUFFIX}{TMP_SUFFIX}"), *directory.glob(f"seg-*.idx{TMP_SUFFIX}"),
              *directory.glob(f"seg-*.rows{TMP_SUFFIX}")]:
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
