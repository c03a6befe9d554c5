"""``buildtel run`` on a loaded machine, in a git repository: the stored session has branch,
commit and machine whatever the probes do; tool versions that did not answer are named as
missing; a tool inside the build reporting into the session is a second agent of the same
machine, and neither agent's events are taken for the other's."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildtel.services.collector.service import CollectorService
from buildtel.shared.subjects import Subjects
from tests.client.test_environment import git
from tests.util import completed_sessions, stack_env

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
SLOW_TOOLS = ("cc", "gcc", "clang", "make")  # in buildtel.shared.environment.DEFAULT_TOOLS

NESTED = """
import os, time
from buildtel.shared.client_sync import SyncTelemetryClient
from buildtel.shared.settings import Settings
c = SyncTelemetryClient(Settings.from_env(), session_id=os.environ["BUILDER_TELEMETRY_SESSION_ID"]).start()
for i in range(3):
    c.target_finished(target=f"//nested:t{i}", start=time.time(), duration_s=0.01)
stats = c.close(timeout=30)
assert stats.dropped == 0 and stats.sent == 3, stats
print(c.agent_id)
"""


@pytest.fixture
def cpu_hog() -> Iterator[None]:
    """Every core busy at normal priority for the whole test, like a farm node mid-build."""
    hogs = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        yield
    finally:
        for p in hogs:
            p.kill()
        for p in hogs:
            p.wait()


async def test_loaded_machine_session_keeps_vcs_machine_and_both_agents(
        settings, nc, redis_client, tmp_path: Path, cpu_hog: None) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "feature/x")
    (repo / "main.c").write_text("int main(void) { return 0; }\n")
    git(repo, "add", "main.c")
    git(repo, "commit", "-q", "-m", "first")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in SLOW_TOOLS:  # never answer `--version`: each probe hits its time-out
        (bin_dir / tool).write_text("#!/bin/sh\nexec sleep 60\n")
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, **stack_env(settings), PATH=f"{bin_dir}:{os.environ['PATH']}",
               PYTHONPATH=str(ROOT), BUILDER_TELEMETRY_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("BUILDER_TELEMETRY_AGENT_ID", None)

    collector = CollectorService(settings, settings.nats_url or "", settings.redis_url or "")
    await collector.start()
    try:
        # In a thread: the collector runs on this event loop while the build does.
        res = await asyncio.to_thread(
            subprocess.run, [PY, "-m", "buildtel.cli.main", "run", "--no-capture", "--name", "nested", "--",
                             PY, "-c", NESTED], cwd=repo, env=env, capture_output=True, text=True,
            timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        assert "warning" not in res.stderr, res.stderr
        [session] = await completed_sessions(nc.jetstream(), Subjects(settings.namespace), 1, timeout=60)
    finally:
        await collector.stop()

    host = socket.gethostname()
    nested_agent = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"{re.escape(host)}/\d+\.[0-9a-z]+", nested_agent)  # the machine, then pid.start
    assert session.agents == sorted([host, nested_agent]) and nested_agent != host
    assert sorted(t.name for t in session.targets) == ["//nested:t0", "//nested:t1", "//nested:t2"]
    env_ = session.environment
    assert env_ is not None and env_.hostname == host and env_.cpus > 0 and env_.os
    assert env_.vcs is not None
    assert (env_.vcs.branch, env_.vcs.commit) == ("feature/x", git(repo, "rev-parse", "HEAD"))
    for tool in SLOW_TOOLS:  # unknown, with the reason; never a version, never silently absent
        assert tool not in env_.tool_versions
        assert env_.missing_probes[f"tool_versions.{tool}"] in (
            f"{tool} --version did not answer within 1.0 s", "not finished 2 s after the command exited")
