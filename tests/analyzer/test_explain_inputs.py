"""Alerts between two recorded builds name the input files that changed (docs/analytics.md
"Explanations"): real ``buildtel run --record`` builds of a small C project at one commit, one
source edited between them, through a collector, storage and the recorder service on the real
engines; the alert is explained over the analyzer's own connection (its NATS role must be allowed
to ask the recorder).  With the recorder stopped the alert is still explained, with a note."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from buildtel.cli.cmd_analyze import alert_text
from buildtel.services.analyzer.alerts import Alert, alert_id
from buildtel.services.analyzer.explain import MAX_DIFFERENCES, NO_CODE_CHANGE, explain, input_differences, lines
from buildtel.services.analyzer.explainer import explain_alert
from buildtel.services.analyzer.service import AnalyzerService
from buildtel.services.collector.service import CollectorService
from buildtel.services.notifier.payload import body, slack
from buildtel.services.recorder.service import RecorderService
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.service import StorageService
from buildtel.shared.alertstate import AlertState
from buildtel.shared.keys import Keys
from buildtel.shared.protocol import BuildSession
from buildtel.shared.recording.diffview import BuildDiff, DiffSide, FilesDiff, MapDiff, TargetsDiff, ToolsDiff
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.analyzer.helpers import session
from tests.client.test_environment import git
from tests.recorder.cproject import write_project
from tests.util import stack_env

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def stack(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[dict[str, Any]]:
    url, rurl = settings.nats_url or "", settings.redis_url or ""
    services: dict[str, Any] = {
        "collector": CollectorService(settings, url, rurl),
        "storage": StorageService(settings.with_(fsync=False), url, rurl),
        "recorder": RecorderService(settings, url, rurl, hold_s=2.0),
        "analyzer": AnalyzerService(settings, url, rurl)}
    try:
        for s in services.values():
            await s.start()
        yield services
    finally:
        for s in reversed(services.values()):
            await s.stop()


def _build(settings: Settings, repo: Path) -> str:
    """One recorded build (``buildtel run --record``): its session id, which is its recording's."""
    e = dict(os.environ, **stack_env(settings), PYTHONPATH=str(ROOT),
             BUILDER_TELEMETRY_CACHE_DIR=str(settings.cache_dir))  # where the recorder service reads
    e.pop("BUILDER_TELEMETRY_AGENT_ID", None)
    res = subprocess.run([PY, "-m", "buildtel.cli.main", "run", "--record", "--name", "proj", "--",
                          "make", "-B", "-j2"], cwd=repo, env=e, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr
    return next(w for line in res.stderr.splitlines() if line.startswith("buildtel: session ")
                for w in line.split()[2:3])


async def _stored(nc: Any, settings: Settings, ids: list[str], timeout: float = 120.0) -> list[BuildSession]:
    client = StorageClient(nc, Subjects(settings.namespace))
    deadline = time.monotonic() + timeout
    while True:
        got = {s.id: s for s in await client.query(limit=10)}
        if all(i in got for i in ids):
            return [got[i] for i in ids]
        assert time.monotonic() < deadline, f"storage holds {sorted(got)}, not all of {ids}"
        await asyncio.sleep(0.2)


def _alert(good: BuildSession, bad: BuildSession) -> Alert:
    commit = bad.environment.vcs.commit if bad.environment and bad.environment.vcs else None
    return Alert(id=alert_id(bad.id, "build|main"), kind="build", direction="regression", series="build|main",
                 branch="main", target=None, cache=None, before_median_s=good.duration_s,
                 after_median_s=bad.duration_s, change_pct=10.0, confidence=0.99, p_value=0.01,
                 first_session_id=bad.id, first_session_start=bad.start, last_good_session_id=good.id,
                 last_good_commit=commit, first_bad_commit=commit, commit_range=f"{commit}..{commit}",
                 detected_session_id=bad.id, detected_at=time.time(), points_before=10, points_after=3)


@pytest.mark.timeout(600)
async def test_an_alert_between_recorded_builds_names_the_changed_input(
        settings: Settings, stack: dict[str, Any], nc: Any, tmp_path: Path) -> None:
    repo = write_project(tmp_path / "proj")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "project")
    # Built once unrecorded first: a build reads the dependency files (build/*.d) the one before it
    # wrote, so the first recorded build would otherwise lack inputs every later one has.
    await asyncio.to_thread(subprocess.run, ["make", "-j2"], cwd=repo, check=True, capture_output=True, timeout=300)
    good_id = await asyncio.to_thread(_build, settings, repo)
    # The same commit, one source's content changed (an uncommitted edit, a generated file…).
    greet = repo / "src/greet.c"
    greet.write_text(greet.read_text().replace("puts(GREETING);", "puts(GREETING); puts(GREETING);"))
    bad_id = await asyncio.to_thread(_build, settings, repo)
    good, bad = await _stored(nc, settings, [good_id, bad_id])
    assert good.record and bad.record
    store = RecordingStore.from_settings(settings)
    assert store.has_manifest(good_id) and store.has_manifest(bad_id)

    analyzer: AnalyzerService = stack["analyzer"]
    alert = _alert(good, bad)

    kept: list[int] = []

    async def in_progress() -> None:  # the session message's ack wait, extended before the recorder's
        kept.append(1)

    async def explained() -> Alert:
        # As the analyzer does before publishing: over its own connection, i.e. its NATS role.
        return await explain_alert(alert, nc=analyzer.nc, redis=analyzer.redis, keys=Keys(settings.namespace),
                                   namespace=settings.namespace, timeout=3.0, progress=in_progress)

    a = await explained()
    assert kept == [1]
    e = a.explanation
    assert e is not None and e.code_change is False
    inputs = [(d.what, d.key, d.before, d.after) for d in e.differences if d.what == "input"]
    assert inputs == [("input", "src/greet.c", "read", "changed")], e.differences
    # (Culprits and the critical path come first: whatever the machine made of the two builds.)
    assert f"{NO_CODE_CHANGE}; inputs changed: src/greet.c; " in e.summary, e.summary
    assert e.summary.endswith("changed: dirty: false -> true"), e.summary  # the edit is not committed
    assert not [n for n in e.notes if "input files" in n], e.notes
    # Where people see it: `buildtel alerts` and the chat message; the webhook carries the struct.
    text = "\n".join(alert_text(a))
    assert "no code change between these builds" in text and "input src/greet.c: changed" in text, text
    b = body("alert", delivery="d1", subscription="s1", tenant="t", items=[(a, AlertState())], web=None)
    assert "input src/greet.c: changed" in slack(b)["text"] + slack(b)["attachments"][0]["text"]

    # A recording dropped by retention (or kept on another machine): asked again for a while, then a note.
    await asyncio.to_thread(store.delete_recording, good_id)
    e = (await explained()).explanation
    assert e is not None and NO_CODE_CHANGE in e.summary and "inputs changed" not in e.summary, e.summary
    [note] = [n for n in e.notes if n.startswith("input files not compared")]
    assert f"no recording has id {good_id}" in note and "dropped by retention" in note, note

    # No recorder answering: the alert is explained all the same, and says what it could not compare.
    await stack["recorder"].stop()
    a = await explained()
    e = a.explanation
    assert e is not None and e.code_change is False and NO_CODE_CHANGE in e.summary
    assert not [d for d in e.differences if d.what in ("input", "external_input")]
    [note] = [n for n in e.notes if n.startswith("input files not compared")]
    assert "the recording diff was unavailable" in note and "no recorder service is answering" in note, note
    assert f"note: {note}" in "\n".join(alert_text(a))


