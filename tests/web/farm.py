"""A farm for the web tests: ``buildtel up`` serving two tenants (its own namespace and ``teamb``),
filled by ``buildtel demo`` (with its injected regression and alert) and real ``buildtel run`` make
builds, one of them failing; keys of each scope.  Module-scoped: each test module gets its own."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cli.test_stack import _env, _wait_stack, buildtel

MAKEFILE = """\
all: app
app: lib.o main.o
\t@echo link app
lib.o:
\t@echo compile lib
main.o:
\t@echo compile main
broken:
\t@echo 'main.c:3: error: expected ;' >&2; exit 1
.PHONY: check junit.xml
check: junit.xml
junit.xml:
\t@printf '%s\\n' '<testsuite name="farm.unit" tests="3">' \\
\t  '<testcase classname="farm.unit" name="test_ok" time="0.01"/>' \\
\t  '<testcase classname="farm.unit" name="test_slow" time="2.5"/>' \\
\t  '<testcase classname="farm.unit" name="test_flaky" time="0.2">$(FLAKE)</testcase>' \\
\t  '</testsuite>' > junit.xml
"""
FLAKE = '<failure message="AssertionError: expected 3, got 4">assert 3 == 4</failure>'

PUBLIC = ("/healthz", "/api/v1/openapi.json")
FARM_TIMEOUT_S = 420  # per test in the modules that use a farm: its setup, then the first test's steps


class Farm:
    def __init__(self, cache: Path, env: dict[str, str], info: dict[str, Any]) -> None:
        self.cache, self.env, self.info = cache, env, info
        self.web: str = info["web_url"]
        self.keys: dict[str, str] = {}
        self.ids: dict[str, str] = {}  # what the id parameters of the paths are filled with


def _build(env: dict[str, str], workdir: Path, *args: str, record: bool = False) -> str:
    run = buildtel("run", "--json", *(["--record"] if record else []), "--", "make", "-C", str(workdir), *args,
                   env=env, timeout=120)
    return str(json.loads(run.stdout)["session_id"])


def _junit_build(env: dict[str, str], workdir: Path, flake: str = "") -> str:
    """A ``make check`` writing a JUnit report, run in ``workdir`` (a git repository of its own, so
    every such build is on one commit and a test that passes in one and fails in another is flaky).
    The report is the output of target ``junit.xml``: its tests are that target's (its page lists them)."""
    run = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "run", "--json", "--junit",
                          str(workdir / "junit.xml"), "--", "make", "-C", str(workdir), "check", f"FLAKE={flake}"],
                         env=env, cwd=workdir, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return str(json.loads(run.stdout)["session_id"])


def _git_repo(path: Path) -> None:
    for argv in (["init", "-q", "-b", "main"], ["add", "Makefile"],
                 ["-c", "user.name=farm", "-c", "user.email=farm@example.invalid", "commit", "-q", "-m", "farm"]):
        subprocess.run(["git", *argv], cwd=path, check=True, capture_output=True)


