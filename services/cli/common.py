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
from shared.auth import StackAuth
from shared.files import open_private, private_dir
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
    s = resolve(settings, autostart=autostart)
    return s.nats_url or "", s.redis_url or ""


def resolve(settings: Settings, *, autostart: bool, need_redis: bool = True) -> Settings:
    """``settings`` completed with where the stack is and, for a local stack, its role credentials
    (``stack.json``, mode 0600).  Configured URLs keep their own credentials.  Commands that only
    talk to NATS (``run``, queries) pass ``need_redis=False``: a configured NATS URL is then enough,
    and no local stack is looked for or started."""
    if settings.nats_url and (settings.redis_url or not need_redis):
        return settings
    info = read_stack(settings)
    if info is None and autostart:
        info = start_background_stack(settings)
    if info is None:
        raise StackUnavailable(
            "no Builder Telemetry stack is running: start one with 'buildtel up' or set BUILDER_TELEMETRY_NATS_URL"
        )
    auth = settings.stack_auth
    if auth is None and not settings.nats_url and info.get("auth"):
        auth = StackAuth.from_json(info["auth"])
    return settings.with_(nats_url=settings.nats_url or info["nats_url"],
                          redis_url=settings.redis_url or info["redis_url"], stack_auth=auth)


def stack_auth_of(settings: Settings) -> StackAuth | None:
    """The local stack's credentials when the NATS URL comes from it (for the SDK's resolver)."""
    if settings.nats_url:
        return settings.stack_auth
    info = read_stack(settings)
    return StackAuth.from_json(info["auth"]) if info and info.get("auth") else None


def start_background_stack(settings: Settings) -> dict[str, Any]:
    """Start ``buildtel up`` detached (it outlives this command) and wait until it is ready."""
    private_dir(settings.cache_dir)
    log = open_private(settings.cache_dir / "stack.log", "ab")  # handed to the child
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
async def open_bus(settings: Settings, *, autostart: bool = False, name: str = "buildtel-cli",
                   role: str = "reader") -> AsyncIterator[Bus]:
    """A connection to the stack as ``role``: ``reader`` (queries) unless the command writes."""
    from shared.bus import close_nats, connect_nats, connect_redis  # nats + redis: imported when used

    settings = resolve(settings, autostart=autostart, need_redis=False)
    nats_url, redis_url = settings.nats_url or "", settings.redis_url or ""
    nc = await connect_nats(settings, nats_url, name=name, role=role, max_reconnect_attempts=3)
    r = connect_redis(redis_url) if redis_url else None  # CLI commands ask services, not Redis
    try:
        yield Bus(settings, nats_url, redis_url, nc, nc.jetstream(), r,
                  Subjects(settings.namespace), Keys(settings.namespace))
    finally:
        await close_nats(nc)
        if r is not None:
            await r.aclose()
