"""End-to-end ingest: events/s from several agents to stored sessions through ONE collector.

The same pre-encoded batches are sent twice in one run, against fresh embedded NATS and Redis:
  1. bare: core-NATS publish to a subscriber process that only decodes them (nats-py + msgspec),
  2. ours: JetStream publish -> collector process (fold in Redis) -> storage process (fsync).
Agents' own CPU is measured by bench_overhead.py, so batches are encoded before timing.  The
pipeline's time ends when the storage service reports every session stored; lost and duplicated
events are counted from the stored sessions' totals against what was published.

    python -m benchmarks.bench_ingest [--agents 8] [--sessions 40] [--events 5000] [--batch 500] [--runs 3]
                                      [--profile DIR]

``--runs N`` repeats both measurements N times, alternating, and reports medians; ``--profile DIR``
runs the collector and storage processes under py-spy (``pip install py-spy``) and leaves their
folded stacks in DIR (``collector.txt``, ``storage.txt``; flame-graph input).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

from buildtel.services.storage.api import StorageClient
from buildtel.shared.bus import ensure_streams
from buildtel.shared.codec import batch_decoder, encode
from buildtel.shared.engines import NatsEngine, RedisEngine
from buildtel.shared.protocol import BuildFinished, BuildStarted, EventBatch, TargetFinished, new_session_id
from buildtel.shared.subjects import Subjects

NS = "bench"


def make_batches(agents: int, sessions: int, events: int,
                 batch: int) -> tuple[list[tuple[str, str, bytes]], dict[str, int]]:
    """(subject, msg id, bytes) per batch, sessions spread over agents; expected events per session."""
    subjects = Subjects(NS)
    out: list[tuple[str, str, bytes]] = []
    expected: dict[str, int] = {}
    now = time.time()
    for s in range(sessions):
        sid = new_session_id()
        agent = f"agent-{s % agents}"
        evs: list = [BuildStarted(session_id=sid, agent_id=agent, seq=0, ts=now, name=f"bench {s}")]
        for i in range(1, events - 1):
            evs.append(TargetFinished(session_id=sid, agent_id=agent, seq=i, ts=now, target=f"//pkg{i % 50}:t{i}",
                                      start=now, duration_s=0.01 * (i % 100), cache="miss" if i % 3 else "remote_hit",
                                      worker=f"w{i % 16}"))
        evs.append(BuildFinished(session_id=sid, agent_id=agent, seq=events - 1, ts=now + 1))
        expected[sid] = events
        for i in range(0, events, batch):
            data = encode(EventBatch(session_id=sid, agent_id=agent, events=evs[i:i + batch]))
            out.append((subjects.events(sid), f"{sid}:{agent}:{i}", data))
    return out, expected


def bare_subscriber(url: str, subject: str, count: int) -> None:
    """Child process: subscribe, decode every batch, print the events seen when all arrived."""
    async def run() -> None:
        nc = await nats.connect(url)
        done = asyncio.Event()
        seen = [0, 0]

        async def cb(msg) -> None:
            seen[0] += len(batch_decoder.decode(msg.data).events)
            seen[1] += 1
            if seen[1] == count:
                done.set()

        await nc.subscribe(subject, cb=cb, pending_msgs_limit=10_000_000, pending_bytes_limit=-1)
        await nc.flush()
        print("ready", flush=True)
        await done.wait()
        print(seen[0], flush=True)
        await nc.close()

    asyncio.run(run())


async def run_bare(url: str, batches: list[tuple[str, str, bytes]]) -> float:
    # The URL carries credentials: it goes to the child in its environment, not its command line.
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_ingest", "--bare-subscriber", f"{NS}.bare",
                             str(len(batches))], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, BENCH_NATS_URL=url))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    nc = await nats.connect(url)
    t = time.perf_counter()
    for _, _, data in batches:
        await nc.publish(f"{NS}.bare", data)
    await nc.flush()
    line = await asyncio.to_thread(proc.stdout.readline)
    elapsed = time.perf_counter() - t
    proc.wait()
    await nc.close()
    return int(line) / elapsed


def spawn(module: str, env: dict[str, str], profile: Path | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", module]
    if profile is not None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [spy, "record", "--format", "raw", "--rate", "250", "--nonblocking",
               "-o", str(profile / f"{module.rpartition('.')[2]}.txt"), "--", *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run_pipeline(nats_url: str, redis_url: str, cache: Path, agents: int,
                       batches: list[tuple[str, str, bytes]], expected: dict[str, int],
                       profile: Path | None = None) -> dict[str, float]:
    env = dict(os.environ, BUILDER_TELEMETRY_NATS_URL=nats_url, BUILDER_TELEMETRY_REDIS_URL=redis_url,
               BUILDER_TELEMETRY_NAMESPACE=NS, BUILDER_TELEMETRY_CACHE_DIR=str(cache),
               BUILDER_TELEMETRY_LOG_LEVEL="warning", BUILDER_TELEMETRY_FINISH_GRACE_S="0.2")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_streams(js, Subjects(NS))
    procs = [spawn("buildtel.services.collector", env, profile), spawn("buildtel.services.storage", env, profile)]
    client = StorageClient(nc, Subjects(NS))
    try:
        for _ in range(100):  # wait for the storage API
            try:
                await client.stats()
                break
            except Exception:  # noqa: BLE001 - not up yet: poll again (bounded)
                await asyncio.sleep(0.1)
        # ... and for the collector's durable consumer: the clock measures ingest, not process start
        # (the bare subscriber is likewise ready before its clock starts).
        for _ in range(300):
            try:
                await js.consumer_info(Subjects(NS).events_stream, "collector")
                break
            except Exception:  # noqa: BLE001 - not up yet: poll again (bounded)
                await asyncio.sleep(0.1)
        # Each agent publishes its own batches, in order, with a bounded window of acks in flight.
        per_agent: dict[str, list[tuple[str, str, bytes]]] = {}
        for item in batches:
            per_agent.setdefault(item[1].split(":")[1], []).append(item)

        async def agent(items: list[tuple[str, str, bytes]]) -> None:
            window: list[asyncio.Future] = []
            for subject, msg_id, data in items:
                window.append(await js.publish_async(subject, data, headers={"Nats-Msg-Id": msg_id}))
                if len(window) >= 64:
                    await asyncio.gather(*window)
                    window.clear()
            await asyncio.gather(*window)

        t = time.perf_counter()
        await asyncio.gather(*(agent(items) for items in per_agent.values()))
        published = time.perf_counter() - t
        while (await client.stats()).sessions < len(expected):
            await asyncio.sleep(0.02)
            if time.perf_counter() - t > 300:
                break
        elapsed = time.perf_counter() - t
        stored = {s.id: s.totals.events for s in await client.recent(len(expected) + 10)}
    finally:
        for p in procs:
            # py-spy writes its profile on SIGINT (and stops its child); the services stop on SIGTERM.
            p.send_signal(signal.SIGINT if profile is not None else signal.SIGTERM)
            p.wait()
        await nc.close()
    lost = sum(max(0, n - stored.get(sid, 0)) for sid, n in expected.items())
    dup = sum(max(0, stored.get(sid, 0) - n) for sid, n in expected.items())
    total = sum(expected.values())
    return {"events_per_s": total / elapsed, "publish_s": published, "elapsed_s": elapsed, "lost": lost,
            "duplicated": dup, "sessions_stored": len(stored)}


async def one_run(args: argparse.Namespace, batches: list[tuple[str, str, bytes]],
                  expected: dict[str, int]) -> tuple[float, dict[str, float]]:
    """Bare baseline then our pipeline, against fresh engines."""
    with tempfile.TemporaryDirectory() as tmp:
        n = NatsEngine(Path(tmp) / "nats").start()
        r = RedisEngine(Path(tmp) / "redis").start()
        try:
            # Authenticated as on a real stack; the operator role may do all the benchmark does.
            url = n.url_for("operator")
            bare = await run_bare(url, batches)
            ours = await run_pipeline(url, r.url, Path(tmp) / "cache", args.agents, batches, expected,
                                      Path(args.profile) if args.profile else None)
        finally:
            n.stop()
            r.stop()
    return bare, ours


async def main_async(args: argparse.Namespace) -> None:
    batches, expected = make_batches(args.agents, args.sessions, args.events, args.batch)
    total = sum(expected.values())
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    print(f"{args.agents} agents, {args.sessions} sessions, {total} events in batches of {args.batch}")
    bares: list[float] = []
    rates: list[float] = []
    ratios: list[float] = []
    lost = dup = 0
    for i in range(args.runs):
        load = os.getloadavg()[0]
        bare, ours = await one_run(args, batches, expected)
        bares.append(bare)
        rates.append(ours["events_per_s"])
        ratios.append(ours["events_per_s"] / bare)
        lost += int(ours["lost"])
        dup += int(ours["duplicated"])
        print(f"run {i + 1}: load {load:.2f}; bare nats-py subscribe+decode {bare:11,.0f} events/s; "
              f"agents -> collector -> storage {ours['events_per_s']:9,.0f} events/s (published in "
              f"{ours['publish_s']:.2f} s, all stored after {ours['elapsed_s']:.2f} s); ratio {ratios[-1]:.2f}; "
              f"lost {ours['lost']}, duplicated {ours['duplicated']}, sessions stored "
              f"{ours['sessions_stored']}/{len(expected)}", flush=True)
    med = statistics.median
    print(f"median of {args.runs}: bare {med(bares):,.0f} events/s; ours {med(rates):,.0f} events/s; "
          f"ratio {med(ratios):.2f}; lost {lost}, duplicated {dup}")
    print(json.dumps({"events_per_s": round(med(rates)), "ratio_vs_bare_nats": round(med(ratios), 3),
                      "bare_events_per_s": round(med(bares)), "runs": args.runs, "lost": lost, "duplicated": dup}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-subscriber":
        bare_subscriber(os.environ["BENCH_NATS_URL"], sys.argv[2], int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--sessions", type=int, default=40)
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3, help="alternate bare/ours this many times; medians reported")
    ap.add_argument("--profile", metavar="DIR", help="run the services under py-spy, folded stacks in DIR")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
