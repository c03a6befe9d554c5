"""What telemetry costs the build: SDK CPU per event, and ``buildtel run`` wall-time overhead.

(a) SDK: ``time.process_time()`` (every thread of the process, so the background
    batching, encoding and publishing are included) around emitting N
    ``target_finished`` events from the main thread into a ``SyncTelemetryClient``
    and closing it; once with the bus away (dead port, buffer large enough to hold
    everything, so every event is still encoded) and once against a real embedded
    NATS.  The main thread's own share (``time.thread_time``) is the emit call alone.
(b) ``buildtel run -- make -jJ`` of a generated C project (F small files) against
    plain ``make -jJ``, alternating, ``make clean`` before every build, one warm-up
    each; the overhead is the difference of the medians over plain make's median.
    The runs publish to an embedded NATS + Redis started here; the sessions' events
    are counted afterwards to prove telemetry was on.  CPU (wait4 rusage of the
    tree) is reported too: it is far less sensitive than wall time to other load on
    the machine.  The fixed latency of the wrapper is measured separately with a
    child that only writes a timestamp: launch-to-spawn and exit-to-return.

    python -m benchmarks.bench_overhead [--events 200000] [--files 300] [--runs 5] [--jobs 2]
                                        [--run-args '--no-capture'] [--skip-run]

Prints figures, then one JSON line with ``sdk_us_per_event`` (real NATS, all threads)
and ``run_overhead_ratio`` (0.01 = 1 %).  Goals: <= 2 us/event, <= 1 % overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from buildtel.shared.engines import NatsEngine, RedisEngine, free_port
from buildtel.shared.settings import Settings

NS = "benchoverhead"


# -- (a) SDK CPU per event -------------------------------------------------------------------------
def bench_sdk(n: int, url: str, *, buffer_limit: int) -> dict[str, float]:
    from buildtel.shared.client import SyncTelemetryClient

    settings = Settings(namespace=NS, nats_url=url, buffer_limit=buffer_limit, log_format="json")
    client = SyncTelemetryClient(settings, name="bench").start()
    deadline = time.monotonic() + 5
    while not client.connected and not client.last_error and time.monotonic() < deadline:
        time.sleep(0.01)  # connected (or refused) before timing: connecting is not per-event cost
    emit = client.target_finished
    now = time.time()
    p0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
    for _i in range(n):
        emit("//src/pkg:target", start=now, duration_s=0.25, status="success", cache="miss",
             worker="worker-1", exit_code=0, cpu_s=0.2)
    t1 = time.thread_time()
    stats = client.close(timeout=30, warn=False)
    p1, w1 = time.process_time(), time.perf_counter()
    return {"us_per_event": (p1 - p0) / n * 1e6, "emit_us_per_event": (t1 - t0) / n * 1e6,
            "wall_s": w1 - w0, "sent": stats.sent, "dropped": stats.dropped, "retries": stats.retries}


# -- (b) buildtel run overhead -------------------------------------------------------------------------
def make_project(root: Path, files: int) -> None:
    src = root / "src"
    src.mkdir(parents=True)
    for i in range(files):
        body = "\n".join(
            f"static int f{i}_{k}(int x) {{ int s = 0; for (int j = 0; j < x; j++) s += (j * {k + 1}) ^ {i};"
            " return s; }" for k in range(8))
        calls = " + ".join(f"f{i}_{k}(x)" for k in range(8))
        (src / f"u{i}.c").write_text(f"#include <stdio.h>\n#include <string.h>\n{body}\n"
                                     f"int unit{i}(int x) {{ return {calls}; }}\n")
    decls = "\n".join(f"int unit{i}(int);" for i in range(files))
    total = " + ".join(f"unit{i}(n)" for i in range(files))
    (src / "main.c").write_text(f"#include <stdio.h>\n{decls}\nint main(void) {{ int n = 3; "
                                f"printf(\"%d\\n\", {total}); return 0; }}\n")
    (root / "Makefile").write_text(
        "SRCS := $(wildcard src/*.c)\nOBJS := $(SRCS:src/%.c=build/%.o)\n"
        "app: $(OBJS)\n\t$(CC) -o $@ $^\n"
        "build/%.o: src/%.c | build\n\t$(CC) -O2 -c -o $@ $<\n"
        "build:\n\tmkdir -p build\n"
        "clean:\n\trm -rf build app\n.PHONY: clean\n")


def _timed(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole tree) of one clean build."""
    subprocess.run(["make", "clean"], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{argv} failed with {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def buildtel_argv() -> list[str]:
    script = Path(sys.executable).parent / "buildtel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "buildtel.cli.main"]


def bench_run(root: Path, runs: int, jobs: int, env: dict[str, str], run_args: list[str]) -> dict[str, float]:
    plain = ["make", f"-j{jobs}"]
    wrapped = [*buildtel_argv(), "run", "-q", *run_args, "--", *plain]
    _timed(plain, root, env)  # warm-up: page cache, compiler binaries
    _timed(wrapped, root, env)
    a: list[tuple[float, float]] = []
    b: list[tuple[float, float]] = []
    for i in range(runs):  # ABBA order, so a drift in machine speed cancels out
        pair = [(a, plain), (b, wrapped)] if i % 2 == 0 else [(b, wrapped), (a, plain)]
        for bucket, argv in pair:
            bucket.append(_timed(argv, root, env))
            what = "buildtel run" if argv is wrapped else "plain make  "
            print(f"    {what}: {bucket[-1][0]:.3f}s wall, {bucket[-1][1]:.2f}s CPU", flush=True)
    pm, bm = statistics.median(w for w, _ in a), statistics.median(w for w, _ in b)
    pc, bc = statistics.median(c for _, c in a), statistics.median(c for _, c in b)
    return {"plain_median_s": pm, "wrapped_median_s": bm, "overhead_ratio": (bm - pm) / pm,
            "plain_cpu_s": pc, "wrapped_cpu_s": bc, "plain_spread": (max(w for w, _ in a) - min(w for w, _ in a)) / pm}


def bench_latency(env: dict[str, str], cwd: Path, runs: int = 5, child_s: float = 2.0) -> dict[str, float]:
    """The wrapper's own latency around a child that writes its start and end times.

    launch-to-spawn: CLI start-up until the child runs (minus a bare ``python -S`` start);
    exit-to-return: the child's end until ``buildtel run`` returns.  The child lasts
    ``child_s`` so that, as in a real build, the background work is done by then.
    """
    stamp = cwd / "stamp"
    code = (f"import time; t = time.time(); time.sleep({child_s}); "
            f"open({str(stamp)!r}, 'w').write(repr(t) + ' ' + repr(time.time()))")
    child = [sys.executable, "-S", "-c", code]
    bare_code = f"import time; open({str(stamp)!r}, 'w').write(repr(time.time()))"
    pre, post, bare = [], [], []
    for _ in range(runs):
        t0 = time.time()
        subprocess.run([sys.executable, "-S", "-c", bare_code], check=True)
        bare.append(float(stamp.read_text()) - t0)
        t0 = time.time()
        subprocess.run([*buildtel_argv(), "run", "-q", "--", *child], cwd=cwd, env=env, check=True,
                       stderr=subprocess.DEVNULL)
        t2 = time.time()
        start, end = map(float, stamp.read_text().split())
        pre.append(start - t0)
        post.append(t2 - end)
    return {"pre_spawn_s": statistics.median(pre) - statistics.median(bare), "post_exit_s": statistics.median(post)}


async def count_finished(url: str) -> int:
    from buildtel.shared.bus import connect_nats
    from buildtel.shared.codec import decode_batch
    from buildtel.shared.protocol import BuildFinished
    from buildtel.shared.subjects import Subjects

    nc = await connect_nats(Settings(), url, name="bench-reader", role="operator")
    try:
        js = nc.jetstream()
        info = await js.stream_info(Subjects(NS).events_stream)
        n = 0
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            batch = decode_batch((await js.get_msg(Subjects(NS).events_stream, seq)).data)
            n += sum(isinstance(e, BuildFinished) for e in batch.events)
        return n
    finally:
        await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--skip-run", action="store_true", help="only the SDK figures")
    ap.add_argument("--run-args", default="", help="extra options for buildtel run, e.g. '--no-capture'")
    args = ap.parse_args()
    result: dict[str, float | None] = {"sdk_us_per_event": None, "run_overhead_ratio": None}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp_s:
        tmp = Path(tmp_s)
        with NatsEngine(tmp / "nats") as nats_eng, RedisEngine(tmp / "redis") as redis_eng:
            print(f"(a) SDK, {args.events} target_finished events, SyncTelemetryClient")
            # Buffers large enough to hold every event: a drop would be a cheaper event.
            away = bench_sdk(args.events, f"nats://127.0.0.1:{free_port()}", buffer_limit=args.events)
            print(f"    bus away : {away['us_per_event']:.2f} us/event all threads "
                  f"({away['emit_us_per_event']:.2f} in the emitting thread), dropped at close {away['dropped']}")
            real = bench_sdk(args.events, nats_eng.url_for("operator"), buffer_limit=args.events)
            print(f"    real NATS: {real['us_per_event']:.2f} us/event all threads "
                  f"({real['emit_us_per_event']:.2f} in the emitting thread), sent {real['sent']}, "
                  f"dropped {real['dropped']}, {args.events / real['wall_s']:.0f} events/s")
            result.update(sdk_us_per_event=round(real["us_per_event"], 3),
                          sdk_emit_us_per_event=round(real["emit_us_per_event"], 3),
                          sdk_bus_away_us_per_event=round(away["us_per_event"], 3))
            if not args.skip_run:
                env = dict(os.environ)
                env.update(BUILDER_TELEMETRY_NATS_URL=nats_eng.url_for("operator"),
                           BUILDER_TELEMETRY_REDIS_URL=redis_eng.url, BUILDER_TELEMETRY_NAMESPACE=NS,
                           BUILDER_TELEMETRY_CACHE_DIR=str(tmp / "cache"))
                root = tmp / "project"
                make_project(root, args.files)
                print(f"(b) make -j{args.jobs} of {args.files} C files, {args.runs} runs each, alternating; "
                      f"buildtel run {args.run_args}".rstrip())
                run = bench_run(root, args.runs, args.jobs, env, shlex.split(args.run_args))
                fixed = bench_latency(env, root)
                sessions = asyncio.run(count_finished(nats_eng.url_for("operator")))
                print(f"    plain make median {run['plain_median_s']:.3f}s (spread {run['plain_spread'] * 100:.0f}%), "
                      f"buildtel run median {run['wrapped_median_s']:.3f}s: "
                      f"overhead {run['overhead_ratio'] * 100:+.2f}%")
                print(f"    CPU medians: plain {run['plain_cpu_s']:.2f}s, wrapped {run['wrapped_cpu_s']:.2f}s "
                      f"({run['wrapped_cpu_s'] - run['plain_cpu_s']:+.2f}s)")
                print(f"    buildtel run latency: {fixed['pre_spawn_s'] * 1000:.0f} ms launch-to-spawn (CLI start-up), "
                      f"{fixed['post_exit_s'] * 1000:.0f} ms exit-to-return; {sessions} sessions published")
                result.update(run_overhead_ratio=round(run["overhead_ratio"], 4),
                              run_plain_median_s=round(run["plain_median_s"], 3),
                              run_wrapped_median_s=round(run["wrapped_median_s"], 3),
                              run_cpu_overhead_s=round(run["wrapped_cpu_s"] - run["plain_cpu_s"], 3),
                              run_pre_spawn_s=round(fixed["pre_spawn_s"], 3),
                              run_post_exit_s=round(fixed["post_exit_s"], 3), run_sessions_published=sessions)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
