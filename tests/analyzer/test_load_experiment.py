"""The load experiment of docs/analytics.md "Host slowdowns", end to end: real ``buildtel run``
builds of a make project the test writes, through a collector, storage and analyzer on the real
engines, the second half of them next to a CPU hog the test starts (and kills in ``finally``).

Nothing is pinned to timing: the hog's effect on the machine is whatever it is, and the tests
assert on the alerts' content once the analyzer has folded every build (generous deadlines).
Without the host judgement, the hog alone raised an alert on every target (tests/analyzer/
test_hostload.py has that control on hand-built histories)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from buildtel.services.analyzer.alerts import Alert
from buildtel.services.analyzer.api import AnalyzerClient, read_alerts
from buildtel.services.analyzer.explain import NO_CODE_CHANGE
from buildtel.services.analyzer.service import AnalyzerService
from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.service import StorageService
from buildtel.shared.settings import Settings
from tests.client.test_environment import git
from tests.util import stack_env

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["t0.out", "t1.out", "t2.out", "t3.out", "t4.out"]
SLOWED = "t2.out"
BEFORE, AFTER = 6, 5  # builds before the hog (baselines), and next to it
# Each target is CPU work (what a compiler does): a busy machine slows them all together.
WORK = "import sys; s = 0\nfor i in range(1_200_000): s += i * i\nsys.stdout.write(str(s))"
MAKEFILE = """all: {targets}
t0.out t1.out t3.out t4.out: work.py
\t{py} work.py > $@
t2.out: work.py
\t{py} work.py > $@
\tsleep $${{EXTRA_SLEEP:-0}}
"""


@contextmanager
def cpu_hog() -> Iterator[None]:
    """Every core busy at normal priority, like a farm node running someone else's build."""
    hogs = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        yield
    finally:
        for p in hogs:
            p.kill()
        for p in hogs:
            p.wait()


@pytest.fixture
async def stack(settings: Settings, nc, redis_client) -> AsyncIterator[AnalyzerClient]:
    url, rurl = settings.nats_url or "", settings.redis_url or ""
    services = [CollectorService(settings, url, rurl), StorageService(settings.with_(fsync=False), url, rurl),
                AnalyzerService(settings, url, rurl)]
    try:
        for s in services:
            await s.start()
        yield AnalyzerClient(nc, settings.namespace, timeout=10)
    finally:
        for s in reversed(services):
            await s.stop()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    repo = tmp_path / "proj"
    repo.mkdir()
    (repo / "work.py").write_text(WORK + "\n")
    (repo / "Makefile").write_text(MAKEFILE.format(targets=" ".join(TARGETS), py=PY))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "project")
    return repo


def _build(settings: Settings, repo: Path, tmp: Path, **env: str) -> None:
    e = dict(os.environ, **stack_env(settings), PYTHONPATH=str(ROOT), BUILDER_TELEMETRY_CACHE_DIR=str(tmp / "cache"),
             **env)
    e.pop("BUILDER_TELEMETRY_AGENT_ID", None)
    res = subprocess.run([PY, "-m", "buildtel.cli.main", "run", "--name", "proj", "--", "make", "-B", "-j1", "all"],
                         cwd=repo, env=e, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr


async def _builds(settings: Settings, repo: Path, tmp: Path, client: AnalyzerClient, *, slow_after: bool
                  ) -> None:
    for _ in range(BEFORE):
        await asyncio.to_thread(_build, settings, repo, tmp)
    with cpu_hog():
        for _ in range(AFTER):
            await asyncio.to_thread(_build, settings, repo, tmp, **({"EXTRA_SLEEP": "3"} if slow_after else {}))


async def _folded(client: AnalyzerClient, sessions: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = await client.stats()
        if st.sessions >= sessions and st.outbox == 0:
            return
        assert time.monotonic() < deadline, f"the analyzer folded {st.sessions} of {sessions} builds"
        await asyncio.sleep(0.2)


def _summary(alerts: list[Alert]) -> str:
    def cpu(a: Alert) -> str:
        h = a.explanation.host_slowdown if a.explanation else None
        return "" if h is None else f" [CPU time x{h.cpu_ratio:.2f}]" if h.cpu_ratio else " [CPU time not captured]"
    return "\n".join(f"{a.kind} {a.target or a.host} {a.change_pct:+.0f}%{cpu(a)} "
                     f"{a.explanation.summary if a.explanation else ''}" for a in alerts)


@pytest.mark.timeout(900)
async def test_one_slower_target_next_to_a_cpu_hog_is_one_target_alert_explained(
        settings, stack: AnalyzerClient, project: Path, tmp_path: Path, nc) -> None:
    await _builds(settings, project, tmp_path, stack, slow_after=True)
    await _folded(stack, BEFORE + AFTER)
    alerts = await read_alerts(nc.jetstream(), settings.namespace)
    print(f"\nload experiment, one target slowed by 3 s next to the hog:\n{_summary(alerts)}")
    targets = [a for a in alerts if a.kind == "target"]
    assert [(a.target, a.direction) for a in targets] == [(SLOWED, "regression")], _summary(alerts)
    builds = [a for a in alerts if a.kind == "build"]
    assert [a.direction for a in builds] == ["regression"], _summary(alerts)
    assert len([a for a in alerts if a.kind == "host"]) <= 1, _summary(alerts)
    for a in (targets[0], builds[0]):
        e = a.explanation
        assert e is not None, a
        assert a.last_good_session_id and a.first_session_id
        # Every build ran the same commit: the alert says so, and names what did change.
        assert e.code_change is False and NO_CODE_CHANGE in e.summary, e
        assert any(d.what == "env" and d.key == "EXTRA_SLEEP" and d.before is None and d.after == "3"
                   for d in e.differences), e.differences
        assert e.culprits and e.culprits[0].target == SLOWED, e.culprits
        assert e.culprits[0].added_s > 2.0 and e.culprits[0].share > 0.5, e.culprits
        assert e.critical_path is not None


@pytest.mark.timeout(900)
async def test_the_hog_alone_raises_no_target_or_build_alert(
        settings, stack: AnalyzerClient, project: Path, tmp_path: Path, nc) -> None:
    await _builds(settings, project, tmp_path, stack, slow_after=False)
    await _folded(stack, BEFORE + AFTER)
    alerts = await read_alerts(nc.jetstream(), settings.namespace)
    print(f"\nload experiment, the hog alone:\n{_summary(alerts)}")
    assert [a for a in alerts if a.kind in ("target", "build")] == [], _summary(alerts)
    hosts = [a for a in alerts if a.kind == "host"]
    assert len(hosts) <= 1, _summary(alerts)
    for h in hosts:  # a host event, when the judgement made one, carries its evidence
        assert h.explanation is not None and h.explanation.host_slowdown is not None
        assert h.explanation.host_slowdown.factor >= 1.3 and h.host
