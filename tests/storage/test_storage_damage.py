"""Damaged files: torn tails, bit flips, bad headers, newer versions.  The store always opens,
keeps every intact record, reports each damaged region and logs it as ``storage.damaged``."""

from __future__ import annotations

import shutil
import struct
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from buildtel.services.storage import format as fmt
from buildtel.services.storage.store import TelemetryStorage


async def write_store(path: Path, sessions) -> list[fmt.RecordRef]:
    store = TelemetryStorage(path, fsync=False)
    await store.open()
    await store.append_many(sessions)
    await store.close()
    (seg,) = sorted(path.glob("seg-*.btl"))
    return fmt.scan(seg.read_bytes(), str(seg)).records


def segment(path: Path) -> Path:
    (seg,) = sorted(path.glob("seg-*.btl"))
    return seg


def flip_in_place(path: Path, pos: int) -> None:
    """Flip one bit without replacing the file (the store keeps reading the same inode)."""
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))


async def reopen(path: Path) -> tuple[TelemetryStorage, list[dict]]:
    store = TelemetryStorage(path, fsync=False)
    with capture_logs() as logs:
        await store.open()
    return store, [e for e in logs if e["event"] == "storage.damaged"]


# -- the pure format ------------------------------------------------------------------------

def test_records_round_trip_and_header_is_versioned() -> None:
    header = fmt.encode_header(created=1234.5)
    parsed, problem = fmt.parse_header(header)
    assert problem is None and parsed == fmt.SegmentHeader(fmt.FORMAT_VERSION, fmt.HEADER_LEN, 1234.5)
    payloads = [b"one", b"", b"x" * 70_000]
    image = header + b"".join(fmt.encode_record(p, stored_at=10.0) for p in payloads)
    res = fmt.scan(image, "f")
    assert not res.damages and [fmt.payload_of(image, r) for r in res.records] == payloads
    assert all(r.stored_at == 10.0 for r in res.records)


def test_a_flipped_length_is_caught_by_the_checksum() -> None:
    image = bytearray(fmt.encode_header() + fmt.encode_record(b"a" * 100) + fmt.encode_record(b"b" * 100))
    struct.pack_into("<I", image, fmt.HEADER_LEN + 8, 50)  # first record now claims 50 bytes
    res = fmt.scan(bytes(image), "f")
    assert [fmt.payload_of(bytes(image), r) for r in res.records] == [b"b" * 100]
    assert [(d.offset, d.reason) for d in res.damages] == [(fmt.HEADER_LEN, fmt.CHECKSUM_MISMATCH)]


def test_zero_filled_tail_is_a_torn_tail() -> None:
    image = fmt.encode_header() + fmt.encode_record(b"ok") + b"\0" * 300
    res = fmt.scan(image, "f")
    assert len(res.records) == 1 and res.tail_damaged
    assert res.damages[0].reason == fmt.TORN_TAIL and res.damages[0].bytes_skipped == 300


# -- the store --------------------------------------------------------------------------------

async def test_truncated_at_every_few_bytes_of_the_last_record(tmp_path: Path, make_session) -> None:
    sessions = [make_session(i, finish=time.time() - 100 + i) for i in range(6)]
    base = tmp_path / "base"
    records = await write_store(base, sessions)
    last = records[-1]
    image = segment(base).read_bytes()
    assert last.end == len(image)
    cuts = [*range(last.offset + 1, last.end, 37), last.offset + 3, last.offset + 24, last.end - 1]
    for cut in cuts:
        d = tmp_path / f"cut{cut}"
        shutil.copytree(base, d)
        segment(d).write_bytes(image[:cut])
        store, logged = await reopen(d)
        try:
            report = store.last_report
            assert [(x.offset, x.bytes_skipped, x.reason, x.action) for x in report.damages] == [
                (last.offset, cut - last.offset, fmt.TORN_TAIL, "truncated")], cut
            assert len(logged) == 1 and logged[0]["reason"] == fmt.TORN_TAIL and logged[0]["offset"] == last.offset
            assert [s.id for s in await store.recent(10)] == [s.id for s in reversed(sessions[:-1])]
            # The store carries on: the lost session can be stored again (redelivery) ...
            assert await store.append_many([sessions[-1]]) == [True]
        finally:
            await store.close()
        # ... and the torn tail is gone for good: the next open is clean and complete.
        store, logged = await reopen(d)
        assert store.last_report.ok and not logged and await store.count() == 6
        await store.close()


