"""History at farm scale (issue 14): a store of N sessions x T targets, measured through the services.

    .venv/bin/python -m benchmarks.bench_scale [--sessions 1000000] [--targets 20] [--reuse DIR]
                                               [--requests 200] [--budget-s 240] [--tail 1600]

1. **Store**: ``DIR/telemetry`` (default ``.builder-cache/bench-scale/<N>x<T>``) is filled with a
   farm-shaped history (``benchmarks.scale_gen``: 10,000 builds a day) through the public store
   API, ``TelemetryStorage.append_encoded`` in batches of ``--batch`` with fsync off; kept for
   later runs (generation resumes if interrupted).  Bulk append rate: first and last tenth.
2. **Store process** (a child, ``benchmarks.scale_probes``): ``open()`` time and index RSS; then
   ``--tail`` new sessions appended as the service appends (batches of 32, fsync, retention check
   after each: the store is full, so each batch drops the oldest) against a raw-write baseline
   (same bytes, same batches, one fsync each, same file system); random stored ids sampled for ``get``.
3. **Storage service** (``python -m buildtel.services.storage``, embedded NATS + Redis): process
   start to the first ``stats`` reply (``open_s``), against the same on an empty store; RSS after
   open against the empty store's (``rss_mb_per_100k``).  Then, round-robin until ``--requests``
   rounds or ``--budget-s``: a bare NATS request/reply to a trivial responder process (the
   baseline), ``get`` of a random id, the list (``recent(50)``, or ``summaries`` once the API has
   it), and selective filters (rare branch, one agent of 100, rare target, failed, absent branch).
   Then ``--tail`` more sessions published on ``sessions.completed`` as the collector would:
   time until the service has stored them all (``append_per_s``) and retention is back to N,
   with ``get`` requests running meanwhile (what a reader sees while a full store ingests).
4. **Report end to end**: the analyzer service too, then ``buildtel report --last 10000`` (the
   analyzer reads storage's report rows) as a whole process (and ``--last 100000`` when the store
   holds that many): wall time,
   the CLI's peak RSS and the peak RSS growth of the analyzer and storage processes.  Stopped (and
   reported as such) if their sum passes ``--mem-cap-mb``.

Page cache: warm (the store was just written or read; dropping caches needs root).  The last line
printed is JSON: sessions_stored, rss_mb_per_100k, disk_bytes_per_session, open_s, get_p95_ms,
list_p95_ms, filter_p95_ms, report_e2e_s_10k, report_e2e_mb_10k and more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

from benchmarks import scale_gen as gen
from benchmarks import scale_procs as procs
from benchmarks.scale_probes import (
    FILTERS,
    NS,
    ROOT,
    buildtel,
    dir_bytes,
    latencies,
    pct,
    run_child,
    service_append,
    service_env,
    start_storage,
    wait_analyzer,
)
from buildtel.services.storage.api import StorageClient
from buildtel.shared.engines import NatsEngine, RedisEngine
from buildtel.shared.subjects import Subjects


async def measure(args: argparse.Namespace, root: Path, n: int, tmp: Path, urls: tuple[str, str],
                  ids: list[str]) -> dict[str, Any]:
    nats_url, redis_url = urls
    res: dict[str, Any] = {}
    nc = await nats.connect(nats_url)
    echo = subprocess.Popen([sys.executable, "-m", "benchmarks.scale_probes", "echo"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, BENCH_NATS_URL=nats_url))
    running: list[Any] = [echo]
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        # The floor: the same service, same engines, an empty store.
        empty, res["open_s_empty"] = await start_storage(nc, service_env(nats_url, redis_url, tmp / "empty", n),
                                                         tmp / "storage-empty.log", 60)
        res["rss_empty_mb"] = procs.rss_mb(empty.pid)
        procs.stop(empty)
        log = tmp / "storage.log"
        storage, res["open_s"] = await start_storage(nc, service_env(nats_url, redis_url, root, n), log,
                                                     args.open_limit_s)
        running.append(storage)
        res["rss_open_mb"], res["hwm_open_mb"] = procs.rss_mb(storage.pid), procs.hwm_mb(storage.pid)
        for line in log.read_text(errors="replace").splitlines():
            if '"storage.started"' in line:
                res["started_log"] = {k: v for k, v in json.loads(line).items()
                                      if k not in ("event", "level", "timestamp", "owner", "directory")}
        extra = {k: v for k, v in res.get("started_log", {}).items()
                 if k not in ("sessions", "damaged_regions", "max_sessions", "service", "namespace")}
        if extra:  # e.g. an open duration, should the service start logging one
            print(f"storage.started also logged: {extra}")
        stats = await StorageClient(nc, Subjects(NS)).stats()
        res["service_sessions"] = stats.sessions
        print(f"storage service ready after {res['open_s']:.2f} s (empty store: {res['open_s_empty']:.2f} s); "
              f"RSS {res['rss_open_mb']:,.0f} MB (empty store {res['rss_empty_mb']:,.0f} MB, peak while opening "
              f"{res['hwm_open_mb']:,.0f} MB); {stats.sessions:,} sessions", flush=True)
        lat = await latencies(nc, ids, args.requests, args.budget_s)
        res["latency_ms"] = {k: {"p50": round(pct(v, 0.5), 2), "p95": round(pct(v, 0.95), 2), "n": len(v)}
                             for k, v in lat.items()}
        res["filter_all_ms"] = [x for k, v in lat.items() if k.startswith("filter_") for x in v]
        res["rss_after_queries_mb"] = procs.rss_mb(storage.pid)
        res["list_reply_bytes"] = sum(len(gen._encoder.encode(s))
                                      for s in await StorageClient(nc, Subjects(NS), timeout=60).recent(50))
        if args.tail:
            print(f"publishing {args.tail:,} sessions to the running service ...", flush=True)
            res["service_append"] = await service_append(nc, n, args.tail, args.targets, ids)
            res["service_sessions"] = (await StorageClient(nc, Subjects(NS), timeout=60).stats()).sessions
        if args.no_report:
            return res
        analyzer = procs.spawn_service("buildtel.services.analyzer",
                                       service_env(nats_url, redis_url, tmp / "analyzer", n), tmp / "analyzer.log")
        running.append(analyzer)
        await wait_analyzer(nc, analyzer)
        cli_env = service_env(nats_url, redis_url, tmp / "cli", n)
        cli_env["BUILDER_TELEMETRY_LOG_LEVEL"] = "warning"
        res["reports"] = {}
        for last in (10_000, 100_000):
            if last > n:
                continue
            argv = [*buildtel(), "report", "--last", str(last), "--timeout", str(args.report_timeout)]
            print(f"running {' '.join(argv[-5:])} ...", flush=True)
            run = await asyncio.to_thread(procs.run_cli, argv, cli_env,
                                          {"analyzer": analyzer.pid, "storage": storage.pid}, args.mem_cap_mb,
                                          tmp / f"report-{last}.out")
            res["reports"][last] = run
            if not run.ok:  # the analyzer may still be busy (and big): start afresh for the next one
                procs.stop(analyzer, timeout=5)
                analyzer = procs.spawn_service("buildtel.services.analyzer",
                                               service_env(nats_url, redis_url, tmp / "analyzer", n),
                                               tmp / "analyzer.log")
                running.append(analyzer)
                await wait_analyzer(nc, analyzer)
        return res
    finally:
        await nc.close()
        for p in reversed(running):
            procs.stop(p)


def ensure_store(args: argparse.Namespace, root: Path) -> gen.BuildFigures:
    fig = gen.read_meta(root)
    want = (args.sessions, args.targets)
    if fig is not None and (fig.shape.sessions, fig.shape.targets) != want:
        raise SystemExit(f"{root} holds a history of {fig.shape.sessions} x {fig.shape.targets}, not {want[0]} x "
                         f"{want[1]}: choose another --reuse directory")
    if fig is not None and fig.complete:
        print(f"reusing {root} (built {time.strftime('%Y-%m-%d %H:%M', time.gmtime(fig.built_at))} UTC)")
        return fig
    root.mkdir(parents=True, exist_ok=True)
    if fig is None:
        fig = gen.BuildFigures(shape=gen.HistoryShape(sessions=args.sessions, targets=args.targets, seed=1,
                                                      t_end=time.time()))
        gen.write_meta(root, fig)
    print(f"generating {args.sessions:,} sessions x {args.targets} targets into {root} "
          f"(batches of {args.batch}, fsync off)", flush=True)
    fig = asyncio.run(gen.build(root, fig, batch=args.batch, progress=lambda s: print(s, flush=True)))
    gen.write_meta(root, fig)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=1_000_000)
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--reuse", metavar="DIR", help="the cached store (default .builder-cache/bench-scale/<N>x<T>)")
    ap.add_argument("--batch", type=int, default=2000, help="sessions per append while generating (default 2000)")
    ap.add_argument("--tail", type=int, default=1600, help="sessions appended as the service does (default 1600)")
    ap.add_argument("--requests", type=int, default=200, help="rounds of requests at most (default 200)")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="stop the rounds after this long, but after 20 rounds at least (default 240)")
    ap.add_argument("--open-limit-s", type=float, default=1800.0, help="give up on the service's open after this")
    ap.add_argument("--report-timeout", type=float, default=900.0, help="the CLI's --timeout (default 900)")
    ap.add_argument("--mem-cap-mb", type=float, default=min(12_000.0, 0.6 * procs.mem_available_mb()),
                    help="stop a report whose processes grow past this (default 60%% of available, <= 12 GB)")
    ap.add_argument("--no-report", action="store_true", help="skip the end-to-end reports")
    args = ap.parse_args()
    n = args.sessions
    root = Path(args.reuse) if args.reuse else ROOT / ".builder-cache" / "bench-scale" / f"{n}x{args.targets}"
    fig = ensure_store(args, root)
    print(f"history: {n:,} sessions x {args.targets} targets, ~{fig.mean_payload_bytes / 1024:.1f} KiB msgpack each; "
          f"generated at {fig.appended / fig.generate_s:,.0f}/s (benchmark's cost); bulk append (batches of "
          f"{fig.batch}, no fsync) {fig.append_per_s_first:,.0f}/s over the first tenth, "
          f"{fig.append_per_s_last:,.0f}/s over the last")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; page cache warm", flush=True)

    st = run_child(["store", str(root), str(n), str(args.tail), str(min(args.requests, 1000))])
    tail_s = st["tail_append_s"] + st["tail_retention_s"]
    append_per_s = st["tail"] / tail_s
    raw_per_s = st["tail"] / st["raw_write_s"]
    apparent, allocated = dir_bytes(root / "telemetry")
    print(f"store open (in process): {st['open_s']:.2f} s for {st['count']:,} sessions in {st['segments']} "
          f"segments; index RSS {st['rss_open_mb'] - st['rss_before_mb']:,.0f} MB "
          f"(peak while opening {st['hwm_open_mb'] - st['rss_before_mb']:,.0f} MB)")
    print(f"append at a full store (batches of 32, fsync, retention check each): {append_per_s:,.0f} sessions/s "
          f"({st['tail_retention_s'] / st['tail'] * 32 * 1e3:.1f} ms retention per batch); raw write of the same "
          f"bytes + fsync per batch {raw_per_s:,.0f}/s -> {raw_per_s / append_per_s:.1f}x slower than raw")
    print(f"disk: {allocated / 1e9:.2f} GB allocated ({apparent / 1e9:.2f} GB apparent) = "
          f"{allocated / st['count_after_tail']:,.0f} bytes per session", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as t:
        tmp = Path(t)
        with NatsEngine(tmp / "nats") as ne, RedisEngine(tmp / "redis") as re_:
            res = asyncio.run(measure(args, root, n, tmp, (ne.url_for("operator"), re_.url), st["ids"]))
    print_results(args, n, fig, st, res, append_per_s, raw_per_s, allocated)


def print_results(args: argparse.Namespace, n: int, fig: gen.BuildFigures, st: dict[str, Any], res: dict[str, Any],
                  append_per_s: float, raw_per_s: float, allocated: int) -> None:
    lat = res["latency_ms"]
    base = lat["bare_nats"]["p95"]
    rounds = lat["bare_nats"]["n"]
    base50 = lat["bare_nats"]["p50"]
    print(f"requests through the storage service ({rounds} rounds, round-robin), p50 / p95 ms, each vs bare NATS "
          f"request/reply ({base50:.2f} / {base:.2f} ms):")
    for name, v in lat.items():
        if name != "bare_nats":
            print(f"  {name:<22} {v['p50']:>9.2f} {v['p95']:>9.2f}   x{v['p50'] / base50:,.1f} / "
                  f"x{v['p95'] / base:,.1f}")
    filter_p95 = pct(res["filter_all_ms"], 0.95)
    list_kind = "list_summaries" if "list_summaries" in lat else "list_recent"
    print(f"  filters pooled: p95 {filter_p95:.2f} ms; list = {list_kind} ({res['list_reply_bytes'] / 1e6:.2f} MB "
          f"for recent(50))")
    grow = res["rss_open_mb"] - res["rss_empty_mb"]
    per_100k = grow / n * 1e5
    sa = res.get("service_append")
    svc_per_s = None
    if sa:
        svc_per_s = sa["tail"] / sa["stored_s"] if sa["stored_s"] else None
        print(f"append through the service (JetStream -> storage, store full): {sa['tail']:,} sessions published in "
              f"{sa['published_s']:.2f} s, all stored after {sa['stored_s']:.2f} s "
              f"({svc_per_s or 0:,.0f} sessions/s), retention back to {n:,} after {sa['settled_s']:.2f} s "
              f"(0 = not within the limit)")
        during = sa["get_during_ms"]
        print(f"  get meanwhile: p50 {pct(during, 0.5):.2f} ms, p95 {pct(during, 0.95):.2f} ms, "
              f"max {max(during, default=0):.0f} ms over {len(during)} requests")
    print(f"storage RSS: {res['rss_open_mb']:,.0f} MB after open, {res['rss_empty_mb']:,.0f} MB on an empty store "
          f"-> {per_100k:,.0f} MB per 100,000 sessions; {res['rss_after_queries_mb']:,.0f} MB after the queries")
    out: dict[str, Any] = {
        "sessions_stored": res["service_sessions"], "targets": args.targets,
        "rss_mb_per_100k": round(per_100k, 1), "disk_bytes_per_session": round(allocated / st["count_after_tail"]),
        "open_s": round(res["open_s"], 2), "open_s_empty": round(res["open_s_empty"], 2),
        "open_s_store": round(st["open_s"], 2), "page_cache": "warm",
        "get_p95_ms": lat["get"]["p95"], "list_p95_ms": lat[list_kind]["p95"], "list_kind": list_kind,
        "list_recent_p95_ms": lat["list_recent"]["p95"], "filter_p95_ms": round(filter_p95, 2),
        **{f"filter_{k}_p95_ms": lat[f"filter_{k}"]["p95"] for k in FILTERS},
        "bare_nats_p95_ms": base, "rounds": rounds,
        "append_per_s": round(svc_per_s) if svc_per_s else None,
        "get_p95_ms_during_ingest": round(pct(sa["get_during_ms"], 0.95), 2) if sa else None,
        "append_per_s_store": round(append_per_s),
        "append_only_per_s_store": round(st["tail"] / st["tail_append_s"]),
        "retention_ms_per_batch": round(st["tail_retention_s"] / st["tail"] * 32 * 1e3, 1),
        "raw_write_per_s": round(raw_per_s),
        "bulk_append_per_s_first": round(fig.append_per_s_first),
        "bulk_append_per_s_last": round(fig.append_per_s_last),
        "mean_session_bytes": round(fig.mean_payload_bytes), "rss_open_mb": round(res["rss_open_mb"]),
        "rss_empty_mb": round(res["rss_empty_mb"]), "report_e2e_s_10k": None, "report_e2e_mb_10k": None,
    }
    for last, run in res.get("reports", {}).items():
        key = f"{last // 1000}k"
        growth = ", ".join(f"{k} +{v:,.0f} MB" for k, v in run.peak_growth_mb.items())
        if run.ok:
            print(f"buildtel report --last {last:,}: {run.wall_s:.2f} s; peak RSS: CLI {run.maxrss_mb:,.0f} MB, "
                  f"{growth} -> {run.total_mb:,.0f} MB in all")
            print("  | " + "\n  | ".join(run.stdout_head.splitlines()[:3]))  # what it reported, to check
        else:
            why = run.aborted or f"exit {run.returncode}"
            print(f"buildtel report --last {last:,}: FAILED after {run.wall_s:.1f} s ({why}; {growth}): "
                  f"{run.stderr_tail.strip()[-300:]}")
        out[f"report_e2e_s_{key}"] = round(run.wall_s, 2) if run.ok else None
        out[f"report_e2e_mb_{key}"] = round(run.total_mb) if run.ok else None
        detail: dict[str, Any] = {"ok": run.ok, "wall_s": round(run.wall_s, 2), "cli_mb": round(run.maxrss_mb),
                                  **{f"{k}_mb": round(v) for k, v in run.peak_growth_mb.items()}}
        if not run.ok:
            detail["failed"] = run.aborted or f"exit {run.returncode}"
        out[f"report_e2e_{key}_detail"] = detail
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
