"""How CLI commands reach the stack: configured URLs, the local stack file, or a new local stack.

Resolution order: ``BUILDER_TELEMETRY_NATS_URL``/``_REDIS_URL`` (a farm's
cluster); else the stack that ``buildtel up`` on this machine wrote to
``<cache_dir>/stack.json``; else (for commands that need services, e.g.
``buildtel run``) a local stack is started in the background and left running
for the next command (stop it with ``buildtel down``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from services.cli.errors import CLIError
from shared.keys import Keys
from shared.settings import Settings
from shared.subjects import Subjects

STACK_FILE = "stack.json"
AUTOSTART_TIMEOUT_S = 30.0


class StackUnavailable(CLIError):
    pass


def stack_file(settings: Settings) -> Path:
    return settings.cache_dir / STACK_FILE


def _reachable(url: str) -> bool:
    u = urlparse(url.split(",")[0])
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 4222), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_stack(settings: Settings) -> dict[str, Any] | None:
    """The local stack's description, when it is running."""
    path = stack_file(settings)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _pid_alive(int(info.get("pid", 0))) or not _reachable(info.get("nats_url", "")):
        return None
    return info


def resolve_urls(settings: Settings, *, autostart: bool) -> tuple[str, str]:
    if settings.nats_url and settings.redis_url:
        return settings.nats_url, settings.redis_url
    info = read_stack(settings)
    if info is None and autostart:
        info = start_background_stack(settings)
    if info is None:
        raise StackUnavailable(
            "no Builder Telemetry stack is running: start one with 'buildtel up' or set BUILDER_TELEMETRY_NATS_URL"
        )
    return settings.nats_url or info["nats_url"], settings.redis_url or info["redis_url"]


def start_background_stack(settings: Settings) -> dict[str, Any]:
    """Start ``buildtel up`` detached (it outlives this command) and wait until it is ready."""
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    log = open(settings.cache_dir / "stack.log", "ab")  # noqa: SIM115 - handed to the child
    env = dict(os.environ)
    env["BUILDER_TELEMETRY_CACHE_DIR"] = str(settings.cache_dir)
    env["BUILDER_TELEMETRY_NAMESPACE"] = settings.namespace
    subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=env,
    )
    log.close()
    deadline = time.monotonic() + AUTOSTART_TIMEOUT_S
    while time.monotonic() < deadline:
        info = read_stack(settings)
        if info is not None:
            return info
        time.sleep(0.1)
    raise StackUnavailable(f"the local stack did not start within {AUTOSTART_TIMEOUT_S:.0f}s; see {settings.cache_dir / 'stack.log'}")


@dataclass
class Bus:
    settings: Settings
    nats_url: str
    redis_url: str
    nc: Any
    js: Any
    redis: Any
    subjects: Subjects
    keys: Keys


@contextlib.asynccontextmanager
async def open_bus(settings: Settings, *, autostart: bool = False, name: str = "buildtel-cli") -> AsyncIterator[Bus]:
    from shared.bus import close_nats, connect_nats, connect_redis  # nats + redis: imported when used

    nats_url, redis_url = resolve_urls(settings, autostart=autostart)
    nc = await connect_nats(settings, nats_url, name=name, max_reconnect_attempts=3)
    r = connect_redis(redis_url)
    try:
        yield Bus(settings, nats_url, redis_url, nc, nc.jetstream(), r,
                  Subjects(settings.namespace), Keys(settings.namespace))
    finally:
        await close_nats(nc)
        await r.aclose()
