"""A build started under a traced job hangs its session span under the caller's span."""

from __future__ import annotations

from buildtel.services.collector import fold
from buildtel.services.tracer.sessions import session_spans
from buildtel.shared.codec import encode
from buildtel.shared.protocol import BuildFinished, BuildStarted, new_session_id


def _session(traceparent: str | None):
    sid = new_session_id()
    meta = {b"started": encode(BuildStarted(session_id=sid, agent_id="a", seq=0, ts=10.0, traceparent=traceparent)),
            b"finished": encode(BuildFinished(session_id=sid, agent_id="a", seq=1, ts=12.0))}
    return fold.build_session(sid, meta, [], now=12.0)


def test_session_span_is_a_child_of_the_incoming_traceparent() -> None:
    session = _session("00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")
    assert session.trace_id == "ab" * 16 and session.parent_span_id == "cd" * 8
    root = session_spans(session)[0]
    assert root.trace_id == "ab" * 16 and root.parent_span_id == "cd" * 8


def test_without_a_caller_the_session_is_its_own_trace_root() -> None:
    session = _session(None)
    assert session.trace_id == session.id and session.parent_span_id is None
    assert not session_spans(session)[0].parent_span_id
