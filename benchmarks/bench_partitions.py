"""Partitioned storage: ingest rate and query p95 with P = 1 vs P = 3 storage partitions, same run.

Fresh embedded NATS and Redis; for each P a fresh namespace and data directory, P storage
processes (``python -m buildtel.services.storage [--partition k]``, as in production), then:

* ingest: ``--sessions`` completed sessions (``--targets`` targets each) published as the collector
  does (the id in the subject when P > 1), timed from the first publish until ``stats`` counts
  them all (sessions/s);
* queries through the one storage subject (P > 1: any partition answers, asking all and merging):
  ``list`` = summaries of the newest 50, ``get`` = one session by id, ``filter`` = the newest 50
  failed sessions of one branch (summaries); ``--queries`` each, p50/p95 in ms.

Prints each figure, the P = 3 / P = 1 ratios, and one JSON line.  On one machine the partitions
share its cores: the figure says what the fan-out costs a query and what parallel stores give
ingest here, not what P machines would.

    python -m benchmarks.bench_partitions [--sessions 3000] [--targets 20] [--queries 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.shared.bus import connect_nats, ensure_streams
from buildtel.shared.codec import encode
from buildtel.shared.engines import NatsEngine, RedisEngine
from buildtel.shared.files import write_private
from buildtel.shared.partitions import publish_subject
from buildtel.shared.protocol import BuildEnvironment as Env
from buildtel.shared.protocol import BuildSession, SessionTotals, TargetMetrics, VcsInfo, new_session_id
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects


def session(i: int, targets: int, rng: random.Random, now: float) -> BuildSession:
    finish = now - 100_000 + i * 10 + rng.random()
    tms = [TargetMetrics(name=f"//pkg{j % 40}:t{j}", start=finish - 30, end=finish - 29, duration_s=1.0,
                         status="success", cache="miss" if j % 3 else "local_hit", worker=f"w{j % 8}")
           for j in range(targets)]
    failed = rng.random() < 0.1
    return BuildSession(id=new_session_id(), name=f"build {i}", start=finish - 30, finish=finish, duration_s=30,
                        outcome="failed" if failed else "success", exit_code=1 if failed else 0,
                        environment=Env(os="linux", hostname=f"h{i % 7}",
                                        vcs=VcsInfo(branch=f"branch-{i % 5}", commit=f"{i:040x}")),
                        agents=[f"agent-{i % 9}"], targets=tms, totals=SessionTotals(targets=targets))


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000.0


async def one_p(p: int, nats_eng: NatsEngine, redis_url: str, creds: Path, payloads: list[tuple[str, bytes]],
                queries: int, root: Path) -> dict[str, Any]:
    ns = f"benchpart{p}"
    cache = root / f"p{p}"
    env = {**os.environ, "BUILDER_TELEMETRY_NATS_URL": nats_eng.url, "BUILDER_TELEMETRY_REDIS_URL": redis_url,
           "BUILDER_TELEMETRY_NAMESPACE": ns, "BUILDER_TELEMETRY_CACHE_DIR": str(cache),
           "BUILDER_TELEMETRY_STACK_CREDENTIALS": str(creds), "BUILDER_TELEMETRY_STORAGE_PARTITIONS": str(p),
           "BUILDER_TELEMETRY_MAX_SESSIONS": "1000000", "BUILDER_TELEMETRY_LOG_LEVEL": "warning"}
    settings = Settings(namespace=ns, cache_dir=cache, stack_auth=nats_eng.auth, storage_partitions=p)
    nc = await connect_nats(settings, nats_eng.url, name="bench", role="operator")
    subjects = Subjects(ns)
    js = nc.jetstream()
    await ensure_streams(js, subjects, partitions=p)
    procs = []
    for k in range(p):
        cmd = [sys.executable, "-m", "buildtel.services.storage"] + (["--partition", str(k)] if p > 1 else [])
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    client = StorageClient(nc, subjects, timeout=20.0)
    try:
        while True:
            try:
                st = await client.stats()
                if not st.partial:
                    break
            except StorageError:
                pass
            await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        acks = [js.publish(publish_subject(subjects, sid, p), data, headers={"Nats-Msg-Id": sid})
                for sid, data in payloads]
        for i in range(0, len(acks), 200):
            await asyncio.gather(*acks[i:i + 200])
        while (await client.stats()).sessions < len(payloads):
            await asyncio.sleep(0.05)
        ingest = len(payloads) / (time.perf_counter() - t0)
        rng = random.Random(7)
        lat: dict[str, list[float]] = {"list": [], "get": [], "filter": []}
        for _ in range(queries):
            t = time.perf_counter()
            assert len(await client.summaries(limit=50)) == 50
            lat["list"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await client.get(rng.choice(payloads)[0])
            lat["get"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await client.summaries(outcome="failed", branch="branch-3", limit=50)
            lat["filter"].append(time.perf_counter() - t)
        out: dict[str, Any] = {"ingest_per_s": round(ingest, 1)}
        for k, xs in lat.items():
            out[f"{k}_p50_ms"] = round(pct(xs, 0.5), 2)
            out[f"{k}_p95_ms"] = round(pct(xs, 0.95), 2)
        return out
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        await nc.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=3000)
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(1)
    now = time.time()
    payloads = [(s.id, encode(s)) for s in (session(i, args.targets, rng, now) for i in range(args.sessions))]
    with tempfile.TemporaryDirectory(prefix="bench-partitions-") as tmp:
        root = Path(tmp)
        nats_eng = NatsEngine(root / "nats", namespace=["benchpart1", "benchpart3"]).start()
        redis_eng = RedisEngine(root / "redis", auth=nats_eng.auth).start()
        creds = root / "stack.creds"
        write_private(creds, json.dumps(nats_eng.auth.to_json()))
        try:
            res = {p: await one_p(p, nats_eng, redis_eng.url, creds, payloads, args.queries, root) for p in (1, 3)}
        finally:
            redis_eng.stop()
            nats_eng.stop()
    for p, r in res.items():
        print(f"P={p}: ingest {r['ingest_per_s']:.0f} sessions/s; p95 list {r['list_p95_ms']:.1f} ms, "
              f"get {r['get_p95_ms']:.1f} ms, filter {r['filter_p95_ms']:.1f} ms")
    ratios = {k: round(res[3][k] / res[1][k], 2) for k in res[1] if res[1][k]}
    print("P=3 / P=1: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(json.dumps({"bench": "partitions", "sessions": args.sessions, "targets": args.targets,
                      "queries": args.queries, "p1": res[1], "p3": res[3], "ratio_p3_over_p1": ratios}))


if __name__ == "__main__":
    asyncio.run(main())
