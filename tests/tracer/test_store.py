"""The trace store on disk: survives restarts and damage, deduplicates, enforces retention."""

from __future__ import annotations

import os
import time
from pathlib import Path

from buildtel.services.tracer import segments as fmt
from buildtel.services.tracer.store import TraceStore
from buildtel.shared.tracemodel import SESSION_ATTR, SpanRecord


def _trace(i: int, spans: int = 3, session: str = "") -> list[SpanRecord]:
    tid = f"{i + 1:032x}"
    out = [SpanRecord(trace_id=tid, span_id=f"{i + 1:08x}{j + 1:08x}", name=f"s{j}", start_ns=1000 * j,
                      end_ns=1000 * j + 500, parent_span_id=f"{i + 1:08x}{1:08x}" if j else "",
                      attributes={"j": j, "blob": b"\x00" * 10, **({SESSION_ATTR: session} if session else {})})
           for j in range(spans)]
    return out


def _open(path: Path, **kw: object) -> TraceStore:
    store = TraceStore(path, retention_s=kw.pop("retention_s", 3600.0), fsync=False, **kw)  # type: ignore[arg-type]
    store.open()
    return store


def test_traces_and_session_index_survive_a_restart(tmp_path: Path) -> None:
    store = _open(tmp_path)
    store.append(_trace(0, session="s" * 32), source="otlp")
    store.append(_trace(1)[:2], source="bus")
    store.append(_trace(1)[2:], source="bus")  # the rest of trace 1 arrives later
    store.append(_trace(2), source="session", session_id="a" * 32)
    before = {tid: store.get_trace(tid) for tid in store.traces}
    store.close()
    again = _open(tmp_path)
    assert {tid: again.get_trace(tid) for tid in again.traces} == before
    assert len(again.get_trace(f"{2:032x}")) == 3
    assert again.trace_of_session("s" * 32) == f"{1:032x}" and again.resolve("a" * 32) == f"{3:032x}"
    assert again.has_synthesized("a" * 32) and not again.has_synthesized("s" * 32)
    assert again.get_trace(f"{2:032x}")[0].attributes["blob"] == b"\x00" * 10


def test_a_span_stored_twice_is_returned_once_latest_copy_winning(tmp_path: Path) -> None:
    store = _open(tmp_path)
    first = _trace(0)
    store.append(first, source="bus")
    changed = [SpanRecord(**{**{f: getattr(s, f) for f in s.__struct_fields__}, "name": "renamed"}) for s in first]
    store.append(changed, source="bus")  # a redelivered batch
    spans = store.get_trace(first[0].trace_id)
    assert len(spans) == 3 and {s.name for s in spans} == {"renamed"}


def test_torn_tail_is_cut_and_writing_resumes(tmp_path: Path) -> None:
    store = _open(tmp_path)
    store.append(_trace(0), source="otlp")
    store.close()
    [seg] = tmp_path.glob("*.btt")
    good_size = seg.stat().st_size
    record = fmt.encode_record(b"\x80" * 100, time.time())
    with open(seg, "ab") as f:
        f.write(record[: len(record) // 2])  # the crash happened mid-write
    store = TraceStore(tmp_path, retention_s=3600, fsync=False)
    report = store.open()
    assert report.truncated_bytes == len(record) // 2 and seg.stat().st_size == good_size
    store.append(_trace(1), source="otlp")
    store.close()
    store = _open(tmp_path)
    assert len(store.traces) == 2 and all(len(store.get_trace(t)) == 3 for t in store.traces)


def test_a_damaged_record_costs_only_itself(tmp_path: Path) -> None:
    store = _open(tmp_path)
    for i in range(3):
        store.append(_trace(i), source="otlp")
    store.close()
    [seg] = tmp_path.glob("*.btt")
    data = bytearray(seg.read_bytes())
    second = fmt.scan(bytes(data)).records[1]
    data[second.offset + fmt.RECORD_HEADER_LEN + 5] ^= 0xFF  # flip a payload byte: checksum mismatch
    seg.write_bytes(bytes(data))
    store = TraceStore(tmp_path, retention_s=3600, fsync=False)
    report = store.open()
    assert report.damaged_regions == 1 and report.records == 2
    assert sorted(store.traces) == [f"{1:032x}", f"{3:032x}"]


def test_retention_by_age_drops_old_segments_and_files(tmp_path: Path) -> None:
    store = _open(tmp_path, retention_s=3600.0, segment_bytes=1)  # a segment per append
    now = time.time()
    store.append(_trace(0), source="otlp", now=now - 7200)
    store.append(_trace(1), source="otlp", now=now - 10)
    assert len(list(tmp_path.glob("*.btt"))) == 2
    assert store.enforce_retention(now) == 1
    assert list(store.traces) == [f"{2:032x}"] and len(list(tmp_path.glob("*.btt"))) == 1
    store.close()
    assert list(_open(tmp_path).traces) == [f"{2:032x}"]


def test_size_and_count_caps_keep_the_newest(tmp_path: Path) -> None:
    store = _open(tmp_path, segment_bytes=1, max_bytes=10**9, max_traces=8)
    for i in range(20):
        store.append(_trace(i), source="otlp")
    store.enforce_retention()
    assert len(store.traces) <= 8 and f"{20:032x}" in store.traces and f"{1:032x}" not in store.traces
    size = store.disk_bytes()
    store.max_bytes, store.max_traces = size // 2, 1000
    store.enforce_retention()
    assert store.disk_bytes() <= size // 2 and f"{20:032x}" in store.traces
    assert sum(p.stat().st_size for p in tmp_path.glob("*.btt")) == store.disk_bytes()


def test_fsync_mode_writes_and_syncs(tmp_path: Path) -> None:
    store = TraceStore(tmp_path, retention_s=3600, fsync=True)
    store.open()
    store.append(_trace(0), source="otlp")
    store.sync()
    store.close()
    assert os.path.getsize(next(tmp_path.glob("*.btt"))) > fmt.HEADER_LEN


def test_a_trace_larger_than_a_record_is_stored_in_several(tmp_path: Path) -> None:
    # A 638,000-target build is one trace of as many spans: more than one record may hold.
    from buildtel.services.tracer.store import SPANS_PER_RECORD

    store = _open(tmp_path)
    spans = _trace(0, spans=2 * SPANS_PER_RECORD + 7, session="b" * 32)
    assert store.append(spans, source="session", session_id="b" * 32) == 3
    store.close()
    again = _open(tmp_path)
    assert again.get_trace(f"{1:032x}") == sorted(spans, key=lambda s: s.start_ns)
    assert again.has_synthesized("b" * 32)
