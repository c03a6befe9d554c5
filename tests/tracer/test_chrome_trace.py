"""A build as Chrome Trace Event JSON (Perfetto, chrome://tracing): a track per worker, events
that nest on every track, and the OpenTelemetry CI/CD attributes on the build's spans."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from buildtel.services.tracer.chrometrace import chrome_trace
from buildtel.services.tracer.sessions import session_spans
from buildtel.shared.protocol import new_session_id
from buildtel.shared.tracemodel import SpanRecord
from tests.tracer.test_build_traces import _session
from tests.tracer.test_cli_trace import _buildtel, _stored_session


def _tracks(doc: dict[str, Any]) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], list[dict[str, Any]]]]:
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    events: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            events[(e["pid"], e["tid"])].append(e)
    return names, events


def _assert_nested(events: list[dict[str, Any]]) -> None:
    """Complete events of one track: each starts after the enclosing one ends or ends inside it."""
    open_ends: list[float] = []
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while open_ends and open_ends[-1] <= e["ts"] + 1e-9:
            open_ends.pop()
        end = e["ts"] + e["dur"]
        assert not open_ends or end <= open_ends[-1] + 1e-9, f"{e['name']} crosses the span below it"
        open_ends.append(end)


def test_a_build_is_one_track_per_worker_with_phases_inside_their_target() -> None:
    sid = new_session_id()
    doc = json.loads(json.dumps(chrome_trace(session_spans(_session(sid)))))  # plain JSON, as written
    names, events = _tracks(doc)
    by_name = {e["name"]: e for es in events.values() for e in es}
    assert set(by_name) == {"ci-build", "//app:lib", "//app:test", "//base:core", "compile", "link"}
    track = {n: names[(e["pid"], e["tid"])] for n, e in by_name.items()}
    assert track == {"ci-build": "build", "//app:lib": "worker w1", "//base:core": "worker w1",
                     "compile": "worker w1", "link": "worker w1", "//app:test": "worker w2"}
    # Times in microseconds from the build's start; the 3 s target holds its 2 s and 1 s phases.
    assert by_name["ci-build"]["ts"] == 0 and by_name["ci-build"]["dur"] == 10_000_000
    lib = by_name["//app:lib"]
    assert (lib["ts"], lib["dur"]) == (1_000_000, 3_000_000)
    assert by_name["compile"]["ts"] == lib["ts"] and by_name["link"]["ts"] == lib["ts"] + 2_000_000
    assert by_name["//app:test"]["cat"] == "target,miss,failed" and by_name["//app:test"]["args"]["status"] == "ERROR"
    assert by_name["//base:core"]["cat"] == "target,remote_hit,success"
    for es in events.values():
        _assert_nested(es)
    processes = [e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert len(processes) == 1 and doc["displayTimeUnit"] == "ms"


def test_the_build_spans_carry_the_cicd_semantic_convention_attributes() -> None:
    sid = new_session_id()
    root, *rest = session_spans(_session(sid))
    assert {k: v for k, v in root.attributes.items() if k.startswith("cicd.")} == {
        "cicd.pipeline.name": "ci-build", "cicd.pipeline.run.id": sid, "cicd.pipeline.result": "failure",
        "cicd.pipeline.action.name": "BUILD"}
    tasks = {s.name: s.attributes for s in rest if "cicd.pipeline.task.name" in s.attributes}
    assert tasks["//app:test"]["cicd.pipeline.task.run.result"] == "failure"
    assert tasks["//app:lib"]["cicd.pipeline.task.run.result"] == "success"
    assert tasks["//app:lib"]["cicd.pipeline.task.run.id"] == f"{sid}///app:lib"
    abandoned = session_spans(_session(new_session_id(), outcome="abandoned"))[0]
    assert abandoned.attributes["cicd.pipeline.result"] == "error"


_interval = st.tuples(st.integers(0, 50), st.integers(0, 20))


@hsettings(max_examples=150, deadline=None)
@given(work=st.lists(st.tuples(st.sampled_from(["w1", "w2", ""]), _interval), min_size=1, max_size=25))
def test_overlapping_spans_of_one_worker_get_another_track_and_every_track_nests(work) -> None:
    """Spans of one worker that overlap (agents' clocks, retries) are all kept, on extra tracks
    of that worker, and no track has an event crossing another."""
    spans = []
    for i, (worker, (start, length)) in enumerate(work):
        attrs: dict[str, Any] = {"build.target": f"t{i}"}
        if worker:
            attrs["build.worker"] = worker
        spans.append(SpanRecord(trace_id="a" * 32, span_id=f"{i + 1:016x}", parent_span_id="", name=f"t{i}",
                                kind=1, start_ns=start * 1_000_000, end_ns=(start + length) * 1_000_000,
                                attributes=attrs, resource={"service.name": "buildtel"}))
    doc = chrome_trace(spans)
    names, events = _tracks(doc)
    assert sum(map(len, events.values())) == len(spans)
    for key, es in events.items():
        _assert_nested(es)
        workers = {e["args"].get("build.worker", "") for e in es}
        assert len(workers) == 1  # a track never mixes workers
        w = workers.pop()
        assert names[key].startswith(f"worker {w}" if w else "buildtel")


async def test_trace_export_writes_a_chrome_trace_file(tracer, client, nc, settings, tmp_path) -> None:
    sid = await _stored_session(tracer, client, nc, settings)
    path = tmp_path / "build.trace.json"
    code, out, err = await _buildtel(settings, "trace", "export", sid, "--chrome-trace", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["chrome_trace"] == str(path)
    names, events = _tracks(json.loads(path.read_text()))
    assert sum(map(len, events.values())) == 6
    assert {"build", "worker w1", "worker w2"} <= set(names.values())
    assert path.stat().st_mode & 0o077 == 0  # private, like every file the project writes
