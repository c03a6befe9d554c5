"""The dashboard's pages at farm scale (issue 16 point 8: <= 300 ms server time with 100,000 stored
sessions): each page asked by a real HTTP client, its server time read from ``Server-Timing``,
next to a storage request over NATS in the same run (the baseline).

    .venv/bin/python -m benchmarks.bench_dashboard [--sessions 100000] [--targets 200] [--reuse DIR] [--rounds 20]

The history is ``bench_scale``'s (generated once, cached in ``DIR``, default
``.builder-cache/bench-scale/<N>x<T>``); embedded NATS and Redis on free ports; storage, analyzer
and web as processes of their own.  Round-robin for ``--rounds`` rounds: ``/`` (30-day overview),
``/?days=90``, ``/sessions``, ``/sessions/<id>`` of a random stored build (200 targets: timeline and
table), ``/targets/<name>`` of a target every build runs (1,000 runs), ``/alerts``, and storage's
``summaries(limit=50)`` over NATS.  The last line is JSON: per page ``<page>_server_p95_ms`` and
``<page>_total_p95_ms`` (request to whole body), ``sessions_stored``, the baseline and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import nats

from benchmarks.bench_api import TARGET
from benchmarks.scale_probes import NS, pct
from benchmarks.web_stack import scale_args, start_web, stop_all, with_engines
from buildtel.services.storage.api import StorageClient
from buildtel.shared.subjects import Subjects


def _server_ms(header: str | None) -> float:
    """``app;dur=12.3`` -> 12.3 (the web service's own time for the answer)."""
    for part in (header or "").split(";"):
        if part.strip().startswith("dur="):
            return float(part.strip()[4:])
    raise SystemExit(f"no Server-Timing duration in {header!r}")


async def measure(args: argparse.Namespace, root: Path, n: int, tmp: Path, urls: tuple[str, str]) -> dict[str, Any]:
    nc = await nats.connect(urls[0])
    running: list[Any] = []
    try:
        base = await start_web(nc, urls, root, n, tmp, running)
        client = StorageClient(nc, Subjects(NS), timeout=60)
        stats = await client.stats()
        ids = [s.id for s in await client.summaries(limit=2000)]
        pages: dict[str, Callable[[int], str]] = {
            "overview": lambda i: "/", "overview_90d": lambda i: "/?days=90", "sessions": lambda i: "/sessions",
            "session": lambda i: f"/sessions/{ids[i % len(ids)]}",
            "target": lambda i: "/targets/" + quote(TARGET, safe=""), "alerts": lambda i: "/alerts"}
        server: dict[str, list[float]] = {k: [] for k in pages}
        total: dict[str, list[float]] = {k: [] for k in [*pages, "baseline_nats"]}
        async with aiohttp.ClientSession() as http:
            async def get(path: str) -> float:
                async with http.get(base + path) as r:
                    body = await r.read()
                    if r.status != 200:
                        raise SystemExit(f"GET {path}: {r.status} {body[:300]!r}")
                    return _server_ms(r.headers.get("Server-Timing"))

            baseline: Callable[[], Awaitable[Any]] = lambda: client.summaries(limit=50)  # noqa: E731
            for i in range(args.rounds):
                for name, path in pages.items():
                    t = time.perf_counter()
                    server[name].append(await get(path(i)))
                    total[name].append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                await baseline()
                total["baseline_nats"].append((time.perf_counter() - t) * 1e3)
        return {"server": server, "total": total, "sessions_stored": stats.sessions}
    finally:
        stop_all(running)
        await nc.close()


def main() -> None:
    args, root = scale_args(__doc__.splitlines()[0], rounds=20)
    n = args.sessions
    res = with_engines("bench-dash-", lambda tmp, urls: measure(args, root, n, tmp, urls))
    server, total = res["server"], res["total"]
    base = pct(total["baseline_nats"], .5)
    print(f"{res['sessions_stored']:,} sessions stored; {args.rounds} rounds; ms p50 / p95:")
    for name in server:
        print(f"  {name:<13} server {pct(server[name], .5):7.1f} / {pct(server[name], .95):7.1f}   "
              f"total {pct(total[name], .5):7.1f} / {pct(total[name], .95):7.1f}   "
              f"x{pct(total[name], .5) / max(base, 1e-9):.1f} the NATS baseline")
    print(f"  baseline: storage summaries(limit=50) over NATS {base:.1f} ms p50")
    out: dict[str, Any] = {"sessions_stored": res["sessions_stored"]}
    for name in server:
        out[f"{name}_server_p95_ms"] = round(pct(server[name], .95), 1)
        out[f"{name}_total_p95_ms"] = round(pct(total[name], .95), 1)
    out["baseline_nats_ms"] = round(base, 1)
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
