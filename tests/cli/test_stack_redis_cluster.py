"""``buildtel up --redis-cluster 3``: a real 3-master cluster of the embedded redis-server, listed in
stack.json, that the stack's services fold builds on; ``down`` stops every node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import redis

from buildtel.shared.rediscluster import parse_cluster_url


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "home" / "xdg"),
               BUILDER_TELEMETRY_FINISH_GRACE_S="0.3")
    return env


def _buildtel(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "buildtel.cli.main", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_up_with_a_redis_cluster_folds_builds_and_down_stops_every_node(tmp_path: Path) -> None:
    env, project, log = _env(tmp_path), tmp_path / "project", tmp_path / "up.log"
    project.mkdir()
    stack_json = tmp_path / "home" / "xdg" / "builder-telemetry" / "stack.json"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "buildtel.cli.main", "up", "--redis-cluster", "3"], env=env,
                                cwd=project, stdout=out, stderr=subprocess.STDOUT)
    nodes: list[dict] = []
    try:
        deadline, info = time.monotonic() + 120, {}
        while info.get("state") != "running":
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"stack never running: {log.read_text()}"
            time.sleep(0.1)
            try:
                info = json.loads(stack_json.read_text())
            except (OSError, ValueError):
                info = {}
        nodes = info["redis_cluster"]
        assert len(nodes) == 3 and all(psutil.pid_exists(n["pid"]) for n in nodes)
        assert info["redis_url"].startswith("redis+cluster://")
        assert "redis+cluster://127.0.0.1:" in log.read_text()  # printed without its password
        kw = parse_cluster_url(info["redis_url"])
        host, port = nodes[0]["url"].split(":")
        with redis.Redis(host=host, port=int(port), password=kw["password"]) as r:
            text = r.execute_command("CLUSTER", "INFO").decode()
            assert "cluster_state:ok" in text and "cluster_known_nodes:3" in text and "cluster_size:3" in text
        # A build through the stack: folded on the cluster, completed and stored.
        run = _buildtel("run", "--name", "on-cluster", "--", sys.executable, "-c", "pass", env=env, cwd=project)
        assert run.returncode == 0, run.stderr
        deadline, listed = time.monotonic() + 60, []
        while not listed:
            assert time.monotonic() < deadline, "the build never showed up in 'buildtel sessions'"
            res = _buildtel("sessions", "--json", env=env, cwd=project)
            listed = json.loads(res.stdout) if res.returncode == 0 and res.stdout.strip() else []
            time.sleep(0.2)
        assert [s["name"] for s in listed] == ["on-cluster"]
        down = _buildtel("down", env=env, cwd=project)
        assert down.returncode == 0, down.stderr
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 30
        while any(psutil.pid_exists(n["pid"]) and psutil.Process(n["pid"]).status() != psutil.STATUS_ZOMBIE
                  for n in nodes):
            assert time.monotonic() < deadline, "a cluster node outlived 'buildtel down'"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for n in nodes:
            try:
                p = psutil.Process(n["pid"])
                if p.environ().get("HOME") == env["HOME"]:
                    p.kill()
            except psutil.Error:
                pass


def test_redis_cluster_with_a_configured_redis_is_refused(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "BUILDER_TELEMETRY_REDIS_URL": "redis://127.0.0.1:1/0"}
    res = _buildtel("up", "--redis-cluster", "3", env=env, cwd=tmp_path)
    assert res.returncode != 0 and "--redis-cluster" in res.stderr and "BUILDER_TELEMETRY_REDIS_URL" in res.stderr
