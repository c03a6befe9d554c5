"""The persisted index: one ``seg-N.idx`` file beside each segment, so opening reads summaries
instead of re-reading and checksumming every record (docs/storage-format.md "Index files").

A sidecar describes every record of its segment: one
:class:`~buildtel.services.storage.index.Summary` row and the sorted target-name hashes per
record, in file order, including records retention has dropped since (retention is a policy
re-applied at every open).  It is written atomically (``.tmp``, fsync, rename) when its segment
is sealed (full, retired, compacted) and, for the active segment, when the store closes.

A sidecar is used only when it verifies: its CRC; the segment number and the segment header's
``created`` time (a compaction rewrite has a new one); the segment's size and modification
time exactly as when the sidecar was written (anything that wrote to the file since, an append
after a reopen or a foreign writer, changes them); and the record at the last row's offset
intact with the row's length.  Anything else, and the segment is scanned and checksummed as
before.  A sidecar is a cache of its segment, never the only copy of anything.  Bit rot that
leaves the modification time alone is found by ``verify()`` (the storage service runs it in
the background after every open) or when the record is read.

Layout (little-endian)::

    magic    8s  b"\\x89BTIDX\\r\\n"
    version  u16 1
    reserved u16 0
    segment  u64 segment number
    created  f64 the segment header's created time
    covered  u64 the segment's size
    mtime    u64 the segment's modification time, ns
    count    u32 rows
    body     msgpack [rows: [Summary (array) ...], counts: bin, hashes: bin]
             counts: u32 per row, how many target-name hashes it has; hashes: all rows' sorted
             u32 hashes, concatenated (both little-endian, read with numpy.frombuffer)
    crc      u32 crc32 of everything before it
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from buildtel.services.storage import format as fmt
from buildtel.services.storage.summary import Summary

SUFFIX = ".idx"
MAGIC = b"\x89BTIDX\r\n"
VERSION = 1
_HEAD = struct.Struct("<8sHHQdQQI")


def path_for(segment_path: Path) -> Path:
    return segment_path.with_suffix(SUFFIX)


def _enc_hook(obj: Any) -> Any:
    return None  # Summary.segment (an open file): not persisted


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder(tuple[list[Summary], bytes, bytes])


def encode(number: int, created: float, covered: int, mtime_ns: int, rows: list[Summary],
           hashes: list[array[int]]) -> bytes:
    counts = array("I", (len(h) for h in hashes))
    flat = array("I")
    for h in hashes:
        flat.extend(h)
    if sys.byteorder != "little":  # pragma: no cover - the format is little-endian everywhere
        counts.byteswap()
        flat.byteswap()
    body = _encoder.encode((rows, counts.tobytes(), flat.tobytes()))
    return frame(MAGIC, VERSION, number, created, covered, mtime_ns, len(rows), body)


def frame(magic: bytes, version: int, number: int, created: float, covered: int, mtime_ns: int, count: int,
          body: bytes) -> bytes:
    """A file that caches something of one segment (this module's index files, ``rowfile.py``'s row
    files): the head naming the segment as it was, the body, and the CRC-32 of both."""
    head = _HEAD.pack(magic, version, 0, number, created, covered, mtime_ns, count)
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + body + struct.pack("<I", crc)


def unframe(path: Path, magic: bytes, version: int, number: int, created: float, size: int,
            mtime_ns: int) -> tuple[memoryview, int, int] | str:
    """(body, row count, covered size) of a file :func:`frame` wrote, when its CRC holds and its head
    names the segment as it is now (number, ``created``, ``size``, ``mtime_ns``); else why not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc}"
    if len(data) < _HEAD.size + 4:
        return "short"
    got_magic, got_version, _, seg_no, seg_created, covered, seg_mtime, count = _HEAD.unpack_from(data)
    if got_magic != magic:
        return "bad magic"
    if got_version != version:
        return f"version {got_version}"
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) != crc:
        return "checksum mismatch"
    if seg_no != number or seg_created != created:
        return "written for another file"  # e.g. a segment compacted after this was written
    if covered != size or seg_mtime != mtime_ns:
        return "the segment changed since"
    return memoryview(data)[_HEAD.size:-4], count, covered


def head_matches(path: Path, magic: bytes, version: int, number: int, created: float, size: int,
                 mtime_ns: int) -> bool:
    """Whether the head of a :func:`frame` file names the segment as it is (no CRC check)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD.size)
    except OSError:
        return False
    if len(head) < _HEAD.size:
        return False
    got = _HEAD.unpack(head)
    return (got[0], got[1], got[3], got[4], got[5], got[6]) == (magic, version, number, created, size, mtime_ns)


def write(segment_path: Path, number: int, created: float, rows: list[Summary], hashes: list[array[int]],
          *, fsync: bool) -> None:
    """Atomically (re)place the sidecar of ``segment_path`` (which nothing writes to any more)."""
    st = os.stat(segment_path)
    data = encode(number, created, st.st_size, st.st_mtime_ns, rows, hashes)
    fmt.atomic_write(path_for(segment_path), [data], fsync=fsync)


@dataclass(slots=True)
class Loaded:
    covered: int
    rows: list[Summary]
    counts: bytes  # u32 little-endian per row
    hashes: bytes  # u32 little-endian, all rows


def read(segment_path: Path, number: int, created: float, image: fmt.Image, mtime_ns: int) -> Loaded | str:
    """The sidecar's rows when it verifies against ``image`` (the segment's bytes) and the
    segment's ``mtime_ns``, else why not."""
    got = unframe(path_for(segment_path), MAGIC, VERSION, number, created, len(image), mtime_ns)
    if isinstance(got, str):
        return got
    body, count, covered = got
    try:
        rows, counts, hashes = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        return f"undecodable: {exc}"
    if len(rows) != count or len(counts) != 4 * count or len(hashes) % 4:
        return "row count mismatch"
    if rows:
        last = rows[-1]
        ref = fmt.check_record(image, last.offset)
        if not isinstance(ref, fmt.RecordRef) or ref.length != last.length \
                or last.offset + fmt.RECORD_HEADER_LEN + last.length > covered:
            return "does not match the segment"
    return Loaded(covered=covered, rows=rows, counts=counts, hashes=hashes)


def remove(segment_path: Path) -> None:
    try:
        os.unlink(path_for(segment_path))
    except FileNotFoundError:
        pass
