"""Real builds under ``buildtel run`` (a subprocess, as a user runs it) with a collector: a
``make -j2``, a ``ninja -j2`` and a ``cmake --build`` (Ninja generator) of a generated C
project give one target per recipe or edge, the count make/ninja themselves report, durations
that add up, lanes no wider than -j, and the final health checkpoint on the session."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from buildtel.cli.cmd_run import run_build
from buildtel.services.collector.service import CollectorService
from buildtel.shared.capture.live import LiveSource
from buildtel.shared.protocol import BuildSession
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.capture.project import (
    cmake_project,
    make_project,
    make_recipes_to_run,
    ninja_binary,
    ninja_commands,
    ninja_project,
)
from tests.util import completed_sessions, stack_env

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
NINJA = ninja_binary()
assert NINJA, "ninja: the test extras install it (PyPI package 'ninja')"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def collector(settings: Settings, redis_client: object) -> AsyncIterator[CollectorService]:
    svc = CollectorService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    yield svc
    await svc.stop()


def _env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, **stack_env(settings))
    env.update(BUILDER_TELEMETRY_NATS_URL=settings.nats_url or "", BUILDER_TELEMETRY_REDIS_URL=settings.redis_url or "",
               BUILDER_TELEMETRY_NAMESPACE=settings.namespace, BUILDER_TELEMETRY_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO))
    if NINJA:
        env["PATH"] = f"{Path(NINJA).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


async def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    res = await asyncio.to_thread(subprocess.run, [PY, "-m", "buildtel.cli.main", "run", "--health-interval", "0.3",
                                                   "--", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=150, check=False)
    return res, time.monotonic() - t0


async def _session(nc: object, settings: Settings) -> BuildSession:
    sessions = await completed_sessions(nc.jetstream(), Subjects(settings.namespace), 1, timeout=30)  # type: ignore[attr-defined]
    assert len(sessions) == 1
    return sessions[0]


def _timed_serial(argv: list[str], cwd: Path, clean: list[str]) -> float:
    subprocess.run(clean, cwd=cwd, check=True, capture_output=True)
    t0 = time.monotonic()
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)
    wall = time.monotonic() - t0
    subprocess.run(clean, cwd=cwd, check=True, capture_output=True)
    return wall


def _check_adds_up(s: BuildSession, *, jobs: int, serial_s: float, wall_s: float) -> None:
    ts = s.targets
    durations = [t.duration_s for t in ts]
    span = max(t.end for t in ts) - min(t.start for t in ts)
    # Every target within the session and its own wall time; together never more than -j lanes' worth.
    assert all(0 <= d <= wall_s for d in durations)
    assert all(s.start - 0.05 <= t.start and t.end <= s.finish + 0.05 for t in ts)
    assert sum(durations) <= jobs * span * 1.02 + 0.05
    # The serial work: a -j1 build of the same project.  Loose bounds: two commands at once on a
    # small, shared CI box each run slower (measured up to 2.6x here), and -j1's wall time includes
    # make's/ninja's own work; the tight check is the -j bound above.
    assert 0.3 * serial_s <= sum(durations) <= 4.0 * serial_s, (sum(durations), serial_s)
    assert s.totals.target_time_s == pytest.approx(sum(durations))
    # Lanes: none holds two overlapping targets, at most -j of them for make (ninja: out-of-order
    # reports may need one or two more, see lanes.py).
    by_lane: dict[str, list[tuple[float, float]]] = {}
    for t in ts:
        by_lane.setdefault(t.worker, []).append((t.start, t.end))
    for intervals in by_lane.values():
        intervals.sort()
        assert all(a[1] <= b[0] + 1e-6 for a, b in itertools.pairwise(intervals))
    assert len(by_lane) <= jobs + 2


@pytest.mark.parametrize("method", ["cli", "wrapper"])
async def test_make_j2_one_target_per_recipe(settings, nc, collector, tmp_path: Path, monkeypatch,
                                             method: str) -> None:
    """``cli``: ``buildtel run`` as a user runs it (the preload library where make allows it);
    ``wrapper``: the SHELL wrapper, through ``run_build`` in this process."""
    root = tmp_path / "proj"
    make_project(root, shell="/bin/sh")
    expected = make_recipes_to_run(root)
    assert len(expected) == 23  # 21 objects, the build directory, the 2-line link recipe
    serial = _timed_serial(["make", "-j1"], root, ["make", "clean"])
    if method == "cli":
        res, wall = await _run(["make", "-j2"], root, _env(settings, tmp_path))
        assert res.returncode == 0, res.stderr
        assert "warning" not in res.stderr
    else:
        monkeypatch.chdir(root)
        src = LiveSource(tmp_path / "cache", make_method="wrapper", health_interval_s=0.3)
        t0 = time.monotonic()
        code = await asyncio.to_thread(run_build, ["make", "-j2"], settings, sources=[src], quiet=True,
                                       lower_priority=False)
        wall = time.monotonic() - t0
        assert code == 0 and src.capture is not None and src.capture.method == "wrapper"
    assert (root / "app").exists()
    s = await _session(nc, settings)
    assert s.command == ["make", "-j2"]  # as typed: the -f options buildtel adds are not recorded
    assert sorted(t.name for t in s.targets) == sorted(expected)
    assert all(t.status == "success" and t.exit_code == 0 and t.kind == "recipe" for t in s.targets)
    assert all(t.cpu_s is not None and t.cpu_s <= t.duration_s * 1.05 + 0.01 for t in s.targets if t.name != "build")
    link = next(t for t in s.targets if t.name == "app")
    assert link.start >= max(t.end for t in s.targets if t.name.endswith(".o")) - 1e-3  # after its inputs
    _check_adds_up(s, jobs=2, serial_s=serial, wall_s=wall)
    assert len({t.worker for t in s.targets}) <= 2
    h = s.health
    assert h is not None and h.completed_tasks == len(expected) and h.failed_tasks == 0
    assert (h.active_tasks, h.worker_count, h.status, h.eta_s) == (0, 2, "healthy", None)
    assert h.throughput > 0 and h.memory_percent > 0


async def test_a_failing_recipe_fails_its_target_and_the_session(settings, nc, collector, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    make_project(root, files=6, fail="u3")
    res, _ = await _run(["make", "-j2"], root, _env(settings, tmp_path))
    assert res.returncode == 2 and "failing build/u3.o" in res.stderr
    s = await _session(nc, settings)
    assert s.outcome == "failed" and s.exit_code == 2
    bad = next(t for t in s.targets if t.name == "build/u3.o")
    assert bad.status == "failed" and bad.exit_code == 3
    assert all(t.status == "success" for t in s.targets if t is not bad)
    assert s.health is not None and s.health.failed_tasks == 1 and s.health.status in ("degraded", "critical")
    assert any("failed" in r for r in s.health.reasons)


async def test_ninja_j2_one_target_per_edge(settings, nc, collector, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    ninja_project(root)
    expected = ninja_commands(root, NINJA or "ninja")
    assert len(expected) == 22
    serial = _timed_serial([NINJA or "ninja", "-j1"], root, [NINJA or "ninja", "-t", "clean"])
    (root / ".ninja_log").write_text("# ninja log v5\n0\t5\t1\tstale/entry.o\tdeadbeef\n")  # an earlier build
    res, wall = await _run(["ninja", "-j2"], root, _env(settings, tmp_path))
    assert res.returncode == 0, res.stderr
    s = await _session(nc, settings)
    names = sorted(t.name for t in s.targets)
    assert names == sorted([*(f"obj/u{i}.o" for i in range(20)), "obj/main.o", "app"])
    assert len(names) == len(expected)
    assert all(t.kind == "edge" and t.status == "success" for t in s.targets)
    _check_adds_up(s, jobs=2, serial_s=serial, wall_s=wall)
    app = next(t for t in s.targets if t.name == "app")
    assert app.start >= max(t.end for t in s.targets if t.name != "app") - 0.01
    h = s.health
    assert h is not None and h.completed_tasks == 22 and h.worker_count == 2 and h.status == "healthy"


async def test_cmake_build_with_the_ninja_generator(settings, nc, collector, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    cmake_project(root)
    env = _env(settings, tmp_path)
    await asyncio.to_thread(subprocess.run, ["cmake", "-G", "Ninja", "-S", str(root), "-B", str(root / "b")],
                            env=env, check=True, capture_output=True)
    expected = ninja_commands(root / "b", NINJA or "ninja")
    res, wall = await _run(["cmake", "--build", "b", "--parallel", "2"], root, env)
    assert res.returncode == 0, res.stderr
    s = await _session(nc, settings)
    assert len(s.targets) == len(expected) == 22
    assert sum(t.name.endswith(".c.o") for t in s.targets) == 21 and any(t.name == "app" for t in s.targets)
    assert all(0 <= t.duration_s <= wall for t in s.targets)
    assert s.health is not None and s.health.completed_tasks == 22 and s.health.worker_count == 2
