"""A full analytics report over 10,000 sessions x 200 targets (2,000,000 target runs), target <= 1 s.

The sessions are synthetic (``buildtel.services.analyzer.synthetic``: a DAG list-scheduled on 8
workers, cache hits, a flaky target, failures, three branches), encoded to MessagePack
and decoded again, so they are the same kind of objects the service reads from its
history.  Timed, in one run:

  1. ours: ``TelemetryAnalyzer().report(sessions)`` (numpy engine when installed), the
     median of ``--repeat`` runs: every figure of the report, bottlenecks included;
  2. ours, pure-Python engine (what runs where numpy is not installed);
  3. baseline: the same per-target and per-build figures computed the obvious way
     (group in a dict, then the ``statistics`` module: fmean, median, quantiles, stdev,
     linear_regression, correlation), once.

    python -m benchmarks.bench_analyzer [--sessions 10000] [--targets 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import msgspec

from buildtel.services.analyzer import columns
from buildtel.services.analyzer.analytics import TelemetryAnalyzer
from buildtel.services.analyzer.columns import gc_paused
from buildtel.services.analyzer.synthetic import Scenario, generate
from buildtel.shared.protocol import BuildSession


def naive_report(sessions: list[BuildSession]) -> dict[str, object]:
    """The baseline: straightforward Python with the statistics module."""
    durs = [s.duration_s for s in sessions if s.outcome != "abandoned"]
    q = statistics.quantiles(durs, n=100, method="inclusive")
    out: dict[str, object] = {
        "mean": statistics.fmean(durs), "median": statistics.median(durs), "p90": q[89], "p95": q[94],
        "stdev": statistics.stdev(durs), "trend": statistics.linear_regression(range(len(durs)), durs),
    }
    groups: dict[str, list[tuple[int, float, str, str]]] = {}
    for i, s in enumerate(sessions):
        for t in s.targets:
            if t.status in ("success", "failed"):
                groups.setdefault(t.name, []).append((i, t.duration_s, t.cache, t.status))
    targets = {}
    for name, runs in groups.items():
        xs = [r[0] for r in runs]
        ys = [r[1] for r in runs]
        qs = statistics.quantiles(ys, n=100, method="inclusive") if len(ys) > 1 else [ys[0]] * 99
        targets[name] = (statistics.fmean(ys), statistics.median(ys), qs[94], statistics.stdev(ys),
                         sum(r[2] in ("local_hit", "remote_hit") for r in runs),
                         sum(r[3] == "failed" for r in runs), statistics.linear_regression(xs, ys),
                         statistics.correlation(xs, ys) ** 2)
    out["targets"] = targets
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--targets", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the (slow) statistics-module baseline")
    args = ap.parse_args()

    t = time.perf_counter()
    with gc_paused():
        raw = msgspec.msgpack.encode(generate(Scenario(
            sessions=args.sessions, targets=args.targets, seed=42, flaky=("//pkg5/lib5:t5",), fail_rate=0.03,
            branches=("main", "release", "dev"))))
    gen_s = time.perf_counter() - t
    gc.collect()
    t = time.perf_counter()
    with gc_paused():
        sessions = msgspec.msgpack.decode(raw, type=list[BuildSession])
    decode_s = time.perf_counter() - t
    runs = sum(len(s.targets) for s in sessions)
    print(f"{len(sessions):,} sessions x {args.targets} targets = {runs:,} target runs "
          f"({len(raw) / 1e6:.0f} MB msgpack; generated in {gen_s:.1f} s, decoded in {decode_s:.2f} s)")
    print(f"engine: {columns.ENGINE}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    times, cpu = [], []
    rep = None
    for _ in range(args.repeat):
        t, c = time.perf_counter(), time.process_time()
        rep = TelemetryAnalyzer().report(sessions)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    ours = statistics.median(times)
    assert rep is not None and rep.sessions == len(sessions) and len(rep.targets) == args.targets
    # CPU time is reported too: on a shared machine the wall time mostly measures the neighbours.
    print(f"report ({columns.ENGINE}):  median {ours:.3f} s of {args.repeat} runs "
          f"(min {min(times):.3f}, max {max(times):.3f}); CPU median {statistics.median(cpu):.3f} s")

    t = time.perf_counter()
    py = TelemetryAnalyzer(engine="python").report(sessions)
    py_s = time.perf_counter() - t
    assert [x.name for x in py.targets] == [x.name for x in rep.targets]
    print(f"report (pure Python): {py_s:.3f} s")

    base_s = None
    if not args.no_baseline:
        t = time.perf_counter()
        with gc_paused():
            base = naive_report(sessions)
        base_s = time.perf_counter() - t
        check = rep.targets[0]
        mean, median = base["targets"][check.name][:2]  # type: ignore[index]
        assert abs(mean - check.mean_s) < 1e-9 * mean and abs(median - check.median_s) < 1e-9 * median
        print(f"baseline (dict + statistics module, fewer figures): {base_s:.3f} s -> ours is "
              f"{base_s / ours:.1f}x faster")
    print(f"target: report_s_10k <= 1.0 s: {'PASS' if ours <= 1.0 else 'FAIL'}")
    print(json.dumps({
        "report_s_10k": round(ours, 4), "report_min_s_10k": round(min(times), 4),
        "report_cpu_s_10k": round(statistics.median(cpu), 4), "engine": columns.ENGINE,
        "python_engine_s_10k": round(py_s, 4),
        "baseline_statistics_s_10k": None if base_s is None else round(base_s, 4),
        "speedup_vs_baseline": None if base_s is None else round(base_s / ours, 2),
        "sessions": len(sessions), "target_runs": runs, "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
