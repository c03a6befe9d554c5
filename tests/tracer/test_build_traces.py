"""Builds become traces: completed sessions from the bus, and processes using the tracing API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from buildtel.services.tracer.query import render_tree
from buildtel.shared.codec import encode
from buildtel.shared.protocol import BuildSession, Phase, TargetMetrics, new_session_id
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from buildtel.shared.tracemodel import SESSION_ATTR, session_span_id
from tests.tracer.helpers import eventually
from tests.util import stack_env

STEP = Path(__file__).with_name("traced_step.py")


def _session(sid: str, **kw: Any) -> BuildSession:
    t0 = time.time() - 60
    targets = [
        TargetMetrics(name="//app:lib", start=t0 + 1, end=t0 + 4, duration_s=3.0, worker="w1", cache="miss",
                      phases=[Phase("compile", 2.0), Phase("link", 1.0)], deps=["//base:core"], cpu_s=2.5),
        TargetMetrics(name="//app:test", start=t0 + 4, end=t0 + 9, duration_s=5.0, worker="w2", cache="miss",
                      status="failed", exit_code=3),
        TargetMetrics(name="//base:core", start=t0 + 0.5, end=t0 + 1, duration_s=0.5, worker="w1",
                      cache="remote_hit"),
    ]
    fields: dict[str, Any] = {"id": sid, "name": "ci-build", "start": t0, "finish": t0 + 10, "duration_s": 10.0,
                              "outcome": "failed", "exit_code": 1, "command": ["make", "-j8"], "agents": ["agent-a"],
                              "targets": targets, "trace_id": sid, "labels": {"pipeline": "nightly"}}
    fields.update(kw)
    return BuildSession(**fields)


async def _publish_session(nc: Any, settings: Settings, session: BuildSession, msg_id: str | None = None) -> None:
    subjects = Subjects(settings.namespace)
    await nc.jetstream().publish(subjects.sessions_completed, encode(session),
                                 headers={"Nats-Msg-Id": msg_id or session.id})


async def test_completed_session_becomes_one_trace_queryable_by_session_id(tracer, client, nc, settings) -> None:
    sid = new_session_id()
    session = _session(sid)
    await _publish_session(nc, settings, session)
    trace = await eventually(lambda: client.session(sid))
    assert trace.trace_id == sid and trace.session_ids == [sid]
    by_name = {s.name: s for s in trace.spans}
    root = by_name["ci-build"]
    assert root.parent_span_id == "" and root.span_id == session_span_id(sid)
    assert (root.status_code, root.status_message) == (2, "build failed (exit code 1)")
    assert root.attributes[SESSION_ATTR] == sid and root.attributes["build.command"] == ["make", "-j8"]
    assert root.attributes["build.label.pipeline"] == "nightly"
    assert root.end_ns - root.start_ns == 10_000_000_000
    for name in ("//app:lib", "//app:test", "//base:core"):
        assert by_name[name].parent_span_id == root.span_id, name
    lib, test = by_name["//app:lib"], by_name["//app:test"]
    assert lib.status_code == 1 and lib.attributes["build.worker"] == "w1" and lib.attributes["build.cache"] == "miss"
    assert (test.status_code, test.status_message) == (2, "failed (exit code 3)")
    assert by_name["//base:core"].attributes["build.cache_hit"] is True
    compile_, link = by_name["compile"], by_name["link"]
    assert compile_.parent_span_id == link.parent_span_id == lib.span_id
    # Phases run back to back from the target's start.
    assert compile_.start_ns == lib.start_ns and compile_.end_ns == link.start_ns and link.end_ns == lib.end_ns
    assert len(trace.spans) == 6
    # The same trace answers to its trace id, and the tree shows the hierarchy with timings.
    assert [s.span_id for s in (await client.get(sid)).spans] == [s.span_id for s in trace.spans]
    tree = render_tree(trace)
    assert "ci-build" in tree and "├─ //app:lib" in tree and "│  ├─ compile" in tree and "ERROR" in tree
    assert "10.000s" in tree and "3.000s" in tree


async def test_redelivered_session_is_stored_once(tracer, client, nc, settings) -> None:
    sid = new_session_id()
    session = _session(sid)
    await _publish_session(nc, settings, session, "first")
    await _publish_session(nc, settings, session, "second")  # another Msg-Id: JetStream keeps both
    subjects = Subjects(settings.namespace)

    async def drained() -> bool:
        info = await nc.jetstream().consumer_info(subjects.sessions_stream, "tracer")
        return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq >= 2

    await eventually(drained)
    trace = await client.session(sid)
    assert len(trace.spans) == 6 and len({s.span_id for s in trace.spans}) == 6
    assert (await client.stats()).sessions_synthesized == 1


async def test_undecodable_session_goes_to_dead_letters_and_service_goes_on(tracer, client, nc, settings) -> None:
    subjects = Subjects(settings.namespace)
    dead = await nc.subscribe(subjects.dead_letter("tracer"))
    await nc.jetstream().publish(subjects.sessions_completed, b"\x93not a session", headers={"Nats-Msg-Id": "bad"})
    msg = await dead.next_msg(timeout=10)
    from buildtel.shared.bus import dead_letter_decoder

    letter = dead_letter_decoder.decode(msg.data)
    assert letter.service == "tracer" and "undecodable session" in letter.reason
    assert letter.data == b"\x93not a session"
    sid = new_session_id()
    await _publish_session(nc, settings, _session(sid))
    assert len((await eventually(lambda: client.session(sid))).spans) == 6


async def _run_step(settings: Settings, depth: int, **env_extra: str) -> list[dict[str, Any]]:
    env = dict(os.environ, **stack_env(settings))
    env.pop("TRACEPARENT", None)
    env.pop("TRACESTATE", None)
    env.update(BUILDER_TELEMETRY_NATS_URL=settings.nats_url or "", BUILDER_TELEMETRY_NAMESPACE=settings.namespace,
               BUILDER_TELEMETRY_LOG_FORMAT="json", OTEL_SERVICE_NAME="step-0", **env_extra)
    proc = await asyncio.create_subprocess_exec(sys.executable, str(STEP), "0", str(depth), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out)


async def test_build_across_three_processes_is_one_trace(tracer, client, settings) -> None:
    seen = await _run_step(settings, 3)
    assert [s["level"] for s in seen] == [0, 1, 2]
    trace_id = seen[0]["trace_id"]
    assert {s["trace_id"] for s in seen} == {trace_id}
    # Each child was handed its parent's span as TRACEPARENT.
    assert seen[0]["traceparent_in"] is None
    for parent, child in ((seen[0], seen[1]), (seen[1], seen[2])):
        version, tid, parent_id, flags = child["traceparent_in"].split("-")
        assert (version, tid, parent_id) == ("00", trace_id, parent["span_id"])
        assert int(flags, 16) & 0x01  # sampled (0x02, "random trace id", may be set too)
    trace = await eventually(lambda: client.get(trace_id), ok=lambda t: len(t.spans) == 3)
    spans = {s.name: s for s in trace.spans}
    assert spans["build"].parent_span_id == ""
    assert spans["compile"].parent_span_id == spans["build"].span_id == seen[0]["span_id"]
    assert spans["link"].parent_span_id == spans["compile"].span_id == seen[1]["span_id"]
    assert [spans[n].service_name for n in ("build", "compile", "link")] == ["step-0", "step-1", "step-2"]
    # Children finish inside their parents.
    assert spans["build"].start_ns <= spans["compile"].start_ns <= spans["link"].start_ns
    assert spans["link"].end_ns <= spans["compile"].end_ns <= spans["build"].end_ns
    assert spans["link"].attributes["step.args"] == ["2", "3"]
    assert [e.name for e in spans["compile"].events] == ["step.started"]


async def test_agent_spans_hang_under_the_session_span(tracer, client, nc, settings) -> None:
    sid = new_session_id()
    seen = await _run_step(settings, 2, TEST_SESSION_ID=sid)
    assert seen[0]["trace_id"] == sid  # the session id is the trace id
    await _publish_session(nc, settings, _session(sid))
    trace = await eventually(lambda: client.session(sid), ok=lambda t: len(t.spans) == 8)
    spans = {s.name: s for s in trace.spans}
    root = spans["ci-build"]
    assert [s for s in trace.spans if not s.parent_span_id] == [root]  # ONE tree
    assert spans["build"].parent_span_id == root.span_id
    assert spans["compile"].parent_span_id == spans["build"].span_id
    assert spans["//app:lib"].parent_span_id == root.span_id
