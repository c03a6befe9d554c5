"""A real Bazel (Debian's bazel-bootstrap, which .ci/run installs) streams to the BES endpoint.

The workspace is genrules only: without network Bazel cannot fetch the external repositories
that cc rules and ``bazel test`` need.  Each build also writes ``--build_event_json_file``, so
the live session is checked against ``buildtel import bep`` of the very same invocation, and
against what Bazel itself printed (exit code, the failed target, the results link).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest

from buildtel.services.bes.service import BesService
from buildtel.services.web.query import parse_session_id
from buildtel.shared.protocol import BuildSession, is_complete
from buildtel.shared.subjects import Subjects
from tests.bes.client import as_imported
from tests.bes.compare import same_as_import
from tests.util import completed_sessions


@pytest.fixture(autouse=True)
def _bazel_installed() -> None:
    """Never skipped: without a Bazel these tests fail and say how to install one."""
    assert shutil.which("bazel"), "no bazel on PATH: apt-get install bazel-bootstrap (.ci/run does)"

BUILD = """
genrule(name = "a", outs = ["a.txt"], cmd = "echo a > $@")
genrule(name = "b", outs = ["b.txt"], cmd = "echo b > $@")
genrule(name = "c", srcs = [":a", ":b"], outs = ["c.txt"], cmd = "cat $(SRCS) > $@")
genrule(name = "bad", outs = ["bad.txt"], cmd = "echo 'boom on stderr' >&2; exit 3")
genrule(name = "slow", outs = ["slow.txt"], cmd = "sleep $$(cat $(location :delay)); echo s > $@", srcs = [":delay"])
"""
RESULTS = "http://dashboard.invalid/sessions/"


def _workspace(tmp_path: Path, delay: str = "1") -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "WORKSPACE").write_text("")
    (ws / "BUILD").write_text(BUILD + 'exports_files(["delay"])\n')
    (ws / "delay").write_text(delay)
    status = ws / "status.sh"  # what a --workspace_status_command script of a git checkout prints
    status.write_text("#!/bin/sh\necho BUILD_SCM_REVISION 0123456789abcdef0123456789abcdef01234567\n"
                      "echo BUILD_SCM_BRANCH feature/bes\necho BUILD_SCM_STATUS Modified\n")
    status.chmod(0o755)
    return ws


async def _bazel(ws: Path, tmp_path: Path, *args: str, interrupt_on: str | None = None) -> tuple[int, str]:
    """Run ``bazel build`` in ``ws``; ``interrupt_on``: send SIGINT once this text is printed."""
    startup = [f"--output_user_root={tmp_path / 'bazel-root'}", "--max_idle_secs=30"]
    proc = await asyncio.create_subprocess_exec(
        "bazel", *startup, "build", "--color=no", "--curses=no", "--noshow_progress", *args, cwd=ws,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "HOME": str(tmp_path)})
    assert proc.stdout is not None
    out = []
    interrupted = False
    while line := await proc.stdout.readline():
        text = line.decode(errors="replace")
        out.append(text)
        if interrupt_on and not interrupted and interrupt_on in text:
            proc.send_signal(signal.SIGINT)
            interrupted = True
    rc = await proc.wait()
    return rc, "".join(out)


def _targets(s: BuildSession) -> list[tuple[str, str]]:
    return sorted((t.name, t.status) for t in s.targets)


async def _session(nc: object, bes: BesService) -> BuildSession:
    [s] = await completed_sessions(nc.jetstream(), Subjects(bes.settings.namespace), 1, timeout=60)  # type: ignore[attr-defined]
    return s


async def test_bazel_build_streams_live_and_matches_what_bazel_printed(bes: BesService, nc, tmp_path) -> None:
    ws = _workspace(tmp_path)
    bep_file = tmp_path / "bep.json"
    rc, printed = await _bazel(ws, tmp_path, "-k", "--jobs=4", "//:all", f"--bes_backend={bes.url}",
                               f"--bes_results_url={RESULTS}", f"--build_event_json_file={bep_file}",
                               f"--workspace_status_command={ws / 'status.sh'}")
    assert rc == 1, printed  # BUILD_FAILURE, with -k the other targets still built
    live = await _session(nc, bes)
    imported = as_imported(bep_file.read_bytes())
    # The link Bazel printed opens this session.
    link = re.search(re.escape(RESULTS) + r"(\S+)", printed)
    assert link is not None, printed
    assert parse_session_id(link.group(1)) == live.id == imported.id
    same_as_import(live, imported)  # the whole session, as `buildtel import bep` of the same invocation
    assert (live.outcome, live.exit_code) == ("failed", 1)
    assert ("//:bad", "failed") in _targets(live)
    assert {n for n, st in _targets(live) if st == "success"} >= {"//:a", "//:b", "//:c", "//:slow"}
    assert "//:bad failed" in printed and "Exit 3" in printed, printed  # what Bazel printed of the failure
    # The failed action's output, read from Bazel's action output files under its output base.
    # (in targets order, and a live build lists its failed action before its target: compared by target)
    a, b = sorted(live.failures, key=lambda f: f.target), sorted(imported.failures, key=lambda f: f.target)
    assert a == b
    [bad] = [f for f in live.failures if f.target == "//:bad"]
    assert "boom on stderr" in bad.output, bad
    # Bazel's critical path (buildToolLogs) and action count (buildMetrics), as it printed them.
    assert f"Critical Path: {live.labels['critical_path_s']}s" in printed, (live.labels, printed)
    assert live.labels["actions_executed"] == imported.labels["actions_executed"]
    assert (live.name, live.command) == (imported.name, imported.command)
    assert live.environment is not None and imported.environment is not None
    assert (live.environment.user, live.environment.hostname) == (imported.environment.user,
                                                                  imported.environment.hostname)
    assert is_complete(live)
    vcs = live.environment.vcs
    assert vcs is not None
    assert (vcs.commit, vcs.branch, vcs.dirty) == ("0123456789abcdef0123456789abcdef01234567", "feature/bes", True)


async def test_sigint_mid_build_is_never_stored_as_success(bes: BesService, nc, tmp_path) -> None:
    ws = _workspace(tmp_path, delay="60")
    # The slow genrule runs for a minute; interrupt once Bazel says it is executing it.
    bep_file = tmp_path / "bep.json"
    rc, printed = await _bazel(ws, tmp_path, "--jobs=4", "--show_progress", "--show_progress_rate_limit=0",
                               "//:slow", f"--bes_backend={bes.url}", f"--build_event_json_file={bep_file}",
                               interrupt_on="Executing genrule //:slow")
    assert rc == 8, printed  # INTERRUPTED
    live = await _session(nc, bes)
    same_as_import(live, as_imported(bep_file.read_bytes()))
    # Bazel's INTERRUPTED exit code: cancelled, as `buildtel import bep` decides it (one rule,
    # bep.finished_outcome); its unfinished target cancelled (docs/bazel.md).
    assert (live.outcome, live.exit_code) == ("cancelled", 8)
    assert [(t.name, t.status) for t in live.targets if t.name == "//:slow"] == [("//:slow", "cancelled")]


# What Bazel prints of an upload that failed (4.2.3): in its default mode, in the same invocation…
UPLOAD_ERROR = "ERROR: The Build Event Protocol upload"
# …and in the asynchronous modes, at the start of the next invocation (the server's).
PREVIOUS_UPLOAD_WARNING = ("WARNING: The background upload of the Build Event Protocol for the previous "
                           "invocation failed")


@pytest.mark.timeout(300)  # five Bazel invocations, each waiting out --bes_timeout
async def test_unreachable_endpoint_never_fails_the_actions(tmp_path) -> None:
    """Found with Bazel 4.2.3 (docs/bazel.md): no upload mode gives exit code 0 *and* Bazel's warning
    in one invocation.  ``fully_async`` (and ``nowait_for_upload_complete``) exit 0 and print nothing
    of the upload; the next invocation on the same server prints Bazel's warning about it, still
    exiting 0.  The default ``wait_for_upload_complete`` prints Bazel's error and exits 38 once
    ``--bes_timeout`` has passed — after running every action."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = _workspace(tmp_path)
    bes = (f"--bes_backend=grpc://127.0.0.1:{port}", "--bes_timeout=5s")
    out = ws / "bazel-bin" / "c.txt"
    for mode in ("fully_async", "nowait_for_upload_complete"):
        rc, printed = await _bazel(ws, tmp_path, "//:a", "//:b", "//:c", *bes, f"--bes_upload_mode={mode}")
        assert rc == 0 and out.read_text() == "a\nb\n", (mode, printed)
        assert UPLOAD_ERROR not in printed, (mode, printed)
        out.unlink()
        # The next invocation: Bazel's warning about the failed upload, and still the build's own exit code.
        rc, printed = await _bazel(ws, tmp_path, "//:a", "//:b", "//:c", *bes, f"--bes_upload_mode={mode}")
        assert rc == 0 and out.read_text() == "a\nb\n", (mode, printed)
        assert PREVIOUS_UPLOAD_WARNING in printed, (mode, printed)
        out.unlink()
    rc, printed = await _bazel(ws, tmp_path, "//:a", "//:b", "//:c", *bes)
    assert rc == 38 and UPLOAD_ERROR in printed, printed
    assert out.read_text() == "a\nb\n"
