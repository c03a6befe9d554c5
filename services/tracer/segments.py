"""On-disk format of the trace store: append-only segment files of checksummed msgpack records.

The same framing as the session store (``services/storage/format.py``) with
its own magics, so a trace segment is never mistaken for a session segment::

    file header (HEADER_LEN = 28 bytes)
      magic     8s  b"\\x89BTTRC\\r\\n"  (binary-safe, catches text-mode mangling)
      version   u16 FORMAT_VERSION
      hdr_len   u16 where records start (grows when header fields are added)
      created   f64 Unix seconds
      crc       u32 crc32 of every header byte before it
    record*   (RECORD_HEADER_LEN + length bytes each)
      magic     4s  b"\\xd3BTS"          (what a reader resynchronises on)
      kind      u8  1 = span chunk
      flags     u8  0
      reserved  u16 0
      length    u32 payload bytes
      stored_at f64 Unix seconds
      crc       u32 crc32 of kind..stored_at and the payload
      payload   msgpack :class:`SpanChunk` (the spans of ONE trace from one ingest)

Little-endian.  The checksum covers the length, so a flipped length is caught
rather than sending the reader a random distance.  Pure functions only; the
store (``store.py``) owns files and the index.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass, field

import msgspec

from buildtel.shared.tracemodel import SpanRecord

FORMAT_VERSION = 1
FILE_MAGIC = b"\x89BTTRC\r\n"
SEGMENT_SUFFIX = ".btt"
_HEADER = struct.Struct("<8sHHd")
HEADER_LEN = _HEADER.size + 4
REC_MAGIC = b"\xd3BTS"
KIND_CHUNK = 1
_REC = struct.Struct("<4sBBHIdI")
RECORD_HEADER_LEN = _REC.size  # 24
MAX_RECORD_BYTES = 64 * 1024 * 1024


class SpanChunk(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The spans of one trace that arrived together; the unit the index points at."""

    trace_id: str
    session_id: str = ""
    source: str = ""  # "otlp", "bus" or "session" (synthesized from a BuildSession)
    start_ns: int = 0
    end_ns: int = 0
    spans: list[SpanRecord] = []


class ChunkHead(msgspec.Struct, kw_only=True):
    """The fields an index rebuild needs; msgspec skips the spans without building them."""

    trace_id: str
    session_id: str = ""
    source: str = ""
    start_ns: int = 0
    end_ns: int = 0


chunk_encoder = msgspec.msgpack.Encoder()
chunk_decoder = msgspec.msgpack.Decoder(SpanChunk)
head_decoder = msgspec.msgpack.Decoder(ChunkHead)


@dataclass(slots=True)
class Found:
    offset: int
    length: int  # payload bytes
    stored_at: float

    @property
    def end(self) -> int:
        return self.offset + RECORD_HEADER_LEN + self.length


@dataclass(slots=True)
class Scan:
    ok_header: bool
    records: list[Found] = field(default_factory=list)
    damaged: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, bytes skipped, reason)
    data_end: int = 0  # end of the last intact record: a torn tail after it is cut off
    created: float = 0.0


def encode_header(created: float | None = None) -> bytes:
    body = _HEADER.pack(FILE_MAGIC, FORMAT_VERSION, HEADER_LEN, time.time() if created is None else created)
    return body + struct.pack("<I", zlib.crc32(body))


def encode_record(payload: bytes, stored_at: float) -> bytes:
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    head = _REC.pack(REC_MAGIC, KIND_CHUNK, 0, 0, len(payload), stored_at, 0)
    crc = zlib.crc32(payload, zlib.crc32(head[4:20]))
    return head[:20] + struct.pack("<I", crc) + payload


def check_record(data: bytes | memoryview, pos: int) -> Found | str:
    """The intact record at ``pos`` or the reason it is not one."""
    if len(data) - pos < RECORD_HEADER_LEN:
        return "truncated"
    magic, kind, _flags, _res, length, stored_at, crc = _REC.unpack_from(data, pos)
    if magic != REC_MAGIC:
        return "bad_magic"
    if length > MAX_RECORD_BYTES:
        return "bad_length"
    end = pos + RECORD_HEADER_LEN + length
    if end > len(data):
        return "truncated"
    mv = memoryview(data)
    if zlib.crc32(mv[pos + RECORD_HEADER_LEN:end], zlib.crc32(mv[pos + 4:pos + 20])) != crc:
        return "checksum_mismatch"
    if kind != KIND_CHUNK:
        return "unknown_kind"
    return Found(pos, length, stored_at)


def parse_header(data: bytes) -> float | None:
    """The creation time, or ``None`` for a missing/damaged/newer header."""
    if len(data) < HEADER_LEN:
        return None
    magic, version, hdr_len, created = _HEADER.unpack_from(data, 0)
    if magic != FILE_MAGIC or version != FORMAT_VERSION or hdr_len != HEADER_LEN:
        return None
    (crc,) = struct.unpack_from("<I", data, HEADER_LEN - 4)
    return created if zlib.crc32(data[:HEADER_LEN - 4]) == crc else None


def scan(data: bytes) -> Scan:
    """Every intact record of a segment image; damaged regions are skipped by resyncing on
    the record magic, so one bad byte costs one record, not the rest of the file."""
    created = parse_header(data)
    result = Scan(ok_header=created is not None, created=created or 0.0)
    pos = HEADER_LEN if created is not None else 0
    result.data_end = pos
    size = len(data)
    while pos < size:
        found = check_record(data, pos)
        if isinstance(found, Found):
            result.records.append(found)
            pos = result.data_end = found.end
            continue
        nxt = data.find(REC_MAGIC, pos + 1)
        while nxt != -1 and not isinstance(check_record(data, nxt), Found):
            nxt = data.find(REC_MAGIC, nxt + 1)
        stop = size if nxt == -1 else nxt
        result.damaged.append((pos, stop - pos, found))
        pos = stop
    return result


def read_payload(data: bytes, found: Found) -> bytes:
    return data[found.offset + RECORD_HEADER_LEN:found.end]
