"""The BES endpoint under a replayed Bazel stream: events/s and acknowledgement latency over gRPC.

One synthetic BEP stream (``--events``, default 100,000: a header, then per target a
``targetConfigured``, ``progress``, ``namedSet`` and ``targetCompleted``, every 20th target also a
failed ``actionCompleted``, then ``buildFinished``/``buildMetrics``) is sent over gRPC in Bazel's
framing, by a client in a process of its own (requests encoded before timing), to:

  1. bare: a grpcio ``PublishBuildEvent`` echo that acknowledges each request as it arrives,
  2. ours: the ``bes`` service, mapping each event and acknowledging it once its events are
     acknowledged by JetStream (embedded nats-server with its file store),

both in this process.  Two measurements per server and run: throughput (the client sends as fast
as gRPC's flow control lets it; latency there is queueing) and acknowledgement latency at a paced
rate (``--latency-rate`` events/s, the first ``--latency-events`` events; from an event's send to
its acknowledgement).  The collector is not run: folding is ``bench_ingest``'s subject.

    python -m benchmarks.bench_bes [--events 100000] [--latency-rate 2000] [--latency-events 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

from buildtel.services.bes.gen import (
    build_event_stream_pb2 as bes,
)
from buildtel.services.bes.gen import (
    build_events_pb2,
    publish_build_event_pb2,
    publish_build_event_pb2_grpc,
)
from buildtel.services.bes.service import BesService
from buildtel.shared.engines import NatsEngine, RedisEngine
from buildtel.shared.settings import Settings


def bep_events(n: int) -> list[Any]:
    """About ``n`` BEP events of a build of n/4 genrule-like targets."""
    now = int(time.time() * 1000)
    ev = bes.BuildEvent
    out = [ev(id=bes.BuildEventId(started=bes.BuildEventId.BuildStartedId()),
              started=bes.BuildStarted(uuid="", start_time_millis=now, command="build", build_tool_version="7.1.2")),
           ev(id=bes.BuildEventId(pattern=bes.BuildEventId.PatternExpandedId(pattern=["//..."])),
              expanded=bes.PatternExpanded()),
           ev(id=bes.BuildEventId(workspace_status=bes.BuildEventId.WorkspaceStatusId()),
              workspace_status=bes.WorkspaceStatus(item=[bes.WorkspaceStatus.Item(key="BUILD_USER", value="bench")]))]
    i = 0
    while len(out) < n - 2:
        label = f"//pkg{i % 100}:t{i}"
        out.append(ev(id=bes.BuildEventId(target_configured=bes.BuildEventId.TargetConfiguredId(label=label)),
                      configured=bes.TargetConfigured(target_kind="genrule rule")))
        out.append(ev(id=bes.BuildEventId(progress=bes.BuildEventId.ProgressId(opaque_count=i)),
                      progress=bes.Progress(stdout=f"[{i} / {n // 4}] Executing genrule {label}\n")))
        out.append(ev(id=bes.BuildEventId(named_set=bes.BuildEventId.NamedSetOfFilesId(id=str(i))),
                      named_set_of_files=bes.NamedSetOfFiles(files=[bes.File(name=f"t{i}.out", uri="file:///x")])))
        ok = i % 20 != 0
        if not ok:
            out.append(ev(id=bes.BuildEventId(action_completed=bes.BuildEventId.ActionCompletedId(
                primary_output=f"bazel-out/t{i}.out", label=label)),
                action=bes.ActionExecuted(success=False, exit_code=1, type="Genrule")))
        out.append(ev(id=bes.BuildEventId(target_completed=bes.BuildEventId.TargetCompletedId(label=label)),
                      completed=bes.TargetComplete(success=ok)))
        i += 1
    out.append(ev(id=bes.BuildEventId(build_finished=bes.BuildEventId.BuildFinishedId()),
                  finished=bes.BuildFinished(finish_time_millis=now + 1000,
                                             exit_code=bes.BuildFinished.ExitCode(name="BUILD_FAILURE", code=1))))
    out.append(ev(id=bes.BuildEventId(build_metrics=bes.BuildEventId.BuildMetricsId()),
                  build_metrics=bes.BuildMetrics(), last_message=True))
    return out


def requests(events: list[Any], invocation: str) -> list[Any]:
    sid = build_events_pb2.StreamId(build_id="bench", invocation_id=invocation,
                                    component=build_events_pb2.StreamId.TOOL)
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    out = []
    for seq, e in enumerate(events, start=1):
        packed = any_pb2.Any()
        packed.Pack(e)
        out.append(publish_build_event_pb2.PublishBuildToolEventStreamRequest(
            ordered_build_event=publish_build_event_pb2.OrderedBuildEvent(
                stream_id=sid, sequence_number=seq,
                event=build_events_pb2.BuildEvent(event_time=ts, bazel_event=packed))))
    return out


class Echo(publish_build_event_pb2_grpc.PublishBuildEventServicer):  # type: ignore[misc]
    """The bare baseline: acknowledge each request as it arrives."""

    async def PublishLifecycleEvent(self, request: Any, context: Any) -> Any:
        return empty_pb2.Empty()

    async def PublishBuildToolEventStream(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for req in request_iterator:
            obe = req.ordered_build_event
            yield publish_build_event_pb2.PublishBuildToolEventStreamResponse(
                stream_id=obe.stream_id, sequence_number=obe.sequence_number)


async def replay(target: str, reqs: list[Any], rate: float) -> tuple[float, list[float]]:
    """(events/s, per-event ack latency in ms) of one stream."""
    sent = [0.0] * (len(reqs) + 1)

    async def gen() -> AsyncIterator[Any]:
        t0 = time.perf_counter()
        for k, r in enumerate(reqs, start=1):
            if rate and (wait := t0 + k / rate - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            sent[k] = time.perf_counter()
            yield r

    lat: list[float] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = publish_build_event_pb2_grpc.PublishBuildEventStub(ch)
        start = time.perf_counter()
        call = stub.PublishBuildToolEventStream(gen())
        async for resp in call:
            lat.append((time.perf_counter() - sent[resp.sequence_number]) * 1000.0)
            if len(lat) == len(reqs):
                break
        elapsed = time.perf_counter() - start
        call.cancel()
    return len(reqs) / elapsed, lat


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def client(target: str, n: int, rate: float) -> float:
    """Child process: replay ``n`` events to ``target``; returns events/s, prints the p99 too."""
    async def run() -> tuple[float, list[float]]:
        return await replay(target, requests(bep_events(n), str(uuid.uuid4())), rate)
    eps, lat = asyncio.run(run())
    print(json.dumps({"events_per_s": eps, "p99_ms": p99(lat), "median_ms": statistics.median(lat)}), flush=True)
    return eps


async def _child(target: str, n: int, rate: float) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.bench_bes", "--client", target, "--events", str(n), "--rate", str(rate),
        stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"client failed with {proc.returncode}")
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nats_e = NatsEngine(Path(tmp) / "nats", namespace="bench").start()
        redis_e = RedisEngine(Path(tmp) / "redis").start()
        try:
            settings = Settings(namespace="bench", cache_dir=Path(tmp) / "data", log_level="warning",
                                stack_auth=nats_e.auth)
            svc = BesService(settings, nats_e.url, redis_e.url, port=0)
            await svc.start()
            echo = grpc.aio.server()
            publish_build_event_pb2_grpc.add_PublishBuildEventServicer_to_server(Echo(), echo)
            echo_port = echo.add_insecure_port("127.0.0.1:0")
            await echo.start()
            results: dict[str, list[tuple[float, float]]] = {"bare": [], "ours": []}
            try:
                for run in range(args.runs):
                    for name, target in (("bare", f"127.0.0.1:{echo_port}"), ("ours", svc.url[len("grpc://"):])):
                        fast = await _child(target, args.events, 0.0)
                        paced = await _child(target, args.latency_events, args.latency_rate)
                        results[name].append((fast["events_per_s"], paced["p99_ms"]))
                        print(f"run {run + 1} {name}: {fast['events_per_s']:,.0f} events/s "
                              f"(queueing p99 {fast['p99_ms']:.0f} ms); at {args.latency_rate:,.0f} events/s "
                              f"ack p99 {paced['p99_ms']:.2f} ms, median {paced['median_ms']:.2f} ms", flush=True)
            finally:
                await echo.stop(None)
                await svc.stop()
        finally:
            nats_e.stop()
            redis_e.stop()

    def med(name: str, k: int) -> float:
        return statistics.median(r[k] for r in results[name])

    print(json.dumps({"events": args.events, "latency_rate": args.latency_rate, "runs": args.runs,
                      "bes_events_per_s": round(med("ours", 0)), "bes_ack_p99_ms": round(med("ours", 1), 2),
                      "echo_events_per_s": round(med("bare", 0)), "echo_ack_p99_ms": round(med("bare", 1), 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--latency-rate", type=float, default=2000.0, help="events/s of the latency measurement")
    ap.add_argument("--latency-events", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--client", metavar="HOST:PORT", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client(args.client, args.events, args.rate)
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