def _files(changed: int = 0, added: int = 0) -> FilesDiff:
    return FilesDiff(changed=[f"src/c{i:03d}.c" for i in range(changed)],
                     added=[f"src/a{i:03d}.c" for i in range(added)], removed=[])


def _diff(inputs: FilesDiff | None, external: FilesDiff | None) -> BuildDiff:
    side = DiffSide(id=uuid.uuid4().hex, kind="recording", exit_code=0)
    empty = MapDiff(added={}, removed={}, changed={})
    return BuildDiff(a=side, b=side, command=None, cwd=None, env=empty,
                     tool_versions=ToolsDiff(added={}, removed={}, changed={}, unknown={}), inputs=inputs,
                     external_inputs=external, outputs=None,
                     targets=TargetsDiff(timing=[], cache=[], status=[], added=[], removed=[]),
                     first_divergence=None)


def test_input_differences_of_a_recording_diff() -> None:
    got, notes = input_differences(_diff(_files(changed=1, added=1),
                                         FilesDiff(changed=[], added=[], removed=["/usr/include/x.h"])))
    assert notes == [] and got is not None
    assert [(d.what, d.key, d.before, d.after) for d in got] == [
        ("input", "src/c000.c", "read", "changed"), ("input", "src/a000.c", None, "read"),
        ("external_input", "/usr/include/x.h", "read", None)]
    got, notes = input_differences(_diff(None, None))
    assert got is None and notes and "kept its events only" in notes[0]


def _pair(*, same_commit: bool, record: tuple[bool, bool]) -> tuple[BuildSession, BuildSession]:
    good = session(1, 2.0, commit="a" * 40)
    bad = session(2, 3.0, commit="a" * 40 if same_commit else "b" * 40)
    good.record, bad.record = record
    return good, bad


def test_many_changed_inputs_are_capped_and_counted_apart_from_the_environment() -> None:
    good, bad = _pair(same_commit=True, record=(True, True))
    bad.environment.env["CC"] = "clang"  # type: ignore[union-attr]
    inputs, _ = input_differences(_diff(_files(changed=30, added=5), None))
    e = explain(good, bad, inputs=inputs)
    assert [d.what for d in e.differences] == ["env"] + ["input"] * MAX_DIFFERENCES
    assert e.differences_more == 35 - MAX_DIFFERENCES
    assert e.summary == (f"{NO_CODE_CHANGE}; inputs changed: src/c000.c, src/c001.c, src/c002.c and 32 more; "
                         "changed: CC: (unset) -> clang")
    assert f"and {35 - MAX_DIFFERENCES} more differences" in "\n".join(lines(e))
    e = explain(good, bad, inputs=[])
    assert "recorded inputs unchanged" in e.summary


def test_a_build_not_recorded_is_a_note_when_it_matters() -> None:
    good, bad = _pair(same_commit=True, record=(False, False))
    assert "input files not compared: neither build was recorded (buildtel run --record)" in explain(good, bad).notes
    good, bad = _pair(same_commit=False, record=(False, False))
    assert not [n for n in explain(good, bad).notes if n.startswith("input files")]  # the commits explain it
    good, bad = _pair(same_commit=False, record=(True, False))
    assert "input files not compared: the first bad build was not recorded (buildtel run --record)" in \
        explain(good, bad).notes
