"""NATS cluster figures: ingest throughput and alert latency with 3 JetStream nodes (R3) vs 1,
in the same run, and recovery time after a node is SIGKILLed.

For each topology (one embedded nats-server, then a 3-node embedded cluster with every stream
and durable consumer at 3 replicas), each with an embedded Redis of its own:

* **ingest**: ``--sessions`` builds (one event batch each, complete: ``expected_events`` set),
  published with ``--window`` publishes awaiting their JetStream acks at a time, through one
  collector process; the figures are acked batches/s and sessions completed/s (until the
  collector has published every session on ``<ns>.sessions.completed``);
* **alert latency**: ``benchmarks/bench_alert_latency``'s run (BuildFinished published ->
  alert received, collector + analyzer processes) at ``--rate`` sessions/s;
* **recovery** (cluster only): a publisher keeps publishing; the events stream's leader is
  SIGKILLed; "publishes succeed again" is the time from the kill to the first acked publish
  issued after it; then the node is restarted and "node current" is the time until its copy of
  the events stream is current again (stream info).

Ratios are 3 nodes / 1 node.  Ends with one JSON line.

    python -m benchmarks.bench_cluster [--sessions 2000] [--window 64] [--rate 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

from benchmarks import bench_alert_latency as lat
from buildtel.services.analyzer.api import alerts_stream_config
from buildtel.services.analyzer.subjects import AnalyzerSubjects
from buildtel.shared.bus import ensure_streams
from buildtel.shared.engines import NatsEngine, RedisEngine
from buildtel.shared.natscluster import NatsCluster
from buildtel.shared.protocol import new_session_id
from buildtel.shared.subjects import Subjects

NS = lat.NS  # the alert run's namespace: each topology has engines of its own


async def declare(url: str, replicas: int) -> None:
    nc = await nats.connect(url.split(","))
    try:
        await ensure_streams(nc.jetstream(), Subjects(NS), extra=[alerts_stream_config(AnalyzerSubjects.of(NS))],
                             replicas=replicas)
    finally:
        await nc.close()


async def ingest(url: str, redis_url: str, cache: Path, sessions: int, window: int) -> dict[str, float]:
    subjects = Subjects(NS)
    proc = lat.spawn("buildtel.services.collector", url, redis_url, cache)
    nc = await nats.connect(url.split(","))
    js = nc.jetstream()
    completed: set[str] = set()
    all_done = asyncio.Event()

    async def on_session(msg: Any) -> None:
        completed.add(msg.headers.get("Nats-Msg-Id", "") if msg.headers else "")
        if len(completed) >= sessions:
            all_done.set()

    sub = await nc.subscribe(subjects.sessions_completed, cb=on_session)
    try:
        await asyncio.sleep(2.0)  # the collector connected and consuming
        rng = random.Random(2)
        batches = [(sid := new_session_id(), lat.build_batch(sid, f"br{i % 40:03d}", i, False, rng))
                   for i in range(sessions)]
        sem = asyncio.Semaphore(window)

        async def pub(sid: str, data: bytes) -> None:
            async with sem:
                await js.publish(subjects.events(sid), data, headers={"Nats-Msg-Id": f"{sid}:0"}, timeout=30)

        t0 = time.perf_counter()
        await asyncio.gather(*(pub(sid, d) for sid, d in batches))
        acked_s = time.perf_counter() - t0
        try:
            await asyncio.wait_for(all_done.wait(), 300)
        except TimeoutError:
            pass
        done_s = time.perf_counter() - t0
    finally:
        await sub.unsubscribe()
        await nc.close()
        proc.terminate()
        proc.wait(10)
    return {"acked_per_s": sessions / acked_s, "completed_per_s": len(completed) / done_s,
            "completed": float(len(completed))}


async def alerts(url: str, redis_url: str, cache: Path, rate: float) -> dict[str, float]:
    args = argparse.Namespace(rate=rate, branches=20, builds=20, replicas=1)
    res = await lat.run(args, url, redis_url, cache)
    ms = [x * 1000 for x in res["latencies"]]
    return {"alert_p50_ms": lat.pct(ms, 0.5), "alert_p99_ms": lat.pct(ms, 0.99), "alerts": float(res["alerts"]),
            "expected_alerts": float(res["expected"]), "duplicates": float(res["duplicates"])}


async def recovery(cluster: NatsCluster) -> dict[str, float]:
    subjects = Subjects(NS)
    url = cluster.url_for("operator")
    nc = await nats.connect(url.split(","), reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    js = nc.jetstream()
    try:
        leader = (await js.stream_info(subjects.events_stream)).cluster.leader  # type: ignore[union-attr]
        rng = random.Random(3)
        for i in range(50):  # warm: the publisher is publishing
            sid = new_session_id()
            await js.publish(subjects.events(sid), lat.build_batch(sid, "rec", i, False, rng), timeout=5)
        t_kill = time.perf_counter()
        node = cluster.kill(leader or "")
        while True:
            sid = new_session_id()
            try:
                await js.publish(subjects.events(sid), lat.build_batch(sid, "rec", 0, False, rng), timeout=1)
                break
            except Exception:  # noqa: BLE001 - no leader yet / reconnecting: try again
                await asyncio.sleep(0.01)
        publish_ok_s = time.perf_counter() - t_kill
        t_restart = time.perf_counter()
        await asyncio.to_thread(cluster.restart, node.server_name)
        while True:
            try:
                info = await js.stream_info(subjects.events_stream)
                peers = {p.name: p for p in (info.cluster.replicas or [])} if info.cluster else {}
                p = peers.get(node.server_name)
                if p is not None and p.current and not p.offline:
                    break
            except Exception:  # noqa: BLE001 - during the restart
                pass
            await asyncio.sleep(0.05)
        current_s = time.perf_counter() - t_restart
    finally:
        await nc.close()
    return {"publish_ok_after_kill_s": publish_ok_s, "node_current_after_restart_s": current_s}


def topology(nodes: int, tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    os.environ["BUILDER_TELEMETRY_REPLICAS"] = str(nodes)  # the spawned services declare with it
    out: dict[str, float] = {}
    # A Redis of its own: the analyzer's alert state of the other topology's run (same namespace)
    # would make this run's changes old news.
    redis = RedisEngine(tmp / f"redis-{nodes}").start()
    redis_url = redis.url
    if nodes == 1:
        eng: Any = NatsEngine(tmp / f"nats-{nodes}").start()
    else:
        eng = NatsCluster(tmp / f"nats-{nodes}", nodes).start()
    try:
        url = eng.url_for("operator")
        asyncio.run(declare(url, nodes))
        out.update(asyncio.run(alerts(url, redis_url, tmp / f"cache-a{nodes}", args.rate)))
        out.update(asyncio.run(ingest(url, redis_url, tmp / f"cache-i{nodes}", args.sessions, args.window)))
        if nodes > 1:
            out.update(asyncio.run(recovery(eng)))
    finally:
        eng.stop()
        redis.stop()
        os.environ.pop("BUILDER_TELEMETRY_REPLICAS", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=2000, help="builds published for the ingest figure")
    ap.add_argument("--window", type=int, default=64, help="publishes awaiting their ack at a time")
    ap.add_argument("--rate", type=float, default=50.0, help="sessions/s of the alert-latency run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp_s:
        tmp = Path(tmp_s)
        one = topology(1, tmp, args)
        three = topology(3, tmp, args)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.sessions} sessions, "
          f"window {args.window}; alerts at {args.rate:.0f} sessions/s")
    for key in ("acked_per_s", "completed_per_s", "alert_p50_ms", "alert_p99_ms"):
        ratio = three[key] / one[key] if one[key] else float("nan")
        print(f"{key:>18}: 1 node {one[key]:9.1f}   3 nodes {three[key]:9.1f}   ratio {ratio:.2f}")
    print(f"alerts 1 node {one['alerts']:.0f}/{one['expected_alerts']:.0f}, 3 nodes "
          f"{three['alerts']:.0f}/{three['expected_alerts']:.0f}; duplicates {one['duplicates']:.0f}/"
          f"{three['duplicates']:.0f}; sessions completed {one['completed']:.0f}/{three['completed']:.0f}")
    print(f"leader SIGKILL -> publishes succeed again: {three['publish_ok_after_kill_s']:.2f} s; "
          f"restart -> node current: {three['node_current_after_restart_s']:.2f} s")
    print(json.dumps({"one": {k: round(v, 2) for k, v in one.items()},
                      "three": {k: round(v, 2) for k, v in three.items()},
                      "ratio_acked": round(three["acked_per_s"] / one["acked_per_s"], 2),
                      "ratio_completed": round(three["completed_per_s"] / one["completed_per_s"], 2),
                      "ratio_alert_p50": round(three["alert_p50_ms"] / one["alert_p50_ms"], 2),
                      "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
