"""A live stream's mapper keeps no per-action or per-attempt state (docs/bazel.md "Bounded memory,
back-pressure"): every action and test attempt is sent as it comes, failure records are capped
and what passes the cap is counted in the session's labels — the same figure as the importer's.
And the longest a batch's publish is retried is what the docs say."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from buildtel.services.bes.service import PUBLISH_MAX_S
from buildtel.shared.capture.failures import MAX_FAILURES
from buildtel.shared.importers.bep import parse_bep
from buildtel.shared.importers.bep_details import MAX_TEST_SUMMARIES
from buildtel.shared.importers.bep_stream import StreamMapper
from buildtel.shared.protocol import BuildFinished, TargetFinished, TestResults

ACTIONS = 200_000
FAILED = MAX_FAILURES + 50
TESTS, ATTEMPTS = MAX_TEST_SUMMARIES + 20, 3


def _stream() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"id": {"started": {}}, "started": {
        "uuid": "6f1c2d3e-0000-4000-8000-0000000000b0", "command": "test", "startTimeMillis": "1700000000000"}}]
    for i in range(ACTIONS):  # --build_event_publish_all_actions: every action, successful ones too
        events.append({"id": {"actionCompleted": {"primaryOutput": f"bazel-out/bin/o{i}"}},
                       "action": {"success": True, "type": "Genrule", "label": f"//p:o{i}"}})
    for i in range(FAILED):
        events.append({"id": {"actionCompleted": {"primaryOutput": f"bazel-out/bin/bad{i}", "label": f"//p:bad{i}"}},
                       "action": {"exitCode": 1, "type": "Genrule", "label": f"//p:bad{i}",
                                  "stderr": {"name": "stderr", "contents": "Ym9vbQo="}}})
    for t in range(TESTS):  # --flaky_test_attempts=3: two failed attempts, then a pass
        for attempt in range(1, ATTEMPTS + 1):
            idv = {"label": f"//tests/flaky:t{t}", "run": 1, "shard": 1, "attempt": attempt}
            events.append({"id": {"testResult": idv},
                           "testResult": {"status": "PASSED" if attempt == ATTEMPTS else "FAILED",
                                          "testAttemptDurationMillis": "10"}})
        events.append({"id": {"testSummary": {"label": f"//tests/flaky:t{t}"}},
                       "testSummary": {"overallStatus": "FLAKY", "totalRunCount": 1, "attemptCount": ATTEMPTS}})
    events.append({"id": {"buildFinished": {}}, "finished": {
        "finishTimeMillis": "1700000100000", "exitCode": {"name": "BUILD_FAILURE", "code": 1}}})
    events.append({"id": {"buildMetrics": {}}, "buildMetrics": {
        "actionSummary": {"actionsCreated": str(ACTIONS + FAILED + 1), "actionsExecuted": str(ACTIONS + FAILED)},
        "timingMetrics": {"cpuTimeInMs": "5000", "wallTimeInMs": "100000", "analysisPhaseTimeInMs": "900",
                          "executionPhaseTimeInMs": "98000"}}, "lastMessage": True})
    return events


def test_a_stream_of_200k_actions_and_many_attempts_holds_no_per_event_state() -> None:
    events = _stream()
    mapper = StreamMapper("b0" * 16, "bes-test", clock=lambda: 1700000050.0)
    st = mapper.st
    targets = cases = 0
    finished: list[BuildFinished] = []
    peak = 0
    for i, ev in enumerate(events):
        for out in mapper.feed(ev):
            targets += type(out) is TargetFinished
            cases += len(out.cases) if type(out) is TestResults else 0
            if type(out) is BuildFinished:
                finished.append(out)
        if i % 1000 == 0:
            peak = max(peak, len(st.actions), len(st.test_cases), len(mapper._early))
    # Nothing kept per action or per attempt; failure records at their cap; everything was sent.
    assert peak == 0 and (len(st.actions), len(st.test_cases)) == (0, 0)
    # (each failed action makes two records: its label's, with the output, and its own, pointing there)
    kept = MAX_FAILURES // 2
    assert len(st.failures.found) == MAX_FAILURES and st.failures.dropped == FAILED - kept
    assert len(st.summaries.kept) == MAX_TEST_SUMMARIES
    assert targets == ACTIONS + FAILED + TESTS * ATTEMPTS and cases == TESTS * ATTEMPTS
    # What passed a cap is said, in the session's labels, as the importer says it.
    [fin] = finished
    assert fin.labels["failures_dropped"] == str(FAILED - kept)
    assert fin.labels["test_summaries_dropped"] == str(TESTS - MAX_TEST_SUMMARIES)
    assert fin.labels["actions_created"] == str(ACTIONS + FAILED + 1)
    assert (fin.labels["wall_time_ms"], fin.labels["analysis_phase_ms"], fin.labels["execution_phase_ms"]) == (
        "100000", "900", "98000")
    assert fin.labels["tests_flaky"].startswith("//tests/flaky:t0 //tests/flaky:t1 ")
    assert fin.labels["tests_flaky"].endswith("…") and len(fin.labels["tests_flaky"]) == 1000
    assert fin.labels["tests_flaky_count"] == str(TESTS)
    [imported] = parse_bep("".join(json.dumps(e) + "\n" for e in events).encode()).sessions
    end = {k: v for k, v in imported.labels.items() if k not in ("importer", "invocation_id", "bazel_command")}
    assert end == fin.labels
    assert len(imported.targets) == ACTIONS + FAILED + TESTS and len(imported.tests) == cases  # attempts folded


def test_the_docs_say_the_longest_publish_retry() -> None:
    # docs/bazel.md "Durable before acknowledged": how long a batch is retried before the stream fails.
    text = (Path(__file__).parents[2] / "docs" / "bazel.md").read_text()
    said = re.search(r"at most ([0-9.]+) s; then the call ends", " ".join(text.split()))
    assert said is not None and float(said.group(1)) == pytest.approx(PUBLISH_MAX_S, abs=0.05)
    assert pytest.approx(36.2) == PUBLISH_MAX_S
