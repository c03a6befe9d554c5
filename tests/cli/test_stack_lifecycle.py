"""One stack per user and machine, read commands that never start or hang, nothing left behind.

Every test gives the child processes a HOME and XDG_DATA_HOME under tmp_path, so the
per-user default data directory is exercised without touching the real user's home.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from buildtel.cli.common import process_record, stop_stack
from buildtel.shared.settings import Settings, default_data_dir


def _user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "home" / "xdg"),
               BUILDER_TELEMETRY_FINISH_GRACE_S="0.3", **extra)
    return env


def _buildtel(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "buildtel.cli.main", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _wait_state(path: Path, proc: subprocess.Popen[bytes], state: str, log: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"buildtel up exited: {log.read_text()}")
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("state") == state and (state != "starting" or info.get("engines")):
            return info
        time.sleep(0.1)
    raise AssertionError(f"stack.json never reached state {state!r}: {log.read_text()}")


def _alive(rec: dict) -> bool:
    try:
        p = psutil.Process(rec["pid"])
        return p.create_time() == pytest.approx(rec["created"], abs=1.0) and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ours(home: Path) -> list[psutil.Process]:
    """Processes started with this test's HOME (a background 'buildtel up', its engines)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("HOME") == str(home):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, subprocess.Popen[bytes], Path]]:
    """``buildtel up`` with nothing configured, run from a project directory."""
    env = _user_env(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "buildtel.cli.main", "up"], env=env, cwd=project,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield env, project, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for p in _ours(tmp_path / "home"):
            p.kill()


def test_default_data_dir_follows_the_platform_convention(tmp_path: Path) -> None:
    home = str(tmp_path)
    assert default_data_dir({"HOME": home}, "linux") == tmp_path / ".local/share/builder-telemetry"
    assert default_data_dir({"HOME": home, "XDG_DATA_HOME": "/x/data"}, "linux") == Path("/x/data/builder-telemetry")
    # The XDG spec: a relative XDG_DATA_HOME is invalid and ignored.
    expected = tmp_path / ".local/share/builder-telemetry"
    assert default_data_dir({"HOME": home, "XDG_DATA_HOME": "rel"}, "linux") == expected
    assert default_data_dir({"HOME": home}, "darwin") == tmp_path / "Library/Application Support/builder-telemetry"
    assert Settings.from_env({"HOME": home}).cache_dir == default_data_dir({"HOME": home})
    assert Settings.from_env({"HOME": home, "BUILDER_TELEMETRY_CACHE_DIR": "proj/.bt"}).cache_dir == Path("proj/.bt")


def test_one_stack_per_user_and_after_down_read_commands_start_nothing(up, tmp_path: Path) -> None:
    env, project, proc, log = up
    data = tmp_path / "home" / "xdg" / "builder-telemetry"
    info = _wait_state(data / "stack.json", proc, "running", log)
    # The user's data directory, private, with nothing in the project the user commits.
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert (data / "telemetry").is_dir() and (data / "engines").is_dir()
    assert list(project.iterdir()) == []
    # Another project directory of the same user finds the same stack.
    other = tmp_path / "other-project"
    other.mkdir()
    listing = _buildtel("sessions", env=env, cwd=other)
    assert listing.returncode == 0 and "no sessions stored yet" in listing.stderr, listing.stderr
    down = _buildtel("down", env=env, cwd=other)
    assert down.returncode == 0 and f"stack (pid {info['pid']}) stopped" in down.stderr, down.stderr
    assert proc.wait(30) == 0
    assert not any(_alive(e) for e in info["engines"])
    for cmd in (["sessions"], ["report"], ["watch", "--once"], ["flamegraph", "--last", "5", "-o", "x.svg"]):
        res = _buildtel(*cmd, env=env, cwd=project)
        assert res.returncode == 2, (cmd, res.stderr)
        assert "no Builder Telemetry stack is running" in res.stderr and str(data) in res.stderr, (cmd, res.stderr)
    assert not (data / "stack.json").exists() and not (data / "stack.log").exists()
    assert _ours(tmp_path / "home") == []


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections and never says a word (a firewalled or hung NATS)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"nats://127.0.0.1:{s.getsockname()[1]}"


