"""The HTTP API at farm scale (issue 15 point 7): the web service over a stored history, asked by a
real HTTP client, next to the same data asked of storage over NATS in the same run.

    .venv/bin/python -m benchmarks.bench_api [--sessions 100000] [--targets 200] [--reuse DIR] [--rounds 50]

The history is ``bench_scale``'s (``benchmarks/scale_gen.py``: generated once, cached in
``DIR``, default ``.builder-cache/bench-scale/<N>x<T>``).  Embedded NATS and Redis start on free
ports; storage, analyzer, tracer and web run as processes of their own.  Then, round-robin for
``--rounds`` rounds (a busy neighbour slows every kind alike), each timed from request to the
whole body read:

* ``list``: ``GET /api/v1/sessions?limit=50`` vs storage's ``summaries(limit=50)`` over NATS;
* ``session``: ``GET /api/v1/sessions/<id>`` of a random stored id vs storage's ``get``;
* ``trend``: ``GET /api/v1/trends`` over the 30 days before the newest build vs storage's ``trend``;
* ``target_history``: ``GET /api/v1/targets/history?limit=10000`` of a target every build runs vs
  storage's ``target_history`` (10,000 runs, paged as the web service pages).

The last line is JSON: ``list_p95_ms``, ``session_p95_ms``, ``trend_ms`` (p50), ``target_history_ms``
(p50), ``sessions_stored``, their NATS baselines and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats

from benchmarks.scale_probes import NS, pct
from benchmarks.web_stack import scale_args, start_web, stop_all, with_engines
from buildtel.services.storage import history
from buildtel.services.storage.api import StorageClient
from buildtel.shared.subjects import Subjects

DAY = 86_400.0
TARGET = "//src/pkg0/mod0:target_0"  # scale_gen's first target: every build runs it


async def measure(args: argparse.Namespace, root: Path, n: int, tmp: Path, urls: tuple[str, str]) -> dict[str, Any]:
    nc = await nats.connect(urls[0])
    running: list[Any] = []
    try:
        base = await start_web(nc, urls, root, n, tmp, running)
        subjects = Subjects(NS)
        client = StorageClient(nc, subjects, timeout=60)
        stats = await client.stats()
        summaries = await client.summaries(limit=2000)
        ids = [s.id for s in summaries]
        until = (stats.newest or time.time()) + 1
        since = until - 30 * DAY
        trend_q = {"since": str(since), "until": str(until)}
        hist_req = history.TargetHistoryRequest(target=TARGET, limit=history.MAX_RUNS)
        async with aiohttp.ClientSession() as http:
            async def get(path: str, **params: str) -> Any:
                async with http.get(base + path, params=params) as r:
                    body = await r.read()
                    if r.status != 200:
                        raise SystemExit(f"GET {path}: {r.status} {body[:300]!r}")
                    return body

            kinds: dict[str, Callable[[int], Awaitable[Any]]] = {
                "list_http": lambda i: get("/api/v1/sessions", limit="50"),
                "list_nats": lambda i: client.summaries(limit=50),
                "session_http": lambda i: get(f"/api/v1/sessions/{ids[i % len(ids)]}"),
                "session_nats": lambda i: client.get(ids[i % len(ids)]),
                "trend_http": lambda i: get("/api/v1/trends", **trend_q),
                "trend_nats": lambda i: history.trend(nc, subjects, history.TrendRequest(since=since, until=until),
                                                      timeout=60),
                "target_history_http": lambda i: get("/api/v1/targets/history", target=TARGET, limit="10000"),
                "target_history_nats": lambda i: history.target_history(nc, subjects, hist_req, timeout=60),
            }
            out: dict[str, list[float]] = {k: [] for k in kinds}
            for i in range(args.rounds):
                for name, call in kinds.items():
                    t = time.perf_counter()
                    await call(i)
                    out[name].append((time.perf_counter() - t) * 1e3)
        runs = len((await history.target_history(nc, subjects, hist_req, timeout=60)).runs)
        return {"ms": out, "sessions_stored": stats.sessions, "runs": runs}
    finally:
        stop_all(running)
        await nc.close()


def main() -> None:
    args, root = scale_args(__doc__.splitlines()[0], rounds=50)
    n = args.sessions
    res = with_engines("bench-api-", lambda tmp, urls: measure(args, root, n, tmp, urls))
    ms = res["ms"]
    print(f"{res['sessions_stored']:,} sessions stored; {args.rounds} rounds; ms p50 / p95 (HTTP vs NATS):")
    for kind in ("list", "session", "trend", "target_history"):
        h, b = ms[f"{kind}_http"], ms[f"{kind}_nats"]
        print(f"  {kind:<15} HTTP {pct(h, .5):8.1f} / {pct(h, .95):8.1f}   NATS {pct(b, .5):8.1f} / {pct(b, .95):8.1f}"
              f"   HTTP/NATS p50 x{pct(h, .5) / max(pct(b, .5), 1e-9):.2f}")
    print(f"  (target history: {res['runs']:,} runs of {TARGET})")
    print(json.dumps({
        "sessions_stored": res["sessions_stored"], "list_p95_ms": round(pct(ms["list_http"], .95), 1),
        "session_p95_ms": round(pct(ms["session_http"], .95), 1), "trend_ms": round(pct(ms["trend_http"], .5), 1),
        "target_history_ms": round(pct(ms["target_history_http"], .5), 1),
        "baseline_nats_ms": {k: round(pct(ms[f"{k}_nats"], .5), 1) for k in ("list", "session", "trend",
                                                                            "target_history")},
        "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
