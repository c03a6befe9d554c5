"""``buildtel up | down | serve``: run the stack on this machine, or one service of a farm.

``up`` with no ``BUILDER_TELEMETRY_NATS_URL``/``_REDIS_URL`` starts the embedded
nats-server and redis-server (data under ``<cache_dir>/engines``) on free
loopback ports, then every service in this one process, and writes
``<cache_dir>/stack.json`` so other commands on this machine find it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

from services import registry
from services.cli.common import read_stack, stack_file
from services.cli.main import CLIError
from shared.engines import NatsEngine, RedisEngine
from shared.runner import run_until_signal
from shared.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = sub.add_parser("up", help="run all services in one process (embedded NATS and Redis unless configured)")
    up.add_argument("--quiet", action="store_true", help="do not print where the stack listens")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the stack 'buildtel up' started on this machine")
    down.set_defaults(func=cmd_down)
    serve = sub.add_parser("serve", help="run one service against the configured NATS and Redis")
    serve.add_argument("service", choices=sorted(registry.SERVICES), help="which service")
    from services.tracer.service import add_serve_arguments

    add_serve_arguments(serve.add_argument_group("tracer options (serve tracer)"))  # type: ignore[arg-type]
    serve.set_defaults(func=cmd_serve)


class LocalStack:
    """Engines (when not configured) plus services, started and stopped as one unit."""

    def __init__(self, settings: Settings, services: list[str] | None = None) -> None:
        self.settings = settings
        self.names = services or list(registry.SERVICES)
        self.engines: list[Any] = []
        self.services: list[Any] = []
        self.nats_url = settings.nats_url or ""
        self.redis_url = settings.redis_url or ""

    def start_engines(self) -> None:
        if not self.nats_url:
            eng = NatsEngine(self.settings.engines_dir / "nats").start()
            self.engines.append(eng)
            self.nats_url = eng.url
        if not self.redis_url:
            eng = RedisEngine(self.settings.engines_dir / "redis").start()
            self.engines.append(eng)
            self.redis_url = eng.url

    def create_services(self) -> list[Any]:
        self.services = [registry.create(n, self.settings, self.nats_url, self.redis_url) for n in self.names]
        return self.services

    async def __aenter__(self) -> LocalStack:
        await asyncio.to_thread(self.start_engines)
        started = []
        try:
            for svc in self.create_services():
                await svc.start()
                started.append(svc)
        except BaseException:
            for svc in reversed(started):
                with contextlib.suppress(Exception):
                    await svc.stop()
            self.stop_engines()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for svc in reversed(self.services):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(svc.stop(), 10)
        self.stop_engines()

    def stop_engines(self) -> None:
        for eng in reversed(self.engines):
            eng.stop()
        self.engines.clear()


async def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    if read_stack(settings) is not None:
        raise CLIError(f"a stack is already running for {settings.cache_dir} (see {stack_file(settings)}); "
                       "stop it with 'buildtel down'")
    stack = LocalStack(settings)
    await asyncio.to_thread(stack.start_engines)
    services = stack.create_services()
    path = stack_file(settings)
    info = {"pid": os.getpid(), "nats_url": stack.nats_url, "redis_url": stack.redis_url,
            "namespace": settings.namespace, "services": stack.names, "started": time.time(),
            "embedded": [e.name for e in stack.engines]}
    def announce() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2))
        if not args.quiet:
            where = "embedded" if stack.engines else "configured"
            print(f"buildtel: stack up ({where}) — NATS {stack.nats_url}, Redis {stack.redis_url}; "
                  f"services: {', '.join(stack.names)}; data in {settings.cache_dir}", file=sys.stderr, flush=True)

    try:
        await run_until_signal(services, on_started=announce)
    finally:
        with contextlib.suppress(OSError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        stack.stop_engines()
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    info = read_stack(settings)
    if info is None:
        print("buildtel: no stack is running", file=sys.stderr)
        return 0
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not _running(pid):
            print(f"buildtel: stack (pid {pid}) stopped", file=sys.stderr)
            return 0
        time.sleep(0.1)
    raise CLIError(f"stack pid {pid} did not stop within 20 s")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child its parent has not reaped yet counts as stopped)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    nats_url, redis_url = settings.nats_url, settings.redis_url
    if not (nats_url and redis_url):
        info = read_stack(settings)
        if info is None:
            raise CLIError("serve needs BUILDER_TELEMETRY_NATS_URL and BUILDER_TELEMETRY_REDIS_URL "
                           "(or a local stack from 'buildtel up')")
        nats_url, redis_url = nats_url or info["nats_url"], redis_url or info["redis_url"]
    if args.service == "tracer":
        from services.tracer.service import service_from_args

        svc = service_from_args(args, settings, nats_url, redis_url)
    else:
        svc = registry.create(args.service, settings, nats_url, redis_url)
    print(f"buildtel: serving {args.service} on {nats_url}", file=sys.stderr, flush=True)
    await run_until_signal([svc])
    return 0
