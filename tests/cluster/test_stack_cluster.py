"""``buildtel up --nats-cluster 3``: three embedded nats-server nodes, R3 streams, all in stack.json."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil

from buildtel.shared.auth import StackAuth
from buildtel.shared.bus import connect_nats
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.cli.test_stack_lifecycle import _wait_state


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "home" / "xdg"))
    return env


async def test_up_with_a_three_node_cluster(tmp_path: Path) -> None:
    env = _env(tmp_path)
    data = tmp_path / "home" / "xdg" / "builder-telemetry"
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "buildtel.cli.main", "up", "--nats-cluster", "3"], env=env,
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    pids: list[int] = []
    try:
        info = await asyncio.to_thread(_wait_state, data / "stack.json", proc, "running", log, 120)
        nodes = info["nats_nodes"]
        pids = [n["pid"] for n in nodes]
        assert [n["name"] for n in nodes] == ["n1", "n2", "n3"] and all(psutil.pid_exists(p) for p in pids)
        assert info["nats_url"] == ",".join(n["url"] for n in nodes)
        assert all(n["url"].startswith("nats://127.0.0.1:") for n in nodes)  # loopback only
        assert {e["pid"] for e in info["engines"]} >= set(pids)  # `buildtel down` stops every node
        # Each node keeps its JetStream store in its own private directory.
        for n in nodes:
            store = data / "engines" / "nats-cluster" / n["name"]
            assert stat.S_IMODE(store.stat().st_mode) == 0o700 and (store / "jetstream").is_dir()
        assert "NATS nats://127.0.0.1:" in log.read_text()
        # The services declared every stream with three replicas.
        s = Settings(cache_dir=data, stack_auth=StackAuth.from_json(info["auth"]), nats_url=info["nats_url"])
        nc = await connect_nats(s, info["nats_url"], name="test", role="operator")
        try:
            js = nc.jetstream()
            events = await js.stream_info(Subjects("buildtel").events_stream)
            assert events.config.num_replicas == 3 and len(events.cluster.replicas or []) == 2
        finally:
            await nc.close()
        # One node SIGKILLed: commands still reach the stack through the others.
        os.kill(pids[0], signal.SIGKILL)
        listing = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "sessions"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
        assert listing.returncode == 0 and "no sessions stored yet" in listing.stderr, listing.stderr
        down = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "down"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert proc.wait(60) == 0

        def gone() -> bool:
            return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                           for p in pids)

        deadline = time.monotonic() + 30
        while not gone():
            assert time.monotonic() < deadline, "a cluster node outlived 'buildtel down'"
            await asyncio.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for p in pids:
            try:
                psutil.Process(p).kill()
            except psutil.Error:
                pass


def test_nats_cluster_and_a_configured_url_exclude_each_other(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "BUILDER_TELEMETRY_NATS_URL": "nats://127.0.0.1:1"}
    res = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "up", "--nats-cluster", "3"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "--nats-cluster" in res.stderr and "BUILDER_TELEMETRY_NATS_URL" in res.stderr
    assert "Traceback" not in res.stderr
    bad = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "up", "--nats-cluster", "9"], env=_env(tmp_path),
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "1 to 5 nodes" in bad.stderr
