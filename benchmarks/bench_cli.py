"""Benchmark: the ``buildtel`` CLI as whole processes, side by side (hyperfine-like).

    .venv/bin/python -m benchmarks.bench_cli [--runs N] [--lines N] [--flamegraph-pl PATH]

Times, in one run and interleaved round-robin (so a busy machine slows every command alike):

* ``python -c pass``: the interpreter's own start-up, the floor under any Python CLI;
* ``buildtel --help``;
* ``buildtel flamegraph --folded F -o out.svg`` on a 100,000-line folded file
  (``benchmarks.bench_flamegraph.generate``: build-shaped stacks 5-20 frames deep);
* ``perl flamegraph.pl F > out.svg`` on the same file, when flamegraph.pl is found
  (``--flamegraph-pl``, ``$FLAMEGRAPH_PL``, or ``.builder-cache/test-assets/flamegraph.pl``,
  which the flamegraph tests fetch from the perun-toolsuite sdist).

Each command runs ``--warmup`` times untimed first (this also writes the ``__pycache__`` an
installed package has; ``PYTHONDONTWRITEBYTECODE`` is dropped from the children's environment,
or every run would compile the modules again), then ``--runs`` times.  Per run: wall time (the
goals' measure) and CPU time (user + system from the children's rusage: what the command costs,
nearly independent of other load); medians reported.  Goals: ``help_ms`` <= 150,
``flamegraph_100k_vs_pl`` >= 5 (flamegraph.pl's median over buildtel's).  The last line printed
is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_flamegraph import generate

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PL = ROOT / ".builder-cache" / "test-assets" / "flamegraph.pl"


def _buildtel() -> list[str]:
    """The installed console script next to this interpreter (what a user runs), else the module."""
    script = Path(sys.executable).parent / "buildtel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "buildtel.cli.main"]


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _once(argv: list[str], stdout: Path | None, env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; CPU (user + system) barely moves with other load."""
    out = open(stdout, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        c0, t0 = _cpu(), time.perf_counter()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, env=env, cwd=ROOT, check=False)
        took = time.perf_counter() - t0, _cpu() - c0
    finally:
        if stdout:
            out.close()  # type: ignore[union-attr]
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="timed runs of each command (default 15)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs of each command first (default 2)")
    ap.add_argument("--lines", type=int, default=100_000, help="lines in the folded file (default 100000)")
    ap.add_argument("--flamegraph-pl", default=os.environ.get("FLAMEGRAPH_PL") or str(DEFAULT_PL))
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    bt = _buildtel()
    pl = Path(args.flamegraph_pl)
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        folded = Path(tmp) / "stacks.folded"
        generate(folded, args.lines)
        commands: dict[str, tuple[list[str], Path | None]] = {
            "python -c pass": ([sys.executable, "-c", "pass"], None),
            "buildtel --help": ([*bt, "--help"], None),
            "buildtel flamegraph --folded": ([*bt, "flamegraph", "--folded", str(folded), "-o",
                                              str(Path(tmp) / "bt.svg")], None),
        }
        if pl.exists():
            commands["perl flamegraph.pl"] = (["perl", str(pl), str(folded)], Path(tmp) / "pl.svg")
        else:
            print(f"flamegraph.pl not found at {pl}: the ratio is not measured "
                  "(run tests/flamegraph/test_fg_vs_flamegraph_pl.py once to fetch it)", file=sys.stderr)
        for argv, out in commands.values():
            for _ in range(args.warmup):
                _once(argv, out, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):  # round-robin: load changes hit every command alike
            for name, (argv, out) in commands.items():
                wall, used = _once(argv, out, env)
                times[name].append(wall)
                cpu[name].append(used)

    print(f"{'command':<32} {'median':>9} {'min':>9} {'max':>9} {'CPU':>9}   ({args.runs} runs, {args.lines:,} lines, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    for name, ts in times.items():
        print(f"{name:<32} {med[name] * 1e3:>7.0f}ms {min(ts) * 1e3:>7.0f}ms {max(ts) * 1e3:>7.0f}ms "
              f"{med_cpu[name] * 1e3:>7.0f}ms")
    result: dict[str, float | int] = {
        "runs": args.runs,
        "lines": args.lines,
        "python_floor_ms": round(med["python -c pass"] * 1e3, 1),
        "help_ms": round(med["buildtel --help"] * 1e3, 1),
        "flamegraph_100k_ms": round(med["buildtel flamegraph --folded"] * 1e3, 1),
        "help_cpu_ms": round(med_cpu["buildtel --help"] * 1e3, 1),
        "flamegraph_100k_cpu_ms": round(med_cpu["buildtel flamegraph --folded"] * 1e3, 1),
    }
    if "perl flamegraph.pl" in med:
        result["flamegraph_pl_100k_ms"] = round(med["perl flamegraph.pl"] * 1e3, 1)
        result["flamegraph_100k_vs_pl"] = round(med["perl flamegraph.pl"] / med["buildtel flamegraph --folded"], 2)
        result["flamegraph_100k_vs_pl_cpu"] = round(med_cpu["perl flamegraph.pl"]
                                                    / med_cpu["buildtel flamegraph --folded"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
