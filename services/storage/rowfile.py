"""Report-row files: one ``seg-N.rows`` beside each sealed segment, so a report reads ~3 KB of
ready rows per 200-target session instead of decoding its ~40 KB record (docs/storage-format.md
"Report-row files").

A row file holds, for every record of its segment that is a session (file order), the
:class:`~buildtel.services.storage.columns.ReportRow` and the per-target columns of
``rowcache.Entry``: target-name ids into the file's own name table, durations, one code byte
(cache | status << 2) and worker-name ids.  The storage service writes it in the background
once a segment is sealed (full, retired or compacted) and for sealed segments of stores written
before row files existed; until then, and for the segment still taking appends, reports reduce
the records themselves (``rowcache.RowCache``).

Like an index file (``sidecar.py``), a row file is a cache of its segment and is used only when
it matches it: CRC, segment number, the segment header's ``created`` time, and the segment's
size and modification time exactly as when the file was written.  Anything else, and it is
ignored (and rewritten by the background worker).

Layout (little-endian): the same 48-byte head as an index file with magic ``b"\\x89BTROW\\r\\n"``,
then a msgpack :class:`Body`, then a u32 crc32 of everything before it.
"""

from __future__ import annotations

import os
import sys
from array import array
from pathlib import Path
from typing import Any

import msgspec

from buildtel.services.storage import format as fmt
from buildtel.services.storage import sidecar
from buildtel.services.storage.columns import ReportRow, decode_ids

SUFFIX = ".rows"
MAGIC = b"\x89BTROW\r\n"
VERSION = 1


class Body(msgspec.Struct, array_like=True):
    """The columns of one segment's sessions; ``counts[i]`` targets belong to ``rows[i]``."""

    rows: list[ReportRow]
    lengths: bytes  # u32 per row: the record's stored length (with the id, the cache key)
    names: list[str]  # target and worker names, the ids' table
    counts: bytes  # u32 per row
    name_ids: bytes  # u32 per target
    durations: bytes  # f64 per target
    codes: bytes  # u8 per target: cache code | status code << 2 (columns.py)
    worker_ids: bytes  # u32 per target


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Body)


def path_for(segment_path: Path) -> Path:
    return segment_path.with_suffix(SUFFIX)


def encode(number: int, created: float, covered: int, mtime_ns: int, body: Body) -> bytes:
    return sidecar.frame(MAGIC, VERSION, number, created, covered, mtime_ns, len(body.rows), _encoder.encode(body))


def write(segment_path: Path, number: int, created: float, covered: int, mtime_ns: int, body: Body,
          *, fsync: bool) -> int:
    """Atomically (re)place the row file of a segment that takes no more appends; its bytes."""
    data = encode(number, created, covered, mtime_ns, body)
    fmt.atomic_write(path_for(segment_path), [data], fsync=fsync)
    return len(data)


def read(segment_path: Path, number: int, created: float, size: int, mtime_ns: int) -> Body | str:
    """The row file of a segment when it matches the segment as it is (``size``, ``mtime_ns``),
    else why not."""
    got = sidecar.unframe(path_for(segment_path), MAGIC, VERSION, number, created, size, mtime_ns)
    if isinstance(got, str):
        return got
    data, count, _ = got
    try:
        body = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return f"undecodable: {exc}"
    n = sum(u32(body.counts))
    if (len(body.rows) != count or len(body.lengths) != 4 * count or len(body.counts) != 4 * count
            or len(body.name_ids) != 4 * n or len(body.durations) != 8 * n or len(body.codes) != n
            or len(body.worker_ids) != 4 * n):
        return "column lengths do not match"
    return body


def remove(segment_path: Path) -> None:
    try:
        os.unlink(path_for(segment_path))
    except FileNotFoundError:
        pass


def matches(segment_path: Path, number: int, created: float, size: int, mtime_ns: int) -> bool:
    """Whether the row file's head says it was written for the segment as it is (no CRC check)."""
    return sidecar.head_matches(path_for(segment_path), MAGIC, VERSION, number, created, size, mtime_ns)


u32 = decode_ids  # a little-endian u32 column as an array (the same columns the wire carries)


def le(a: array[Any]) -> bytes:
    """An array's bytes, little-endian."""
    if sys.byteorder != "little":  # pragma: no cover
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()
