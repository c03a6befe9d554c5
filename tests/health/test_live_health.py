"""Health on the bus: ``buildtel run`` publishes checkpoints live (core NATS) and as events, the
final one is the session's ``health``, and ``buildtel watch`` shows running builds."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from buildtel.cli.cmd_watch import Board, cmd_watch, render_table
from buildtel.services.collector.service import CollectorService
from buildtel.shared.client import SyncTelemetryClient
from buildtel.shared.codec import event_decoder
from buildtel.shared.protocol import HealthCheckpoint
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import completed_sessions, stack_env

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, **stack_env(settings))
    env.update(BUILDER_TELEMETRY_NATS_URL=settings.nats_url or "", BUILDER_TELEMETRY_REDIS_URL=settings.redis_url or "",
               BUILDER_TELEMETRY_NAMESPACE=settings.namespace, BUILDER_TELEMETRY_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO))
    return env


async def test_run_publishes_live_checkpoints_and_the_last_one_is_stored(settings, nc, redis_client,
                                                                         tmp_path: Path) -> None:
    collector = CollectorService(settings, settings.nats_url or "", settings.redis_url or "")
    await collector.start()
    live: list[HealthCheckpoint] = []

    async def on_msg(msg) -> None:
        live.append(event_decoder.decode(msg.data))

    sub = await nc.subscribe(Subjects(settings.namespace).health_all, cb=on_msg)
    try:
        script = "import time\nblob = bytearray(60_000_000)\ntime.sleep(3)\n"
        res = await asyncio.to_thread(
            subprocess.run, [PY, "-m", "buildtel.cli.main", "run", "--health-interval", "0.25", "--", PY, "-c", script],
            env=_env(settings, tmp_path), capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        sessions = await completed_sessions(nc.jetstream(), Subjects(settings.namespace), 1, timeout=20)
    finally:
        await sub.unsubscribe()
        await collector.stop()
    assert len(sessions) == 1
    s = sessions[0]
    assert len(live) >= 3 and all(cp.session_id == s.id for cp in live)
    assert max(cp.memory_bytes for cp in live) > 50_000_000  # the tree's RSS, sampled live
    assert all(cp.status == "healthy" and cp.completed_tasks == 0 for cp in live)
    assert s.health is not None and s.health.ts == max(cp.ts for cp in live)  # the final one is kept
    assert s.health.memory_percent > 0


async def test_watch_once_shows_running_builds(settings, nc, tmp_path: Path) -> None:
    clients = []
    for i, status_fields in enumerate([
        {"completed_tasks": 12, "active_tasks": 2, "worker_count": 2, "active_workers": 2, "utilisation": 1.0},
        {"completed_tasks": 7, "failed_tasks": 3, "status": "critical",
         "reasons": ["3 of 7 finished tasks failed (43%)"], "pending_tasks": 4, "eta_s": 95.0},
    ]):
        c = SyncTelemetryClient(settings, name=f"watched-{i}", agent_id=f"agent-{i}").start()
        clients.append((c, status_fields))
    deadline = time.monotonic() + 10
    while not all(c.connected for c, _ in clients) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)

    async def publish() -> None:
        for _ in range(15):
            for c, fields in clients:
                c.health(**fields)
            await asyncio.sleep(0.2)

    out = io.StringIO()
    args = argparse.Namespace(session=None, once=True, duration=1.5, plain=False)
    task = asyncio.create_task(publish())
    try:
        code = await cmd_watch(args, settings, out=out)
    finally:
        task.cancel()
        for c, _ in clients:
            c.close()
    assert code == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:4] == ["SESSION", "AGENT", "STATUS", "DONE"]
    rows = lines[1:]
    assert len(rows) == 2
    assert rows[0].startswith(clients[1][0].session_id[:12]) and " critical " in rows[0]  # worst first
    assert "1m35s" in rows[0] and "3 of 7 finished tasks failed" in rows[0]
    assert " healthy " in rows[1] and "2/2" in rows[1] and "100%" in rows[1]
    assert "\x1b[" not in out.getvalue()


async def test_watch_one_session_in_plain_lines(settings, nc) -> None:
    watched = SyncTelemetryClient(settings, name="watched").start()
    other = SyncTelemetryClient(settings, name="other").start()
    deadline = time.monotonic() + 10
    while not (watched.connected and other.connected) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)

    async def publish() -> None:
        for i in range(20):
            watched.health(completed_tasks=i, worker_count=4)
            other.health(completed_tasks=100 + i)
            await asyncio.sleep(0.1)

    out = io.StringIO()
    args = argparse.Namespace(session=watched.session_id, once=False, duration=1.2, plain=True)
    task = asyncio.create_task(publish())
    try:
        assert await cmd_watch(args, settings, out=out) == 0
    finally:
        task.cancel()
        watched.close()
        other.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3
    assert all(watched.session_id in line and " healthy done=" in line for line in lines)
    assert all(other.session_id not in line for line in lines)


def test_board_keeps_the_newest_checkpoint_and_marks_silence() -> None:
    from buildtel.shared.codec import encode

    board = Board()
    old = HealthCheckpoint(session_id="a" * 32, agent_id="x", seq=1, ts=10.0, completed_tasks=1)
    new = HealthCheckpoint(session_id="a" * 32, agent_id="x", seq=2, ts=20.0, completed_tasks=2)
    board.add(encode(new), now=100.0)
    board.add(encode(old), now=101.0)  # reordered by core NATS: ignored
    board.add(b"\x00not msgpack", now=101.0)
    assert board.bad == 1 and board.rows[("a" * 32, "x")][0].completed_tasks == 2
    assert "stale(healthy)" in render_table(board, now=130.0)[1]
    board.prune(now=300.0)
    assert board.rows == {}


def test_watch_without_a_stack_is_one_clear_error(tmp_path: Path) -> None:
    # A subprocess: main() configures logging to the streams of the process it runs in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(BUILDER_TELEMETRY_CACHE_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    res = subprocess.run([PY, "-m", "buildtel.cli.main", "watch", "--once", "--duration", "0.1"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("buildtel: error: no Builder Telemetry stack is running")


def test_watch_exits_cleanly_on_ctrl_c(settings, tmp_path: Path) -> None:
    import signal

    env = _env(settings, tmp_path)
    proc = subprocess.Popen([PY, "-m", "buildtel.cli.main", "watch", "--plain"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    build = SyncTelemetryClient(settings, name="watched").start()
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        # ^C once watch is watching: its first line shows a checkpoint arrived, so the interpreter is
        # up, the handlers are installed and it is subscribed (a fixed sleep raced start-up on a
        # loaded machine, and the SIGINT then hit it while importing: exit 130).
        deadline = time.monotonic() + 60
        while reader.is_alive() and proc.poll() is None and time.monotonic() < deadline:
            build.health(completed_tasks=1)
            reader.join(0.2)
        assert first and build.session_id in first[0], (first, proc.poll())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        build.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err


async def test_health_over_time_is_kept_one_checkpoint_per_5_s(settings, nc, redis_client) -> None:
    """Checkpoints every 1.25 s over half a minute: the stored build keeps the earliest of each 5 s
    slot, oldest first, with what the session page charts (busy workers, memory, status)."""
    from buildtel.shared.protocol import BuildFinished, BuildStarted, new_session_id
    from tests.util import publish_events

    sid, agent = new_session_id(), "agent-h"
    t0 = (time.time() - 600) // 5 * 5  # on a slot boundary: 24 checkpoints fill exactly 6 slots
    events: list = [BuildStarted(session_id=sid, agent_id=agent, seq=0, ts=t0, name="healthy")]
    for i in range(24):
        events.append(HealthCheckpoint(session_id=sid, agent_id=agent, seq=i + 1, ts=t0 + 1.25 * i,
                                       active_workers=(i // 4) % 4, worker_count=4, memory_bytes=(i + 1) << 20,
                                       status="degraded" if i == 13 else "healthy"))
    events.append(BuildFinished(session_id=sid, agent_id=agent, seq=25, ts=t0 + 31, exit_code=0))
    collector = CollectorService(settings.with_(finish_grace_s=0.1), settings.nats_url or "",
                                 settings.redis_url or "")
    await collector.start()
    try:
        # Newest batches first: the earliest checkpoint of a slot is kept, whatever the order.
        await publish_events(nc.jetstream(), Subjects(settings.namespace), sid, agent, events[1:-1][::-1], size=1)
        await publish_events(nc.jetstream(), Subjects(settings.namespace), sid, agent, [events[0], events[-1]])
        [s] = await completed_sessions(nc.jetstream(), Subjects(settings.namespace), 1, timeout=30)
    finally:
        await collector.stop()
    assert [p.ts for p in s.health_series] == [t0 + 5 * k for k in range(6)]
    assert [p.active_workers for p in s.health_series] == [0, 1, 2, 3, 0, 1]
    assert s.health_series[3].memory_bytes == 13 << 20 and s.health_series_dropped == 0
    assert s.health is not None and s.health.ts == t0 + 1.25 * 23  # the latest is still the session's health
