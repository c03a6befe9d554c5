"""One mapping: streams derived from the recorded Bazel 7.1.2 one (tests/data/bep/), each replayed
over gRPC in Bazel's framing, give the very session ``buildtel import bep`` gives for the same
stream, field by field (tests/bes/compare.py): the checkout, host and user, failed targets that
ran no failed action, a label in two configurations, Bazel's test verdicts and timings, and
streams that end without ``buildFinished`` — cut short, or interrupted by the user."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from buildtel.services.bes.service import BesService
from buildtel.shared.protocol import BuildSession, is_complete
from buildtel.shared.subjects import Subjects
from tests.bes.client import as_imported, read_bep_json, replay
from tests.bes.compare import same_as_import
from tests.bes.test_replay import KAHLYS
from tests.util import completed_sessions


def _events() -> list[dict[str, Any]]:
    events = [json.loads(line) for line in KAHLYS.read_text().splitlines() if line.strip()]
    events[0]["started"]["uuid"] = str(uuid.uuid4())  # a fresh invocation per test
    return events


def _index(events: list[dict[str, Any]], kind: str) -> int:
    return next(i for i, e in enumerate(events) if kind in e["id"])


def _completed(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "targetCompleted" in e["id"] and "completed" in e
            and not e["id"]["targetCompleted"]["label"].endswith("_test")]


async def _live_and_imported(bes: BesService, nc: Any, tmp_path: Path, events: list[dict[str, Any]],
                             **replay_args: Any) -> tuple[BuildSession, BuildSession]:
    path = tmp_path / "bep.json"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    await replay(bes.url.removeprefix("grpc://"), read_bep_json(path), events[0]["started"]["uuid"], **replay_args)
    [live] = await completed_sessions(nc.jetstream(), Subjects(bes.settings.namespace), 1, timeout=30)
    imported = as_imported(path.read_bytes())
    same_as_import(live, imported)
    return live, imported


async def test_checkout_host_and_user_from_workspace_status_and_build_metadata(bes: BesService, nc, tmp_path) -> None:
    events = _events()
    status = events[_index(events, "workspaceStatus")]["workspaceStatus"]
    status["item"] = [i for i in status["item"] if i["key"] not in ("BUILD_HOST", "BUILD_USER")] + [
        {"key": "BUILD_SCM_REVISION", "value": "0123456789abcdef0123456789abcdef01234567"},
        {"key": "BUILD_SCM_BRANCH", "value": "feature/bes"}, {"key": "BUILD_SCM_STATUS", "value": "Modified"}]
    # --build_metadata: host, user and the repository, as CI systems pass them.
    events.insert(1, {"id": {"buildMetadata": {}}, "buildMetadata": {"metadata": {
        "HOST": "ci-7", "USER": "ci", "REPO_URL": "https://example.com/repo.git"}}})
    live, _ = await _live_and_imported(bes, nc, tmp_path, events)
    env = live.environment
    assert env is not None and env.vcs is not None
    assert (env.vcs.commit, env.vcs.branch, env.vcs.remote, env.vcs.dirty) == (
        "0123456789abcdef0123456789abcdef01234567", "feature/bes", "https://example.com/repo.git", True)
    assert (env.hostname, env.user) == ("ci-7", "ci")


async def test_failed_targets_without_a_failed_action_keep_their_failure(bes: BesService, nc, tmp_path) -> None:
    events = _events()
    analysis, loading = _completed(events)[:2]
    analysis["completed"] = {"success": False, "failureDetail": {
        "message": "in go_library rule //go/cmd/basespy:basespy_lib: missing dependency", "analysis": {
            "code": "CONFIGURED_VALUE_CREATION_FAILED"}}}
    del loading["completed"]
    loading["aborted"] = {"reason": "ANALYSIS_FAILURE", "description": "Analysis of target failed; build aborted"}
    fin = events[_index(events, "buildFinished")]["finished"]
    fin["overallSuccess"] = False
    fin["exitCode"] = {"name": "BUILD_FAILURE", "code": 1}
    live, _ = await _live_and_imported(bes, nc, tmp_path, events)
    assert (live.outcome, live.exit_code) == ("failed", 1)
    records = {f.target: (f.output, f.tool_code) for f in live.failures if "(test" not in f.target}
    assert records == {
        analysis["id"]["targetCompleted"]["label"]: (["in go_library rule //go/cmd/basespy:basespy_lib: missing "
                                                      "dependency"], "analysis.CONFIGURED_VALUE_CREATION_FAILED"),
        loading["id"]["targetCompleted"]["label"]: (["Analysis of target failed; build aborted"],
                                                    "aborted.ANALYSIS_FAILURE")}
    assert {t.name for t in live.targets if t.status == "failed" and "(test" not in t.name} == set(records)


async def test_label_in_two_configurations_is_named_alike(bes: BesService, nc, tmp_path) -> None:
    events = _events()
    first = _completed(events)[0]
    label = first["id"]["targetCompleted"]["label"]
    at = events.index(first)
    exec_cfg = "e" * 64  # the label built again for the exec configuration (a tool)
    events[at + 1:at + 1] = [
        {"id": {"configuration": {"id": exec_cfg}}, "configuration": {"mnemonic": "k8-opt-exec-ST"}},
        {"id": {"targetCompleted": {"label": label, "configuration": {"id": exec_cfg}}},
         "completed": {"success": True}}]
    live, _ = await _live_and_imported(bes, nc, tmp_path, events)
    assert [t.name for t in live.targets if t.name == label or t.name.startswith(label + " ")] == [
        label, f"{label} (k8-opt-exec-ST)"]


async def test_bazel_test_verdicts_and_timings_are_labels_alike(bes: BesService, nc, tmp_path) -> None:
    live, _ = await _live_and_imported(bes, nc, tmp_path, _events())
    # testSummary: Bazel's verdict per test (FLAKY: failed in 1 of 2 runs), runs, attempts, run time.
    assert live.labels["test_summary://go/cmd/geninter:geninter_test"] == (
        "FLAKY runs=2 attempts=2 run_s=0.361 first_start_ms=1716554608819 last_stop_ms=1716554609016")
    assert live.labels["test_summary://go/pkg/alfred:alfred_test"].startswith("PASSED runs=2 attempts=2 ")
    assert (live.labels["tests_flaky"], live.labels["tests_flaky_count"]) == ("//go/cmd/geninter:geninter_test", "1")
    # buildMetrics' timingMetrics, in Bazel's unit (CPU time is the session's cpu_s).
    assert (live.labels["wall_time_ms"], live.labels["analysis_phase_ms"], live.labels["execution_phase_ms"],
            live.cpu_s) == ("428", "12", "231", 1.07)


async def test_stream_cut_before_build_finished_is_abandoned_as_the_import(bes: BesService, nc, tmp_path) -> None:
    events = _events()
    cut = events[:_index(events, "buildFinished")]  # Bazel (or its machine) died before the build ended
    live, imported = await _live_and_imported(bes, nc, tmp_path, cut, stop_after=len(cut))
    assert (live.outcome, live.exit_code, is_complete(live)) == ("abandoned", None, False)
    assert imported.completeness is not None and imported.completeness.reasons


async def test_interrupted_stream_without_build_finished_is_cancelled_as_the_import(bes: BesService, nc,
                                                                                    tmp_path) -> None:
    events = _events()
    cut = events[:_index(events, "buildFinished")]
    last = _completed(cut)[-1]
    del last["completed"]
    last["aborted"] = {"reason": "USER_INTERRUPTED", "description": "Build was interrupted"}
    # What Bazel sends for the announced buildFinished it never posted: aborted, the stream's last.
    cut.append({"id": {"buildFinished": {}}, "aborted": {"reason": "USER_INTERRUPTED"}, "lastMessage": True})
    live, _ = await _live_and_imported(bes, nc, tmp_path, cut)
    # Cancelled by its user; Bazel never said an exit code; every event arrived: complete.
    assert (live.outcome, live.exit_code, is_complete(live)) == ("cancelled", None, True)
    assert live.labels["aborted"] == "USER_INTERRUPTED Build was interrupted"
    assert (last["id"]["targetCompleted"]["label"], "cancelled") in {(t.name, t.status) for t in live.targets}
