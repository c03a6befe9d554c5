"""The web service over a generated history, for the HTTP benchmarks (``bench_api``,
``bench_dashboard``): their common arguments, the stored history, embedded engines, and storage,
analyzer and web started as processes of their own."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import bench_scale
from benchmarks import scale_procs as procs
from benchmarks.scale_probes import NS, ROOT, service_env, start_storage, wait_analyzer
from buildtel.shared.engines import NatsEngine, RedisEngine


def scale_args(description: str, rounds: int) -> tuple[argparse.Namespace, Path]:
    """The benchmarks' flags and the directory of the stored history (generated when missing)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--targets", type=int, default=200)
    ap.add_argument("--reuse", metavar="DIR", help="the cached store (default .builder-cache/bench-scale/<N>x<T>)")
    ap.add_argument("--batch", type=int, default=2000, help="sessions per append while generating (default 2000)")
    ap.add_argument("--rounds", type=int, default=rounds, help=f"rounds of every request (default {rounds})")
    args = ap.parse_args()
    root = Path(args.reuse) if args.reuse else \
        ROOT / ".builder-cache" / "bench-scale" / f"{args.sessions}x{args.targets}"
    bench_scale.ensure_store(args, root)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    return args, root


def with_engines(prefix: str, measure: Callable[[Path, tuple[str, str]], Awaitable[Any]]) -> Any:
    """``measure(tmp, (nats_url, redis_url))`` on embedded NATS and Redis of a temporary directory."""
    with tempfile.TemporaryDirectory(prefix=prefix) as t:
        tmp = Path(t)
        with NatsEngine(tmp / "nats", namespace=NS) as ne, RedisEngine(tmp / "redis") as re_:
            return asyncio.run(measure(tmp, (ne.url_for("operator"), re_.url)))


async def _wait_web(url: str, proc: Any, limit_s: float = 60) -> None:
    t = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if proc.poll() is not None or time.perf_counter() - t > limit_s:
                raise SystemExit("web service did not start")
            await asyncio.sleep(0.05)


async def start_web(nc: Any, urls: tuple[str, str], root: Path, n: int, tmp: Path, running: list[Any]) -> str:
    """Storage over ``root``, an analyzer and the web service, each a process (appended to
    ``running`` as they start, for the caller to stop); the web service's base URL."""
    nats_url, redis_url = urls
    storage, _ = await start_storage(nc, service_env(nats_url, redis_url, root, n), tmp / "storage.log", 600)
    running.append(storage)
    analyzer = procs.spawn_service("buildtel.services.analyzer", service_env(nats_url, redis_url, tmp / "an", n),
                                   tmp / "analyzer.log")
    running.append(analyzer)
    await wait_analyzer(nc, analyzer)
    port = 20000 + random.randrange(20000)
    wenv = service_env(nats_url, redis_url, tmp / "web", n) | {"BUILDER_TELEMETRY_WEB_PORT": str(port)}
    web = procs.spawn_service("buildtel.services.web", wenv, tmp / "web.log")
    running.append(web)
    base = f"http://127.0.0.1:{port}"
    await _wait_web(base, web)
    return base


def stop_all(running: list[Any]) -> None:
    for p in reversed(running):
        procs.stop(p)
