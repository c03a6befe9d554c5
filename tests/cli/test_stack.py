"""``buildtel up``/``down``/``serve``/``sessions``/``show`` as a user runs them, in subprocesses.

The embedded path runs with the URL variables unset: ``buildtel up`` must start its own
nats-server and redis-server from the PyPI packages on free loopback ports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from buildtel.shared.codec import encode
from buildtel.shared.subjects import Subjects
from tests.util import stack_env, synthetic_build


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(BUILDER_TELEMETRY_CACHE_DIR=str(cache), BUILDER_TELEMETRY_FINISH_GRACE_S="0.3", **extra)
    return env


def buildtel(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "buildtel.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _wait_stack(cache: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"buildtel up exited: {log.read_text()}")
        path = cache / "stack.json"
        if path.exists():
            info = json.loads(path.read_text())
            if info.get("state") == "running":  # written first as "starting", before the services
                return info
        time.sleep(0.1)
    raise AssertionError("buildtel up did not write stack.json")


@pytest.fixture
def embedded_stack(tmp_path: Path):
    cache = tmp_path / ".builder-cache"
    env = _env(cache)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "buildtel.cli.main", "up"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        info = _wait_stack(cache, proc, log)
        yield cache, env, info, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def test_up_with_no_urls_starts_embedded_engines_on_loopback(embedded_stack) -> None:
    cache, env, info, proc = embedded_stack
    assert info["embedded"] == ["nats-server", "redis-server"]
    assert info["nats_url"].startswith("nats://127.0.0.1:") and not info["nats_url"].endswith(":4222")
    password = info["auth"]["redis_password"]
    assert len(password) >= 24 and info["redis_url"].startswith(f"redis://:{password}@127.0.0.1:")
    assert set(info["auth"]["nats"]) >= {"agent", "collector", "storage", "reader", "operator"}
    assert (cache / "engines" / "nats" / "jetstream").is_dir()
    assert "collector" in info["services"] and "storage" in info["services"]
    # The two Bazel flags (docs/bazel.md): the BES endpoint and the dashboard's session pages.
    flags = f"buildtel: Bazel: --bes_backend={info['bes_url']} --bes_results_url={info['web_url']}/sessions/"
    deadline = time.monotonic() + 30
    log = cache.parent / "up.log"  # the fixture's: buildtel up's output
    while flags not in log.read_text() and time.monotonic() < deadline:  # printed just after stack.json
        time.sleep(0.1)
    assert flags in log.read_text(), log.read_text()
    # A second `up` on the same data directory refuses instead of fighting over it.
    second = buildtel("up", env=env, timeout=30)
    assert second.returncode == 2 and "already running" in second.stderr
    down = buildtel("down", env=env)
    assert down.returncode == 0
    assert proc.wait(timeout=30) == 0
    assert not (cache / "stack.json").exists()


async def test_a_build_published_to_the_embedded_stack_shows_up_in_sessions_and_show(embedded_stack) -> None:
    import nats

    _cache, env, info, _ = embedded_stack
    subjects = Subjects("buildtel")
    sid, per_agent, expected = synthetic_build(targets=25, seed=4)
    # An agent of this stack: the role's password from stack.json (what 'buildtel credentials
    # agent' hands to a build machine).
    nc = await nats.connect(info["nats_url"], user="agent", password=info["auth"]["nats"]["agent"],
                            inbox_prefix="_INBOX.agent")
    js = nc.jetstream()
    from buildtel.shared.protocol import EventBatch

    await js.publish(subjects.events(sid), encode(EventBatch(session_id=sid, agent_id="agent-a",
                                                             events=per_agent["agent-a"])))
    await nc.close()
    listing = None
    for _ in range(50):
        listing = buildtel("sessions", "--json", env=env)
        if listing.returncode == 0 and sid in listing.stdout:
            break
        time.sleep(0.2)
    assert listing is not None and sid in listing.stdout, listing.stderr
    [row] = json.loads(listing.stdout)
    assert row["targets"] == expected["targets"]  # a summary: the count
    shown = buildtel("show", sid[:10], env=env)
    assert shown.returncode == 0, shown.stderr
    assert sid in shown.stdout and f"targets   {expected['targets']} " in shown.stdout
    assert f"{expected['hits']} hits / {expected['misses']} misses" in shown.stdout
    text = buildtel("sessions", env=env)
    assert sid in text.stdout and "success" in text.stdout


def test_errors_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    env = _env(tmp_path / "c", BUILDER_TELEMETRY_MAX_SESSIONS="many")
    res = buildtel("sessions", env=env)
    assert res.returncode == 2
    assert res.stderr.strip() == ("buildtel: error: BUILDER_TELEMETRY_MAX_SESSIONS: cannot use 'many': "
                                  "invalid literal for int() with base 10: 'many'")
    res = buildtel("serve", "collector", env=_env(tmp_path / "d"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "BUILDER_TELEMETRY_NATS_URL" in res.stderr


def test_serve_runs_one_service_against_a_configured_cluster(settings, nats_url, redis_url, tmp_path: Path) -> None:
    env = _env(tmp_path / "c", **stack_env(settings))
    proc = subprocess.Popen([sys.executable, "-m", "buildtel.cli.main", "serve", "storage"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stats = None
        for _ in range(100):
            stats = buildtel("sessions", env=env, timeout=20)
            if stats.returncode == 0:
                break
            time.sleep(0.1)
        assert stats is not None and stats.returncode == 0 and "no sessions stored yet" in stats.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_run_then_sessions_just_works_on_a_laptop_with_nothing_configured(tmp_path: Path) -> None:
    cache = tmp_path / ".builder-cache"
    env = _env(cache)
    (tmp_path / "Makefile").write_text("all:\n\t@echo compiled > out.txt\n")
    try:
        run = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "run", "--", "make", "-s"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, run.stderr
        assert (tmp_path / "out.txt").read_text() == "compiled\n"
        sid = run.stderr.strip().splitlines()[-1].split()[2]
        listing = None
        for _ in range(50):
            listing = buildtel("sessions", env=env)
            if sid in listing.stdout:
                break
            time.sleep(0.2)
        assert listing is not None and sid in listing.stdout and "success" in listing.stdout
        assert json.loads((cache / "stack.json").read_text())["embedded"] == ["nats-server", "redis-server"]
    finally:
        assert buildtel("down", env=env).returncode == 0
