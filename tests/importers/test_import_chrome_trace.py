"""The Trace Event Format importer against real Bazel, clang and CMake traces and edge cases."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections import Counter

import msgspec
import pytest

from buildtel.shared.codec import decode_session, encode
from buildtel.shared.importers.chrome_trace import TraceSpan, parse_chrome_trace
from buildtel.shared.importers.common import ImportFormatError
from buildtel.shared.phases import breakdown
from tests.importers.importer_samples import (
    TRACE,
    be_durations,
    trace_doc,
    trace_events,
)

SAMPLES = ["engflow_tiny.json.gz", "engflow_local-jobs-4.json.gz", "clang-zlib-adler32.c.json",
           "clang-zlib-deflate.c.json", "cmake-zlib-clang-configure.json.gz"]


@pytest.mark.parametrize("name", SAMPLES)
def test_every_slice_becomes_a_span(name: str) -> None:
    events = trace_events(TRACE / name)
    xs = [e for e in events if e["ph"] == "X"]
    pairs = be_durations(events)
    result = parse_chrome_trace((TRACE / name).read_bytes())
    assert result.details["x_events"] == len(xs)
    assert result.details["be_pairs"] == len(pairs) == Counter(e["ph"] for e in events)["B"]
    assert len(result.spans) == len(xs) + len(pairs)
    assert sorted(s.dur_us for s in result.spans) == sorted([e["dur"] for e in xs] + pairs)
    if result.producer == "cmake":  # CMake's clock is monotonic: without a base time it says so
        assert [w.message.split(":")[0] for w in result.warnings] == [
            "the trace has no wall clock and no base time was given"]
    else:
        assert result.warnings == []
    for i, s in enumerate(result.spans):  # a parent encloses its child on the same thread
        if s.parent >= 0:
            p = result.spans[s.parent]
            assert p.parent < s.parent or p.parent == -1
            assert (p.pid, p.tid) == (s.pid, s.tid) and s.parent != i
            assert p.start_us <= s.start_us and s.end_us <= p.end_us
    (session,) = result.sessions
    assert decode_session(encode(session)) == session
    lo = min(s.start_us for s in result.spans)
    hi = max(s.end_us for s in result.spans)
    assert session.duration_s == (hi - lo) / 1e6


@pytest.mark.parametrize(("name", "actions"), [("engflow_tiny.json.gz", 22), ("engflow_local-jobs-4.json.gz", 80)])
def test_bazel_profile_actions_are_targets(name: str, actions: int) -> None:
    doc = trace_doc(TRACE / name)
    events = doc["traceEvents"]
    action_events = [e for e in events if e.get("cat") == "action processing"]
    assert len(action_events) == actions
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e["name"] == "thread_name"}
    result = parse_chrome_trace((TRACE / name).read_bytes())
    (session,) = result.sessions
    assert result.producer == "bazel"
    assert session.totals.targets == actions
    assert sorted(t.duration_s for t in session.targets) == sorted(e["dur"] / 1e6 for e in action_events)
    assert {t.worker for t in session.targets} == {threads[(e["pid"], e["tid"])] for e in action_events}
    assert session.labels["bazel_build_id"] == doc["otherData"]["build_id"]
    # "Wed Aug 03 17:35:01 MDT 2022": ts 0 is the profile's date, MDT = UTC-6
    if name == "engflow_tiny.json.gz":
        base = dt.datetime(2022, 8, 3, 23, 35, 1, tzinfo=dt.UTC).timestamp()
        assert result.time_base_s == base and result.time_source == "otherData.date"
        assert session.start == pytest.approx(base - 0.033)  # "Launch Blaze" starts at ts -33000


@pytest.mark.parametrize("name", ["clang-zlib-adler32.c.json", "clang-zlib-deflate.c.json"])
def test_clang_time_trace_is_one_compile_with_phases(name: str) -> None:
    doc = trace_doc(TRACE / name)
    ev = {e["name"]: e for e in doc["traceEvents"] if e["ph"] == "X" and e["tid"] == e["pid"]}
    result = parse_chrome_trace((TRACE / name).read_bytes())
    (session,) = result.sessions
    (target,) = session.targets
    src = name.removeprefix("clang-zlib-").removesuffix(".json")
    assert result.producer == "clang" and target.name == f"/home/builder/src/src/zlib/{src}"
    assert target.duration_s == ev["ExecuteCompiler"]["dur"] / 1e6
    assert target.start == pytest.approx(doc["beginningOfTime"] / 1e6 + ev["ExecuteCompiler"]["ts"] / 1e6)
    # the slices of the compile; header:/template: costs are tested in test_import_clang_costs.py
    phases = {p.name: p.duration_s for p in target.phases if not breakdown(p.name)}
    main = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["tid"] == e["pid"]]
    # deflate.c has two Frontend slices back to back; the phase is their sum
    assert phases == {n: sum(e["dur"] for e in main if e["name"] == n) / 1e6 for n in ("Frontend", "Backend")}


def test_cmake_profile_top_level_commands_are_targets() -> None:
    events = trace_events(TRACE / "cmake-zlib-clang-configure.json.gz")
    depth, top = 0, []
    for e in events:  # CMake writes one thread: nesting depth is a counter
        if e["ph"] == "B":
            if depth == 0:
                top.append(e)
            depth += 1
        else:
            depth -= 1
    result = parse_chrome_trace((TRACE / "cmake-zlib-clang-configure.json.gz").read_bytes(),
                                base_time=1_800_000_000.0)
    (session,) = result.sessions
    assert result.producer == "cmake" and result.time_source == "base_time"
    assert session.start == 1_800_000_000.0
    assert session.totals.targets == len(top)
    assert session.targets[0].name == f"{top[0]['name']} {top[0]['args']['location']}"


def test_spans_round_trip_through_msgspec() -> None:
    result = parse_chrome_trace((TRACE / "engflow_tiny.json.gz").read_bytes())
    data = msgspec.msgpack.encode(result.spans)
    assert msgspec.msgpack.decode(data, type=list[TraceSpan]) == result.spans


def _trace(events: list, wrap: bool = True) -> bytes:
    body = ",\n".join(json.dumps(e) for e in events)
    return (f'{{"traceEvents": [\n{body}\n]}}' if wrap else f"[\n{body}\n]").encode()


def test_generic_trace_b_e_matching_and_tolerated_anomalies() -> None:
    events = [
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "worker-a"}},
        {"ph": "B", "name": "outer", "ts": 0, "pid": 1, "tid": 2},
        {"ph": "X", "name": "inner", "ts": 10, "dur": 5, "pid": 1, "tid": 2},
        {"ph": "E", "ts": 100, "pid": 1, "tid": 2},
        {"ph": "E", "ts": 120, "pid": 1, "tid": 2},         # line 6: no matching B
        {"ph": "B", "name": "cut", "ts": 130, "pid": 1, "tid": 3},  # line 7: never ends
        {"ph": "C", "name": "counter", "ts": 140, "pid": 1, "args": {"v": 1}},
        {"ph": "X", "name": "late", "ts": 150, "dur": 50, "pid": 1, "tid": 2},
    ]
    result = parse_chrome_trace(_trace(events), base_time=10.0)
    assert [w.line for w in result.warnings] == [6, 7]
    assert result.details["ignored"] == {"C": 1}
    names = {s.name: s for s in result.spans}
    assert names["outer"].dur_us == 100 and names["inner"].parent == result.spans.index(names["outer"])
    assert names["cut"].dur_us == 70  # closed at the last timestamp (late ends at 200)
    (session,) = result.sessions
    assert sorted(t.name for t in session.targets) == ["cut", "late", "outer"]
    assert {t.name: t.worker for t in session.targets}["outer"] == "worker-a"
    assert session.start == 10.0 and session.duration_s == 200e-6


def test_unterminated_array_is_accepted() -> None:
    data = _trace([{"ph": "X", "name": "a", "ts": 1, "dur": 2, "pid": 1, "tid": 1}], wrap=False)
    result = parse_chrome_trace(data.rstrip(b"\n]") + b",\n")
    assert len(result.spans) == 1


@pytest.mark.parametrize(("data", "line", "text"), [
    (b"", 1, "invalid JSON"),
    (b'{"traceEvents": [\n{"ph": "X",,}\n]}', 2, "invalid JSON"),
    (b'{"foo": 1}', 1, "not a trace"),
    (b'"just a string"', 1, "not a trace"),
    (_trace([{"ph": "X", "name": "a", "ts": 1, "dur": 1}, {"ph": "X", "name": "b", "dur": 1}]), 3, "numeric 'ts'"),
    (_trace([{"ph": "X", "name": "a", "ts": 1, "dur": -1}]), 2, "negative duration"),
    (_trace([{"ph": "B", "ts": 5}, {"ph": "E", "ts": 1}], wrap=False), 3, "before its B"),
    (_trace([{"ph": "X", "ts": 1, "dur": 1}, 7]), 3, "not an object"),
    (_trace([{"name": "no phase", "ts": 1}]), 2, "'ph'"),
    (_trace([{"ph": "i", "ts": 1}]), 1, "no complete"),
    (b'{"traceEvents": [{"ph": "X", "ts": NaN, "dur": 1}]}', 1, "not finite"),
    (gzip.compress(b"[oops", mtime=0), 1, "invalid JSON"),  # mtime=0: the same id in every xdist worker
    (b"[" * 100_000, 1, "JSON"),
])
def test_garbage_is_an_import_format_error_naming_the_line(data: bytes, line: int, text: str) -> None:
    with pytest.raises(ImportFormatError) as info:
        parse_chrome_trace(data)
    assert info.value.line == line and text in str(info.value)
