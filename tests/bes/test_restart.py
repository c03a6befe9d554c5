"""The BES endpoint killed (SIGKILL) while a real Bazel build streams to it: restarted on the same
port, Bazel's retries complete the session with nothing lost; never restarted, the session is
stored incomplete (abandoned), never as success (docs/bazel.md#never-in-the-builds-way)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from buildtel.services.collector.service import CollectorService
from buildtel.shared.protocol import is_complete
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.bes.client import as_imported
from tests.bes.test_bazel import _targets, _workspace
from tests.util import completed_sessions, stack_env

REPO = Path(__file__).resolve().parents[2]
SLOW_S = "15"  # the slow genrule: long enough for the endpoint to be killed and back while it runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Endpoint:
    """``python -m buildtel.services.bes`` as its own process on a fixed port, to kill and restart."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings, self.port = settings, port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
        env.update(stack_env(self.settings), PYTHONPATH=str(REPO), BUILDER_TELEMETRY_BES_PORT=str(self.port),
                   BUILDER_TELEMETRY_CACHE_DIR=str(self.settings.cache_dir))
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "buildtel.services.bes", env=env,
                                                         stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:  # listening: ready
            await asyncio.wait_for(channel.channel_ready(), 60)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


@pytest.fixture
async def endpoint(bes_settings: Settings, nc: Any) -> AsyncIterator[Endpoint]:
    ep = Endpoint(bes_settings, _free_port())
    try:
        await ep.start()
        yield ep
    finally:
        await ep.kill()


async def _bazel(ws: Path, tmp_path: Path, *args: str, on: str,
                 action: Callable[[], Awaitable[None]]) -> tuple[int, str]:
    """Run ``bazel build``; once ``on`` is printed, run ``action`` (while the build goes on)."""
    startup = [f"--output_user_root={tmp_path / 'bazel-root'}", "--max_idle_secs=30"]
    proc = await asyncio.create_subprocess_exec(
        "bazel", *startup, "build", "--color=no", "--curses=no", "--show_progress", "--show_progress_rate_limit=0",
        *args, cwd=ws, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "HOME": str(tmp_path)})
    assert proc.stdout is not None
    out: list[str] = []
    task: asyncio.Task[Any] | None = None
    while line := await proc.stdout.readline():
        text = line.decode(errors="replace")
        out.append(text)
        if task is None and on in text:
            task = asyncio.create_task(action())
    rc = await proc.wait()
    assert task is not None, "".join(out)
    await task
    return rc, "".join(out)


@pytest.fixture
async def patient_collector(bes_settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[CollectorService]:
    """A collector with the default inactivity timeout: the slow genrule sends no event for a while."""
    settings = dataclasses.replace(bes_settings, session_timeout_s=300.0)
    async with CollectorService(settings, settings.nats_url or "", settings.redis_url or "") as svc:
        yield svc


async def test_endpoint_killed_and_restarted_mid_build_loses_nothing(
        patient_collector: CollectorService, endpoint: Endpoint, nc: Any, tmp_path: Path) -> None:
    ws = _workspace(tmp_path, delay=SLOW_S)
    bep_file = tmp_path / "bep.json"

    async def restart() -> None:
        # Killed only once the first endpoint has put some of the build on the bus: on a loaded
        # machine Bazel can still be buffering when the genrule starts, and a kill before anything
        # was published leaves nothing for the second endpoint to add to (a CI run saw 1 agent).
        deadline = time.monotonic() + 60
        while patient_collector.events_in == 0:
            assert time.monotonic() < deadline, "the first endpoint published no event of the build"
            await asyncio.sleep(0.05)
        await endpoint.kill()
        await endpoint.start()  # same port: Bazel's retries reach it

    rc, printed = await _bazel(ws, tmp_path, "--jobs=4", "//:a", "//:b", "//:c", "//:slow",
                               f"--bes_backend=grpc://127.0.0.1:{endpoint.port}", f"--build_event_json_file={bep_file}",
                               on="Executing genrule //:slow", action=restart)
    assert rc == 0 and "Build Event Protocol upload failed" not in printed, printed
    [live] = await completed_sessions(nc.jetstream(), Subjects(endpoint.settings.namespace), 1, timeout=60)
    imported = as_imported(bep_file.read_bytes())
    assert live.id == imported.id and is_complete(live)
    assert (live.outcome, live.exit_code) == ("success", 0)
    assert (live.name, live.command) == (imported.name, imported.command)  # the first endpoint's header stands
    assert _targets(live) == _targets(imported)  # every target, the ones Bazel resent included
    assert {n for n, _ in _targets(live)} >= {"//:a", "//:b", "//:c", "//:slow"}
    assert len(live.agents) == 2  # the mapper before the kill and the one after


async def test_endpoint_killed_for_good_leaves_an_incomplete_session(collector: CollectorService, endpoint: Endpoint,
                                                                      nc: Any, tmp_path: Path) -> None:
    # The BES fixtures' collector: a short inactivity timeout, so the broken session is stored soon.
    ws = _workspace(tmp_path, delay="10")

    async def kill_once_the_build_is_on_the_bus() -> None:
        # With --bes_upload_mode=fully_async Bazel runs ahead of a loaded endpoint: killed before
        # it published anything there would be no session to leave incomplete (a loaded full run).
        deadline = time.monotonic() + 60
        while collector.events_in == 0:
            assert time.monotonic() < deadline, "the endpoint published no event of the build"
            await asyncio.sleep(0.05)
        await endpoint.kill()

    rc, printed = await _bazel(ws, tmp_path, "--jobs=4", "//:a", "//:slow", "--bes_upload_mode=fully_async",
                               f"--bes_backend=grpc://127.0.0.1:{endpoint.port}",
                               on="Executing genrule //:slow", action=kill_once_the_build_is_on_the_bus)
    assert rc == 0, printed  # the build is the build's: the endpoint's death changes nothing in it
    assert (ws / "bazel-bin" / "slow.txt").read_text() == "s\n"
    [live] = await completed_sessions(nc.jetstream(), Subjects(endpoint.settings.namespace), 1, timeout=60)
    assert live.outcome == "abandoned" and not is_complete(live) and live.exit_code is None
    assert live.name.startswith("bazel build")
