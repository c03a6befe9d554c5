"""Hypothesis fuzzing: whatever the bytes, importers raise ImportFormatError or return sessions.

"Never anything else" includes the result itself: every session must survive the
wire encoding, so a publish can never fail half-way on a value an importer let in.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildtel.shared.codec import decode_session, encode
from buildtel.shared.importers.bep import parse_bep
from buildtel.shared.importers.chrome_trace import parse_chrome_trace
from buildtel.shared.importers.common import ImportFormatError, ImportResult
from buildtel.shared.importers.ninja import parse_ninja_log
from tests.importers.importer_samples import BEP, NINJA, TRACE

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NINJA_LINES = (NINJA / "zstd-release-then-incremental.ninja_log").read_bytes().splitlines(keepends=True)
BEP_LINES = (BEP / "kahlys-battools_bazel7.1.2_test_build_events.json").read_bytes().splitlines(keepends=True)
CLANG = json.loads((TRACE / "clang-zlib-adler32.c.json").read_bytes())


def _check(result: ImportResult) -> None:
    for session in result.sessions:
        assert decode_session(encode(session)).id == session.id
    for span in getattr(result, "spans", []):
        assert span.dur_us >= 0


def _run(parse: Any, data: bytes) -> ImportResult | None:
    try:
        result = parse(data)
    except ImportFormatError as exc:
        assert exc.line >= 1 and str(exc).startswith(f"line {exc.line}: ")
        return None
    _check(result)
    return result


@st.composite
def mutated(draw: st.DrawFn, lines: list[bytes]) -> bytes:
    """A real file with a few lines damaged: bytes replaced, inserted, deleted, lines dropped or duplicated."""
    out = list(lines)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(out) - 1))
        op = draw(st.sampled_from(["replace", "insert", "delete", "drop", "dup", "swap"]))
        line = out[i]
        if op == "drop" and len(out) > 1:
            del out[i]
        elif op == "dup":
            out.insert(i, line)
        elif op == "swap":
            j = draw(st.integers(0, len(out) - 1))
            out[i], out[j] = out[j], out[i]
        else:
            pos = draw(st.integers(0, len(line)))
            junk = draw(st.binary(min_size=0 if op == "delete" else 1, max_size=8))
            cut = draw(st.integers(0, 8)) if op != "insert" else 0
            out[i] = line[:pos] + (b"" if op == "delete" else junk) + line[pos + cut:]
    return b"".join(out)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    assert _run(parse_ninja_log, data) is None or data.startswith(b"# ninja log v")
    _run(parse_bep, data)
    _run(parse_chrome_trace, data)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_after_a_valid_header(data: bytes) -> None:
    _run(parse_ninja_log, b"# ninja log v5\n" + data)
    _run(parse_ninja_log, b"# ninja log v7\n0\t1\t0\ta\tab\n" + data)


@FUZZ
@given(mutated(NINJA_LINES))
def test_mutated_ninja_log(data: bytes) -> None:
    result = _run(parse_ninja_log, data)
    if result is not None:
        for s in result.sessions:
            assert all(t.duration_s >= 0 and t.end >= t.start for t in s.targets)


@FUZZ
@given(mutated(BEP_LINES))
def test_mutated_bep_stream_is_imported_with_warnings(data: bytes) -> None:
    result = _run(parse_bep, data)
    assert result is None or len(result.sessions) == 1


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
BEP_KINDS = st.sampled_from(["started", "targetCompleted", "testResult", "actionCompleted", "buildFinished",
                             "buildMetrics", "structuredCommandLine", "pattern", "workspaceStatus",
                             "targetConfigured", "configuration", "progress", "somethingNew"])
PAYLOADS = ["started", "completed", "testResult", "action", "finished", "buildMetrics", "structuredCommandLine",
            "workspaceStatus", "configured", "configuration", "aborted", "progress", "expanded"]


@st.composite
def bep_event(draw: st.DrawFn) -> bytes:
    kind = draw(BEP_KINDS)
    ev: dict[str, Any] = {"id": {kind: draw(st.dictionaries(st.sampled_from(
        ["label", "run", "shard", "attempt", "configuration", "primaryOutput", "pattern", "commandLineLabel", "id"]),
        JSON, max_size=4))}}
    for key in draw(st.lists(st.sampled_from(PAYLOADS), max_size=2)):
        ev[key] = draw(st.dictionaries(st.text(max_size=30) | st.sampled_from(
            ["uuid", "startTime", "startTimeMillis", "status", "testAttemptDurationMillis", "testAttemptStart",
             "exitCode", "finishTime", "success", "sections", "item", "actionSummary", "timingMetrics",
             "cachedLocally", "executionInfo", "type", "endTime", "targetKind", "mnemonic"]), JSON, max_size=5))
    if draw(st.booleans()):
        ev["lastMessage"] = draw(JSON)
    return json.dumps(ev).encode()


@FUZZ
@given(st.lists(bep_event(), min_size=1, max_size=8))
def test_random_bep_events_never_crash(events: list[bytes]) -> None:
    result = _run(parse_bep, b"\n".join(events))
    assert result is not None  # every line is a build event, so there is always a session


TRACE_EVENT = st.fixed_dictionaries(
    {"ph": st.sampled_from(["X", "B", "E", "M", "C", "i"]) | JSON},
    optional={"ts": st.integers(-10**6, 10**7) | st.floats() | JSON, "dur": st.integers(-5, 10**6) | JSON,
              "pid": st.integers(0, 3) | JSON, "tid": st.integers(0, 3) | JSON, "name": st.text(max_size=10) | JSON,
              "cat": st.text(max_size=10) | JSON, "args": JSON},
)


@FUZZ
@given(st.lists(TRACE_EVENT, max_size=12), st.booleans())
def test_random_trace_events(events: list[dict[str, Any]], wrapped: bool) -> None:
    doc: Any = {"traceEvents": events} if wrapped else events
    result = _run(parse_chrome_trace, json.dumps(doc).encode())
    if result is not None:
        for i, s in enumerate(result.spans):
            assert s.parent < 0 or result.spans[s.parent].start_us <= s.start_us
            assert s.parent != i


@FUZZ
@given(st.data())
def test_mutated_clang_trace(data: st.DataObject) -> None:
    events = list(CLANG["traceEvents"])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(events) - 1))
        ev = dict(events[i])
        ev[data.draw(st.sampled_from(["ts", "dur", "ph", "pid", "tid", "name", "args"]))] = data.draw(JSON)
        events[i] = ev
    _run(parse_chrome_trace, json.dumps({**CLANG, "traceEvents": events}).encode())
