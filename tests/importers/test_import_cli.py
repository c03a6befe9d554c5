"""``buildtel import``: the dry-run summary through the real entry point, and publishing to JetStream."""

from __future__ import annotations

import argparse

import pytest

import buildtel.cli.main as cli_main
from buildtel.cli import cmd_import
from buildtel.shared.codec import decode_session
from buildtel.shared.importers.ninja import parse_ninja_log
from buildtel.shared.subjects import Subjects
from tests.importers.importer_samples import (
    BEP,
    NINJA,
    TRACE,
    bep_events,
    bep_kind,
    ninja_builds,
    ninja_edges,
)

APPENDED = NINJA / "zstd-release-then-incremental.ninja_log"


@pytest.fixture
def only_import_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other commands are other people's modules; this test needs only the import command.
    assert "buildtel.cli.cmd_import" in cli_main.COMMAND_MODULES
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ["buildtel.cli.cmd_import"])


def test_dry_run_prints_the_numbers_in_the_file(only_import_command: None, capsys: pytest.CaptureFixture[str]) -> None:
    builds = ninja_builds(APPENDED)
    edges = [ninja_edges(b) for b in builds]
    assert cli_main.main(["import", "ninja", "--dry-run", str(APPENDED)]) == 0
    out = capsys.readouterr().out
    entries = sum(len(b) for b in builds)
    assert f"{len(builds)} build(s), {entries} entries, {sum(map(len, edges))} edges, 0 warning(s)" in out
    for e in edges:
        span = max(x["end"] for x in e) / 1000
        assert f": {len(e)} targets ({len(e)} ok, 0 failed, 0 not run), duration {span:.3f}s" in out
    assert "dry run: 2 session(s) parsed, nothing published" in out


def test_dry_run_bep_and_trace(only_import_command: None, capsys: pytest.CaptureFixture[str]) -> None:
    path = BEP / "qaisjp-aborted-payload_bazel3.4.1_test_bep.json"
    events = bep_events(path)
    assert cli_main.main(["import", "bep", "--dry-run", str(path)]) == 0
    out = capsys.readouterr().out
    assert (f"BEP: {len(events)} events, {sum(bep_kind(e) == 'targetCompleted' for e in events)} targetCompleted, "
            f"{sum(bep_kind(e) == 'testResult' for e in events)} testResult, 0 actions, 4 warning(s)") in out
    assert "warning: line 27: targetConfigured" in out
    assert cli_main.main(["import", "chrome-trace", "--dry-run", str(TRACE / "engflow_tiny.json.gz")]) == 0
    assert "trace (bazel): 707 events, 528 X, 0 B/E pairs, 528 spans" in capsys.readouterr().out


def test_bad_input_is_one_line_and_nothing_is_imported(only_import_command: None, tmp_path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.ninja_log"
    bad.write_bytes(b"# ninja log v5\n0\t1\t0\ta\taa\nnot a line\n")
    assert cli_main.main(["import", "ninja", "--dry-run", str(APPENDED), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the good file before it is not reported as imported either
    assert captured.err.strip().splitlines() == [
        f"buildtel: error: {bad}: line 3: expected 5 tab-separated fields, found 1 (nothing was imported)"]
    assert cli_main.main(["import", "bep", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


async def test_publish_stores_each_session_once(settings, nc, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(importer="ninja", files=[str(APPENDED)], base_time=None, dry_run=False)
    expected = parse_ninja_log(APPENDED.read_bytes(), file_mtime=APPENDED.stat().st_mtime, source=str(APPENDED))
    assert await cmd_import.run_import(args, settings) == 0
    first = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in first] == [["stored", s.id] for s in expected.sessions]
    assert await cmd_import.run_import(args, settings) == 0  # idempotent: Nats-Msg-Id = session id
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()] == \
        [["already", "stored"]] * len(expected.sessions)

    subjects = Subjects(settings.namespace)
    js = nc.jetstream()
    info = await js.stream_info(subjects.sessions_stream)
    assert info.state.messages == len(expected.sessions)
    sub = await js.pull_subscribe(subjects.sessions_completed, durable=None, stream=subjects.sessions_stream)
    msgs = await sub.fetch(len(expected.sessions), timeout=5)
    stored = [decode_session(m.data) for m in msgs]
    assert stored == expected.sessions
    assert [m.headers["Nats-Msg-Id"] for m in msgs] == [s.id for s in expected.sessions]
    await sub.unsubscribe()


def test_merge_refuses_what_it_would_drop(only_import_command: None, capsys: pytest.CaptureFixture[str]) -> None:
    """--merge stores clang compiles only; an exit code or a name that would be dropped is refused."""
    clang, bazel = str(TRACE / "clang-zlib-adler32.c.json"), str(TRACE / "engflow_tiny.json.gz")
    assert cli_main.main(["import", "chrome-trace", "--merge", "--dry-run", clang, bazel]) == 2
    assert f"--merge takes clang -ftime-trace files only; {bazel} is not one (nothing was imported)" in \
        capsys.readouterr().err
    assert cli_main.main(["import", "chrome-trace", "--merge", "--exit-code", "0", "--dry-run", clang]) == 2
    assert "--exit-code describes one trace's run, not a merged build" in capsys.readouterr().err
    assert cli_main.main(["import", "chrome-trace", "--name", "x", "--dry-run", clang]) == 2
    assert "--name names the merged session: give it with --merge" in capsys.readouterr().err
