"""Benchmark: ``buildtel report --last N`` end to end, through the storage service and the analyzer.

    .venv/bin/python -m benchmarks.bench_report [--sessions 10000] [--targets 200] [--last 10000] [--runs 3]
                                                 [--dir DIR] [--cli-arg ARG ...]

A store of ``--sessions`` synthetic sessions (``services/analyzer/synthetic.py``, finishing in
the last days so retention keeps them) is written straight into ``DIR/telemetry`` (kept and
reused when ``--dir`` is given and already holds it); fresh embedded NATS and Redis are
started, then the storage and analyzer services as processes of their own, and the CLI runs
``report --last N --format json`` ``--runs`` times as a whole process (interpreter start,
imports, the request, the JSON written).  Printed: each run's wall time, the CLI's peak RSS,
the storage and analyzer processes' peak RSS (VmHWM) after the runs; the last line is JSON
(``report_e2e_s`` the median wall time, ``analyzer_peak_mb``, ``storage_peak_mb``, ``cli_peak_mb``).
``--cli-arg`` passes more arguments to ``report`` (e.g. ``--cli-arg=--source=storage`` for the
analyzer of before the columns endpoint, whose ``auto`` source would read its empty Redis history).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from buildtel.services.analyzer.synthetic import Scenario, generate
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.store import TelemetryStorage
from buildtel.shared.engines import NatsEngine, RedisEngine
from buildtel.shared.subjects import Subjects

NS = "benchrep"
CHUNK = 500  # sessions generated and appended at a time (bounded memory while writing)


def write_store(directory: Path, sessions: int, targets: int) -> None:
    """``sessions`` synthetic sessions, the newest finishing about now, appended without fsync."""
    interval = 60.0
    start = time.time() - sessions * interval - 3600.0
    store = TelemetryStorage(directory, max_sessions=sessions + 1, fsync=False)

    async def run() -> None:
        await store.open()
        try:
            for k in range(0, sessions, CHUNK):
                n = min(CHUNK, sessions - k)
                batch = generate(Scenario(sessions=n, targets=targets, seed=k + 1, start=start + k * interval,
                                          interval_s=interval, flaky=("//pkg5/lib5:t5",), fail_rate=0.03,
                                          branches=("main", "release", "dev")))
                # Ids of each chunk start from the same seed sequence: make them unique by position.
                batch = [msgspec.structs.replace(s, id=f"{k + i + 1:032x}") for i, s in enumerate(batch)]
                await store.append_many(batch)
        finally:
            await store.close()

    asyncio.run(run())


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_ready(nats_url: str, sessions: int) -> None:
    import nats

    from buildtel.services.analyzer.api import AnalyzerClient

    nc = await nats.connect(nats_url)
    try:
        storage = StorageClient(nc, Subjects(NS), timeout=5)
        for _ in range(1200):  # the storage service opens the store first (bounded wait)
            try:
                if (await storage.stats()).sessions >= sessions:
                    break
            except Exception:  # noqa: BLE001 - not up yet: poll again
                pass
            await asyncio.sleep(0.1)
        else:
            raise SystemExit("the storage service did not come up with the store")
        for _ in range(600):
            try:
                await AnalyzerClient(nc, NS, timeout=2, attempts=1).stats()
                return
            except Exception:  # noqa: BLE001 - not up yet: poll again
                await asyncio.sleep(0.1)
        raise SystemExit("the analyzer did not come up")
    finally:
        await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--targets", type=int, default=200)
    ap.add_argument("--last", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", help="keep the store here (reused by the next run with the same --dir)")
    ap.add_argument("--cli-arg", action="append", default=[], help="one more argument for `report`")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.dir) if args.dir else Path(tmp)
        cache = base / "cache"
        marker = base / f"store-{args.sessions}x{args.targets}"
        if not marker.exists():
            t = time.perf_counter()
            write_store(cache / "telemetry", args.sessions, args.targets)
            marker.touch()
            print(f"wrote {args.sessions} sessions x {args.targets} targets in {time.perf_counter() - t:.1f} s")
        disk = sum(p.stat().st_size for p in (cache / "telemetry").rglob("*") if p.is_file())
        print(f"store: {disk / 1e6:.0f} MB on disk ({disk / args.sessions / 1e3:.1f} KB per session)")
        n = NatsEngine(Path(tmp) / "nats").start()
        r = RedisEngine(Path(tmp) / "redis").start()
        nats_url = n.url_for("operator")
        env = dict(os.environ, BUILDER_TELEMETRY_NATS_URL=nats_url, BUILDER_TELEMETRY_REDIS_URL=r.url,
                   BUILDER_TELEMETRY_NAMESPACE=NS, BUILDER_TELEMETRY_CACHE_DIR=str(cache),
                   BUILDER_TELEMETRY_MAX_SESSIONS=str(args.sessions + 1), BUILDER_TELEMETRY_LOG_LEVEL="warning")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        procs = {name: subprocess.Popen([sys.executable, "-m", f"buildtel.services.{name}"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name in ("storage", "analyzer")}
        try:
            asyncio.run(wait_ready(nats_url, args.sessions))
            cmd = [sys.executable, "-m", "buildtel.cli.main", "report", "--last", str(args.last), "--format", "json",
                   "--timeout", "600", *args.cli_arg]
            walls: list[float] = []
            cli_peak = 0.0
            sessions = -1
            for i in range(args.runs):
                t = time.perf_counter()
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = proc.communicate()
                wall = time.perf_counter() - t
                if proc.returncode != 0:
                    raise SystemExit(f"report failed ({proc.returncode}): {err.decode()[-2000:]}")
                sessions = json.loads(out)["sessions"]
                rss = _child_peak_mb()
                cli_peak = max(cli_peak, rss)
                walls.append(wall)
                print(f"run {i + 1}: {wall:.2f} s, {sessions} sessions, CLI peak RSS {rss:.0f} MB", flush=True)
            peaks = {name: vm_hwm_mb(p.pid) for name, p in procs.items()}
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
            for p in procs.values():
                p.wait(timeout=60)
            n.stop()
            r.stop()
    result = {"sessions_stored": args.sessions, "targets": args.targets, "last": args.last,
              "sessions_reported": sessions, "report_e2e_s": round(statistics.median(walls), 3),
              "report_e2e_runs_s": [round(w, 3) for w in walls],
              "analyzer_peak_mb": round(peaks["analyzer"]), "storage_peak_mb": round(peaks["storage"]),
              "cli_peak_mb": round(cli_peak)}
    print(json.dumps(result))


def _child_peak_mb() -> float:
    import resource

    # ru_maxrss of waited-for children is the largest of any of them: the CLI runs are the
    # only children waited for at that point (the services are still running).
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


if __name__ == "__main__":
    main()