@pytest.mark.parametrize("where", ["record_header", "payload", "crc"])
async def test_bit_flip_in_a_middle_record(tmp_path: Path, make_session, where: str) -> None:
    sessions = [make_session(i, finish=time.time() - 100 + i) for i in range(5)]
    records = await write_store(tmp_path / "t", sessions)
    victim = records[2]
    pos = {"record_header": victim.offset + 9, "payload": victim.offset + 24 + victim.length // 2,
           "crc": victim.offset + 21}[where]
    seg = segment(tmp_path / "t")
    image = bytearray(seg.read_bytes())
    image[pos] ^= 0x10
    seg.write_bytes(bytes(image))
    store, logged = await reopen(tmp_path / "t")
    try:
        damages = store.last_report.damages
        assert len(damages) == 1 and damages[0].offset == victim.offset
        assert damages[0].bytes_skipped == victim.end - victim.offset
        assert damages[0].reason in (fmt.CHECKSUM_MISMATCH, fmt.BAD_LENGTH)
        assert damages[0].action == "kept"  # mid-file damage is left in place for inspection
        assert logged and logged[0]["file"] == str(seg)
        kept = [s for i, s in enumerate(sessions) if i != 2]
        assert {s.id for s in await store.recent(10)} == {s.id for s in kept}
        for s in kept:
            assert await store.get(s.id) == s
        # Writes go on (into a fresh segment: never append behind damage).
        new = make_session(9)
        assert await store.append_many([new]) == [True]
        assert store.stats().segments == 2
    finally:
        await store.close()


async def test_flipped_file_header_keeps_every_record(tmp_path: Path, make_session) -> None:
    sessions = [make_session(i) for i in range(4)]
    await write_store(tmp_path / "t", sessions)
    seg = segment(tmp_path / "t")
    image = bytearray(seg.read_bytes())
    image[2] ^= 0xFF
    seg.write_bytes(bytes(image))
    store, logged = await reopen(tmp_path / "t")
    assert [d.reason for d in store.last_report.damages] == [fmt.BAD_HEADER]
    assert logged and await store.count() == 4
    await store.close()


async def test_garbage_between_records_is_skipped_by_resync(tmp_path: Path, make_session) -> None:
    sessions = [make_session(i) for i in range(4)]
    records = await write_store(tmp_path / "t", sessions)
    seg = segment(tmp_path / "t")
    image = seg.read_bytes()
    junk = b"\xd3BT" + b"junk" * 10 + fmt.REC_MAGIC + b"\xff" * 30  # includes a false magic
    cut = records[2].offset
    seg.write_bytes(image[:cut] + junk + image[cut:])
    store, _ = await reopen(tmp_path / "t")
    assert [(d.offset, d.bytes_skipped) for d in store.last_report.damages] == [(cut, len(junk))]
    assert await store.count() == 4
    await store.close()


async def test_newer_format_version_is_left_alone(tmp_path: Path, make_session) -> None:
    d = tmp_path / "t"
    await write_store(d, [make_session(0)])
    body = struct.pack("<8sHHd", fmt.FILE_MAGIC, fmt.FORMAT_VERSION + 1, fmt.HEADER_LEN, time.time())
    import zlib

    newer = body + struct.pack("<I", zlib.crc32(body)) + b"records in a layout this reader cannot know"
    future = d / fmt.segment_name(7)
    future.write_bytes(newer)
    store, _ = await reopen(d)
    try:
        assert [(x.reason, x.action) for x in store.last_report.damages] == [(fmt.UNSUPPORTED_VERSION, "skipped")]
        assert await store.count() == 1
        await store.append_many([make_session(1)])
        await store.enforce_retention()
    finally:
        await store.close()
    assert future.read_bytes() == newer  # never rewritten, appended to or deleted
    assert (d / fmt.segment_name(8)).exists()  # new writes got a new file after it


async def test_record_going_bad_after_open_is_caught_on_read(tmp_path: Path, make_session) -> None:
    sessions = [make_session(i, finish=time.time() - 100 + i) for i in range(3)]
    store = TelemetryStorage(tmp_path / "t", fsync=False)
    await store.open()
    try:
        await store.append_many(sessions)
        seg = segment(tmp_path / "t")
        victim = fmt.scan(seg.read_bytes(), str(seg)).records[1]
        flip_in_place(seg, victim.offset + 24 + 10)  # bit rot under a running store
        with capture_logs() as logs:
            assert await store.get(sessions[1].id) is None  # never a silently wrong session
            assert [s.id for s in await store.recent(5)] == [sessions[2].id, sessions[0].id]
        assert any(e["event"] == "storage.damaged" and e["reason"] == fmt.CHECKSUM_MISMATCH for e in logs)
    finally:
        await store.close()