def test_an_unreachable_configured_url_fails_in_seconds_naming_it(silent_server: str, tmp_path: Path) -> None:
    env = _user_env(tmp_path, BUILDER_TELEMETRY_NATS_URL=silent_server)
    for cmd in (["sessions"], ["watch", "--once"]):
        t0 = time.monotonic()
        res = _buildtel(*cmd, env=env, cwd=tmp_path)
        took = time.monotonic() - t0
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert f"cannot reach NATS at {silent_server} (BUILDER_TELEMETRY_NATS_URL)" in res.stderr, res.stderr
        assert took < 15, f"{cmd} took {took:.1f} s"  # the connect deadline is 5 s; it used to be 20-30 s
    assert not (tmp_path / "home" / "xdg" / "builder-telemetry" / "stack.json").exists()
    assert _ours(tmp_path / "home") == []


def test_sigterm_while_services_wait_for_an_unreachable_nats_stops_the_stack_and_its_redis(
        silent_server: str, tmp_path: Path) -> None:
    env = _user_env(tmp_path, BUILDER_TELEMETRY_NATS_URL=silent_server)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "buildtel.cli.main", "up"], env=env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        info = _wait_state(tmp_path / "home/xdg/builder-telemetry/stack.json", proc, "starting", log)
        [redis] = info["engines"]
        assert redis["name"] == "redis-server" and _alive(redis)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not _alive(redis)
        assert not (tmp_path / "home/xdg/builder-telemetry/stack.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_sigterm_to_the_stack_leaves_no_engine(up, tmp_path: Path) -> None:
    _env, _project, proc, log = up
    info = _wait_state(tmp_path / "home/xdg/builder-telemetry/stack.json", proc, "running", log)
    assert [e["name"] for e in info["engines"]] == ["nats-server", "redis-server"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not any(_alive(e) for e in info["engines"])


def test_down_after_the_stack_was_sigkilled_stops_its_engines(up, tmp_path: Path) -> None:
    env, project, proc, log = up
    data = tmp_path / "home/xdg/builder-telemetry"
    info = _wait_state(data / "stack.json", proc, "running", log)
    proc.kill()
    proc.wait(30)
    down = _buildtel("down", env=env, cwd=project)
    assert down.returncode == 0, down.stderr
    assert not any(_alive(e) for e in info["engines"]), down.stderr
    assert not (data / "stack.json").exists()
    assert "no stack is running" in _buildtel("down", env=env, cwd=project).stderr


def test_stop_stack_stops_an_engine_that_outlived_its_stack(tmp_path: Path) -> None:
    # Where there is no death signal (macOS), an engine outlives a SIGKILLed stack: down stops it
    # from the pid and start time stack.json recorded.
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        path = tmp_path / "stack.json"
        dead = subprocess.Popen(["true"])
        dead.wait()
        info = {"pid": dead.pid, "pid_created": 0.0,
                "engines": [{"name": "redis-server", **process_record(orphan.pid)}]}
        path.write_text(json.dumps(info))
        done = stop_stack(info, path=path)
        assert done == [f"redis-server (pid {orphan.pid}) outlived the stack: stopped"]
        assert orphan.wait(10) == -signal.SIGTERM
        assert not path.exists()
        # A recorded pid now used by another process (other start time) is left alone.
        other = subprocess.Popen(["sleep", "300"], start_new_session=True)
        try:
            assert stop_stack({"pid": 0, "engines": [{"name": "x", "pid": other.pid, "created": 1.0}]}) == []
            assert other.poll() is None
        finally:
            other.kill()
            other.wait()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
