"""The tracing API as an application uses it (in a fresh process: the provider is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from buildtel.shared.tracemodel import session_span_id

PROBE = Path(__file__).with_name("api_probe.py")


def test_api_spans_parents_statuses_events_and_propagation(nats_url: str, stack_auth) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRACEPARENT", "TRACESTATE")}
    if stack_auth is not None:  # the probe's raw NATS round trip, as the embedded engine's operator
        nats_url = nats_url.replace("nats://", f"nats://operator:{stack_auth.password('operator')}@", 1)
    env.update(NATS_URL=nats_url, BUILDER_TELEMETRY_LOG_FORMAT="json")
    env.pop("BUILDER_TELEMETRY_NATS_URL", None)
    out = subprocess.run([sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    seen, spans = doc["seen"], doc["spans"]
    root = spans["root"]
    assert root["parent"] is None and root["attributes"] == {"answer": 42, "list": [1, 2, 3]}
    assert root["service"] == "probe" and root["kind"] == "INTERNAL"
    child = spans["child"]
    assert child["parent"] == root["span_id"] and child["kind"] == "CLIENT"
    assert child["events"] == [["retry", {"attempt": 2}]]
    assert child["status"] == ["OK", None]  # a description only goes with ERROR
    imperative = spans["imperative"]
    assert seen["current_during"] is True and seen["current_after"] == root["span_id"]  # finish_span restores
    assert imperative["status"] == ["ERROR", "could not parse"]
    [(name, attrs)] = imperative["events"]
    assert name == "exception" and attrs["exception.type"] == "ValueError"
    assert attrs["exception.message"] == "bad input"
    escaping = spans["escaping"]
    assert escaping["status"] == ["ERROR", "KeyError: 'missing'"] and escaping["events"][0][0] == "exception"
    assert seen["nested_parent_is_root"] is True  # start_trace inside a span continues it
    assert seen["child_env"].startswith(f"00-{root['trace_id']}-{root['span_id']}-")
    assert seen["headers"]["traceparent"] == seen["child_env"]
    assert spans["consumer"]["parent"] == root["span_id"] and spans["consumer"]["trace_id"] == root["trace_id"]
    sid = "ab" * 16
    assert seen["session_trace"] == sid == spans["session-step"]["trace_id"]
    assert spans["session-step"]["parent"] == session_span_id(sid)
    assert spans["session-step"]["attributes"]["buildtel.session.id"] == sid
    assert seen["env_trace"] == "0af7651916cd43dd8448eb211c80319c"
    assert spans["from-env"]["parent"] == "b7ad6b7169203331"
    nats = seen["nats"]
    assert nats["consumer_trace"] == nats["trace"] and nats["consumer_parent"] == nats["publisher"]
