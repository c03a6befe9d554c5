"""OTLP/HTTP protobuf ingest of one tracer process, against a bare protobuf decode of the same bodies.

    .venv/bin/python benchmarks/bench_tracer.py [--requests 200] [--spans 500] [--concurrency 4]

Starts NATS and Redis (or joins ``BUILDER_TELEMETRY_NATS_URL``/``_REDIS_URL``),
runs ``python -m buildtel.services.tracer`` as its own process on a free loopback port
(store on a temporary directory, fsync on as in production), builds
``--requests`` ExportTraceServiceRequest bodies of ``--spans`` spans each
(10 traces per request, 6 attributes per span, an event on every 5th, an error
status on every 50th), then:

* bare decode: ``ExportTraceServiceRequest.FromString`` of every body with
  opentelemetry-proto, in this process (the floor of any Python OTLP receiver);
* ingest: every body POSTed over real HTTP to the tracer, which decodes,
  validates, stores and answers; the time is from the first request to the
  last response, and the tracer's own count of stored spans is checked.

Goal: >= 20,000 spans/s per tracer process.  The last line is JSON with
``spans_per_s`` and ``ratio_vs_bare_decode`` (ingest rate / bare decode rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import psutil
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from buildtel.services.tracer import otlp
from buildtel.services.tracer.query import TraceClient
from buildtel.services.tracer.subjects import TracerSubjects
from buildtel.shared.bus import connect_nats
from buildtel.shared.engines import NatsEngine, RedisEngine, free_port
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

ROOT = Path(__file__).resolve().parents[1]

GOAL = 20_000


def make_bodies(requests: int, spans: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    t0 = time.time_ns() - 3_600_000_000_000
    bodies = []
    for _ in range(requests):
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        for key, value in (("service.name", "bench-build"), ("host.name", "worker-17"), ("process.pid", 4242)):
            kv = rs.resource.attributes.add()
            kv.key = key
            otlp.encode_any(value, kv.value)
        ss = rs.scope_spans.add()
        ss.scope.name, ss.scope.version = "bench", "1.0"
        traces = [rng.randbytes(16) for _ in range(10)]
        for i in range(spans):
            s = ss.spans.add()
            s.trace_id = traces[i % len(traces)]
            s.span_id = rng.randbytes(8)
            if i >= len(traces):
                s.parent_span_id = ss.spans[i - len(traces)].span_id
            s.name = f"compile //pkg{i % 37}:target{i}"
            s.kind = 1 + i % 3
            s.start_time_unix_nano = t0 + i * 1_000_000
            s.end_time_unix_nano = s.start_time_unix_nano + rng.randrange(1_000, 5_000_000_000)
            for key, value in (("build.target", f"//pkg{i % 37}:target{i}"), ("build.worker", f"w{i % 16}"),
                               ("build.cache", "miss" if i % 3 else "remote_hit"), ("build.exit_code", 0),
                               ("build.cpu_s", rng.random() * 10), ("build.cached", bool(i % 2))):
                kv = s.attributes.add()
                kv.key = key
                otlp.encode_any(value, kv.value)
            if i % 5 == 0:
                ev = s.events.add()
                ev.name, ev.time_unix_nano = "cache.lookup", s.start_time_unix_nano + 10
                kv = ev.attributes.add()
                kv.key = "cache.key"
                kv.value.string_value = "sha256:" + rng.randbytes(8).hex()
            if i % 50 == 0:
                s.status.code, s.status.message = 2, "exit code 1"
        bodies.append(req.SerializeToString())
    return bodies


def bare_decode(bodies: list[bytes]) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for body in bodies:
        req = ExportTraceServiceRequest.FromString(body)
        n += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
    return time.perf_counter() - start, n


def our_decode(bodies: list[bytes]) -> tuple[float, int]:
    start = time.perf_counter()
    n = sum(len(otlp.decode_request(b).spans) for b in bodies)
    return time.perf_counter() - start, n


async def post_all(url: str, bodies: list[bytes], concurrency: int) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    headers = {"Content-Type": "application/x-protobuf"}

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            async with http.post(url, data=body, headers=headers) as resp:
                answer = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"tracer answered {resp.status}: {answer[:200]!r}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - start


async def wait_ready(url: str, proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError("tracer exited during startup")
            try:
                async with http.post(url, data=b"", headers={"Content-Type": "application/x-protobuf"}) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("tracer did not start")


async def run(args: argparse.Namespace, nats_url: str, redis_url: str, workdir: Path) -> dict[str, float]:
    print(f"building {args.requests} requests x {args.spans} spans ...", flush=True)
    bodies = make_bodies(args.requests, args.spans)
    total = args.requests * args.spans
    mb = sum(map(len, bodies)) / 1e6
    print(f"  {mb:.1f} MB of protobuf, {mb * 1e6 / total:.0f} bytes/span")
    bare_s, n = min((bare_decode(bodies) for _ in range(3)), key=lambda r: r[0])
    assert n == total
    ours_s, n_ours = our_decode(bodies)
    assert n_ours == total
    namespace = "bench" + uuid.uuid4().hex[:8]
    port = free_port()
    env = dict(os.environ, BUILDER_TELEMETRY_NATS_URL=nats_url, BUILDER_TELEMETRY_REDIS_URL=redis_url,
               BUILDER_TELEMETRY_NAMESPACE=namespace, BUILDER_TELEMETRY_CACHE_DIR=str(workdir / "cache"),
               BUILDER_TELEMETRY_LOG_LEVEL="warning", PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "buildtel.services.tracer",
                                                "--otlp-port", str(port), env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1/traces"
    try:
        await wait_ready(url, proc)
        await post_all(url, bodies[:5], 1)  # warm-up: connections, first segment file, code paths
        ps = psutil.Process(proc.pid)
        me = psutil.Process()
        cpu0, mine0 = sum(ps.cpu_times()[:2]), sum(me.cpu_times()[:2])
        wall = await post_all(url, bodies, args.concurrency)
        cpu, client_cpu = sum(ps.cpu_times()[:2]) - cpu0, sum(me.cpu_times()[:2]) - mine0
        settings = Settings(namespace=namespace)
        nc = await connect_nats(settings, nats_url, name="bench-tracer", role="operator")
        stats = await TraceClient(nc, TracerSubjects(Subjects(namespace))).stats()
        await nc.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
    stored = stats.spans_stored - 5 * args.spans
    if stored != total:
        raise RuntimeError(f"tracer stored {stored} spans, expected {total}")
    disk = stats.disk_bytes
    rate, bare_rate, ours_rate = total / wall, total / bare_s, total / ours_s
    print(f"bare decode (opentelemetry-proto FromString): {bare_rate:12,.0f} spans/s  ({bare_s * 1e3:.0f} ms)")
    print(f"decode to span records (buildtel.services.tracer.otlp): {ours_rate:11,.0f} spans/s  "
          f"({ours_s * 1e3:.0f} ms)")
    print(f"OTLP/HTTP ingest, 1 tracer process:           {rate:12,.0f} spans/s  ({wall:.2f} s wall, "
          f"{cpu:.2f} s tracer CPU, {total / max(cpu, 1e-9):,.0f} spans per CPU-second; "
          f"client {client_cpu:.2f} s CPU)")
    print(f"  {args.requests} requests x {args.spans} spans, concurrency {args.concurrency}; "
          f"stored {stored:,} spans in {stats.traces:,} traces, {disk / 1e6:.1f} MB on disk")
    print(f"  goal >= {GOAL:,} spans/s: {'met' if rate >= GOAL else 'NOT met'}")
    return {"spans_per_s": round(rate), "ratio_vs_bare_decode": round(rate / bare_rate, 4),
            "bare_decode_spans_per_s": round(bare_rate), "decode_to_records_spans_per_s": round(ours_rate),
            "tracer_cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "requests": args.requests,
            "spans_per_request": args.spans, "concurrency": args.concurrency, "goal_spans_per_s": GOAL,
            "meets_goal": rate >= GOAL}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--spans", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tracer-") as tmp:
        workdir = Path(tmp)
        nats_url = os.environ.get("BUILDER_TELEMETRY_NATS_URL")
        redis_url = os.environ.get("BUILDER_TELEMETRY_REDIS_URL")
        engines = []
        if not nats_url:
            engines.append(NatsEngine(workdir / "nats").start())
            nats_url = engines[-1].url_for("operator")  # authenticated, as on a real stack
        if not redis_url:
            engines.append(RedisEngine(workdir / "redis").start())
            redis_url = engines[-1].url
        try:
            result = asyncio.run(run(args, nats_url, redis_url, workdir))
        finally:
            for eng in engines:
                eng.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
