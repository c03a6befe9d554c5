"""Alert latency: from an agent publishing BuildFinished to a farm receiving the alert, at 50 sessions/s.

Fresh embedded NATS and Redis; one collector and ``--replicas`` analyzers run as
their own processes (``python -m buildtel.services.collector`` / ``python -m buildtel.services.analyzer``),
as in production.  This process is the farm: it publishes each build's events (one
batch per build, BuildFinished last, ``expected_events`` set so the collector can
complete it at once) on a fixed 50/s schedule, and subscribes to ``<ns>.alerts.>``.

Every branch's builds get 40 % slower at a staggered build number (its targets 40 %,
one of them 2x), so alerts (one per branch and per target) keep arriving throughout the run.  An alert's latency is
(time received) - (time the batch with BuildFinished of ``alert.detected_session_id``,
the build whose arrival confirmed the change, was published).  The session's
completion on ``<ns>.sessions.completed`` is also timed, splitting the figure into
collector and analyzer shares.

    python -m benchmarks.bench_alert_latency [--rate 50] [--branches 40] [--builds 40] [--replicas 1]
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

import nats

from buildtel.services.analyzer.alerts import alert_decoder
from buildtel.services.analyzer.api import AnalyzerClient, alerts_stream_config
from buildtel.services.analyzer.subjects import AnalyzerSubjects
from buildtel.shared.bus import ensure_streams
from buildtel.shared.codec import encode
from buildtel.shared.engines import NatsEngine, RedisEngine
from buildtel.shared.protocol import (
    BuildEnvironment,
    BuildFinished,
    BuildStarted,
    EventBatch,
    TargetFinished,
    TargetStarted,
    VcsInfo,
    new_session_id,
)
from buildtel.shared.subjects import Subjects

NS = "benchlat"
TARGETS = 4


def build_batch(sid: str, branch: str, k: int, slow: bool, rng: random.Random) -> bytes:
    """One build's events in one batch: 4 chained targets; 'slow' = after this branch's step."""
    agent = f"agent-{branch}"
    now = time.time()
    durs = [d * rng.gauss(1.0, 0.01) for d in (3.0, 2.0, 1.0, 1.5)]
    if slow:
        durs = [d * 1.4 for d in durs]
        durs[1] *= 2.0 / 1.4  # the second target gets 2x slower, the others 40 %
    t0 = now - sum(durs) - 0.5
    evs: list = [BuildStarted(session_id=sid, agent_id=agent, seq=0, ts=t0, name=f"{branch} #{k}",
                              environment=BuildEnvironment(vcs=VcsInfo(commit=f"{k:040x}", branch=branch)))]
    t = t0 + 0.1
    for i, d in enumerate(durs):
        name = f"//{branch}:t{i}"
        evs.append(TargetStarted(session_id=sid, agent_id=agent, seq=len(evs), ts=t, target=name, worker="w0"))
        evs.append(TargetFinished(session_id=sid, agent_id=agent, seq=len(evs), ts=t + d, target=name, start=t,
                                  duration_s=d, cache="miss", worker="w0", deps=[f"//{branch}:t{i - 1}"] if i else []))
        t += d + 0.01
    evs.append(BuildFinished(session_id=sid, agent_id=agent, seq=len(evs), ts=t + 0.1, exit_code=0,
                             expected_events={agent: len(evs) + 1}))
    return encode(EventBatch(session_id=sid, agent_id=agent, events=evs))


def spawn(module: str, nats_url: str, redis_url: str, cache: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(BUILDER_TELEMETRY_NATS_URL=nats_url, BUILDER_TELEMETRY_REDIS_URL=redis_url,
               BUILDER_TELEMETRY_NAMESPACE=NS, BUILDER_TELEMETRY_CACHE_DIR=str(cache),
               BUILDER_TELEMETRY_FINISH_GRACE_S="0.5", BUILDER_TELEMETRY_LOG_LEVEL="warning",
               BUILDER_TELEMETRY_LOG_FORMAT="json")
    return subprocess.Popen([sys.executable, "-m", module], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


async def run(args: argparse.Namespace, nats_url: str, redis_url: str, cache: Path) -> dict[str, object]:
    subjects, asubj = Subjects(NS), AnalyzerSubjects.of(NS)
    nc = await nats.connect(nats_url.split(","))  # a cluster's URLs (benchmarks/bench_cluster.py)
    js = nc.jetstream()
    await ensure_streams(js, subjects, extra=[alerts_stream_config(asubj)])
    procs = [spawn("buildtel.services.collector", nats_url, redis_url, cache)]
    procs += [spawn("buildtel.services.analyzer", nats_url, redis_url, cache) for _ in range(args.replicas)]
    published: dict[str, float] = {}
    completed: dict[str, float] = {}
    latencies: list[float] = []
    analyzer_share: list[float] = []
    alerts: list[str] = []
    done = asyncio.Event()
    expected = (TARGETS + 1) * args.branches  # per branch: the build and each of its targets step once

    async def on_session(msg) -> None:
        completed[msg.headers.get("Nats-Msg-Id", "") if msg.headers else ""] = time.perf_counter()

    async def on_alert(msg) -> None:
        now = time.perf_counter()
        a = alert_decoder.decode(msg.data)
        alerts.append(a.series)
        t_pub = published.get(a.detected_session_id)
        if t_pub is not None:
            latencies.append(now - t_pub)
            t_done = completed.get(a.detected_session_id)
            if t_done is not None:
                analyzer_share.append(now - t_done)
        if len(alerts) >= expected:
            done.set()

    subs = [await nc.subscribe(subjects.sessions_completed, cb=on_session),
            await nc.subscribe(asubj.alerts_all, cb=on_alert)]
    try:
        client = AnalyzerClient(nc, NS, timeout=2, attempts=30)
        await client.stats()  # the analyzers are up
        await asyncio.sleep(1.0)
        rng = random.Random(1)
        plan = []
        for k in range(args.builds):
            for b in range(args.branches):
                step = args.builds // 2 + (b % 10) - 5
                plan.append((f"br{b:03d}", k, k >= step))
        t0 = time.perf_counter()
        for i, (branch, k, slow) in enumerate(plan):
            due = t0 + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sid = new_session_id()
            data = build_batch(sid, branch, k, slow, rng)
            published[sid] = time.perf_counter()
            await js.publish(subjects.events(sid), data, headers={"Nats-Msg-Id": f"{sid}:0"})
        publish_s = time.perf_counter() - t0
        try:
            await asyncio.wait_for(done.wait(), 20.0)
        except TimeoutError:
            pass
        await asyncio.sleep(1.0)
        stats = await client.stats()
    finally:
        for s in subs:
            await s.unsubscribe()
        await nc.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    collector_share = [v for sid, v in ((s, completed[s] - published[s]) for s in published if s in completed)]
    return {"sessions": len(plan), "rate": len(plan) / publish_s, "alerts": len(alerts), "expected": expected,
            "duplicates": len(alerts) - len(set(alerts)), "latencies": latencies, "analyzer": analyzer_share,
            "collector": collector_share, "analyzer_sessions": stats.sessions, "late": stats.late}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=50.0, help="sessions per second (default 50)")
    ap.add_argument("--branches", type=int, default=40)
    ap.add_argument("--builds", type=int, default=40, help="builds per branch (default 40)")
    ap.add_argument("--replicas", type=int, default=1, help="analyzer processes (default 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-alert-") as tmp:
        n = NatsEngine(Path(tmp) / "nats").start()
        r = RedisEngine(Path(tmp) / "redis").start()
        try:
            res = asyncio.run(run(args, n.url_for("operator"), r.url, Path(tmp) / "cache"))
        finally:
            n.stop()
            r.stop()
    lat = [x * 1000 for x in res["latencies"]]  # type: ignore[union-attr]
    col = [x * 1000 for x in res["collector"]]  # type: ignore[union-attr]
    ana = [x * 1000 for x in res["analyzer"]]  # type: ignore[union-attr]
    print(f"{res['sessions']} sessions at {res['rate']:.1f}/s, {args.replicas} analyzer(s), 1 collector; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"alerts received {res['alerts']} (expected {res['expected']}), duplicates {res['duplicates']}, "
          f"sessions analysed {res['analyzer_sessions']}, late points {res['late']}")
    if lat:
        print(f"BuildFinished -> alert: p50 {pct(lat, 0.5):.1f} ms, p90 {pct(lat, 0.9):.1f} ms, "
              f"p99 {pct(lat, 0.99):.1f} ms, max {max(lat):.1f} ms over {len(lat)} alerts")
    if col and ana:
        print(f"  collector (BuildFinished -> session completed): p50 {pct(col, 0.5):.1f} ms, "
              f"p99 {pct(col, 0.99):.1f} ms over {len(col)} sessions")
        print(f"  analyzer (session completed -> alert): p50 {pct(ana, 0.5):.1f} ms, p99 {pct(ana, 0.99):.1f} ms")
    p99 = pct(lat, 0.99) if lat else None
    print(f"target: alert_p99_ms <= 250: {'PASS' if p99 is not None and p99 <= 250 else 'FAIL'}")
    print(json.dumps({
        "alert_p50_ms": round(pct(lat, 0.5), 1) if lat else None, "alert_p99_ms": round(p99, 1) if p99 else None,
        "alert_max_ms": round(max(lat), 1) if lat else None,
        "alerts": res["alerts"], "expected_alerts": res["expected"],
        "duplicates": res["duplicates"], "rate": round(float(res["rate"]), 1),  # type: ignore[arg-type]
        "collector_p99_ms": round(pct(col, 0.99), 1) if col else None,
        "analyzer_p99_ms": round(pct(ana, 0.99), 1) if ana else None,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