@contextmanager
def running_stack(tmp: Path, **extra: str) -> Iterator[tuple[Path, dict[str, str], dict[str, Any]]]:
    """``buildtel up`` in a process of its own, its data in ``tmp``: (data dir, environment,
    stack.json with the start-up log as ``log``); stopped with SIGTERM at the end."""
    cache = tmp / ".builder-cache"
    env = _env(cache, **extra)
    log = tmp / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "buildtel.cli.main", "up"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        info = _wait_stack(cache, proc, log, timeout=120)
        yield cache, env, {**info, "log": log.read_text()}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    tmp = tmp_path_factory.mktemp("farm")
    # The tests poll and sweep every endpoint with a few keys: no rate limit in their way (its own
    # test is test_keys.py's).
    with running_stack(tmp, BUILDER_TELEMETRY_TENANTS="teamb", BUILDER_TELEMETRY_WEB_RATE_LIMIT="100000") as (
            cache, env, info):
        farm = Farm(cache, env, info)
        # 30 builds: the demo slows one target from build 20 on, and 10 builds after a change are
        # enough for the analyzer to confirm it every time (with 18, 6 were not always enough).
        demo = buildtel("demo", "--builds", "30", "--targets", "60", env=env, timeout=300)
        assert demo.returncode == 0, demo.stderr[-2000:]
        src = tmp / "src"
        src.mkdir()
        (src / "Makefile").write_text(MAKEFILE)
        _git_repo(src)
        farm.ids["ok"] = _build(env, src)
        farm.ids["failed"] = _build(env, src, "broken")
        farm.ids["rec_a"] = _build(env, src, record=True)
        farm.ids["rec_b"] = _build(env, src, "lib.o", record=True)
        farm.ids["tests_ok"] = _junit_build(env, src)
        farm.ids["tests_flaky"] = _junit_build(env, src, FLAKE)
        farm.ids["teamb"] = _build({**env, "BUILDER_TELEMETRY_NAMESPACE": "teamb"}, src)
        for name, tenant, scope in (("read", "buildtel", "read"), ("write", "buildtel", "write"),
                                    ("admin", "buildtel", "admin"), ("revoked", "buildtel", "read"),
                                    ("spare", "buildtel", "read"), ("teamb", "teamb", "read"),
                                    ("teamb_admin", "teamb", "admin")):
            made = buildtel("keys", "create", "--tenant", tenant, "--scope", scope, env=env)
            assert made.returncode == 0, made.stderr
            farm.keys[name] = made.stdout.strip()
        assert buildtel("keys", "revoke", farm.keys["revoked"][4:16], env=env).returncode == 0
        farm.ids["key"] = farm.keys["spare"][4:16]  # a key the tests may revoke
        yield farm


async def get_json(http: aiohttp.ClientSession, url: str, key: str) -> Any:
    async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, (url, await resp.text())
        return await resp.json()


async def ready(farm: Farm, http: aiohttp.ClientSession) -> dict[str, Any]:
    """Wait (bounded) until storage holds every build and the demo's alert is out; the document."""
    key = farm.keys["read"]
    deadline = time.monotonic() + 240  # inside FARM_TIMEOUT_S after the farm's setup: a clear failure, not a timeout
    while True:
        page = await get_json(http, f"{farm.web}/api/v1/sessions?limit=100", key)
        alerts = await get_json(http, f"{farm.web}/api/v1/alerts", key)
        theirs = await get_json(http, f"{farm.web}/api/v1/sessions", farm.keys["teamb"])
        recorded = await get_json(http, f"{farm.web}/api/v1/recordings", key)
        stored = {s["id"] for s in page["sessions"]}
        kept = {r["id"] for r in recorded["recordings"]}
        wanted = {farm.ids[k] for k in ("ok", "failed", "rec_a", "rec_b", "tests_ok", "tests_flaky")}
        if (wanted <= stored and len(stored) >= 20
                and alerts["alerts"] and theirs["sessions"] and {farm.ids["rec_a"], farm.ids["rec_b"]} <= kept):
            break
        assert time.monotonic() < deadline, (len(stored), len(alerts["alerts"]), len(theirs["sessions"]), kept)
        await _pause()
    session = await get_json(http, f"{farm.web}/api/v1/sessions/{farm.ids['ok']}", key)
    farm.ids["session"] = farm.ids["ok"]
    farm.ids["demo"] = next(s["id"] for s in page["sessions"] if s["targets"] >= 60)
    farm.ids["other"] = farm.ids["failed"]
    farm.ids["alert"] = alerts["alerts"][0]["id"]
    farm.ids["target"] = session["targets"][0]["name"]
    if "subscription" not in farm.ids:  # one the tests may delete (test_endpoints.py)
        async with http.post(f"{farm.web}/api/v1/subscriptions",
                             json={"id": "to-delete", "kind": "nats", "subject": "t"},
                             headers={"Authorization": f"Bearer {farm.keys['admin']}"}) as resp:
            assert resp.status == 201, await resp.text()
        farm.ids["subscription"] = "to-delete"
    return dict(await get_json(http, f"{farm.web}/api/v1/openapi.json", key))


async def _pause() -> None:
    await asyncio.sleep(0.2)
