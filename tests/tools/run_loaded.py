"""Run the whole test suite N times in a row next to a CPU hog and report each run.

    .venv/bin/python tests/tools/run_loaded.py --runs 5            # hog on every core
    .venv/bin/python tests/tools/run_loaded.py --runs 1 -- tests/health   # extra pytest args

Each run's output goes to --out/run<N>.log (and junit XML beside it); one line per run says
its wall time and the failed tests. Exit status 0 only when every run passed. The hog
(tests/tools/cpu_hog.py) is stopped however this ends. See docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy processes (0: no load)")
    p.add_argument("--out", type=Path, default=Path("/tmp/buildtel-loaded-runs"))
    p.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (default: the whole suite)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    hog = None
    if args.hogs > 0:
        hog = subprocess.Popen([sys.executable, str(REPO / "tests/tools/cpu_hog.py"), "-n", str(args.hogs)])
    failed_runs = 0
    try:
        for n in range(1, args.runs + 1):
            log = args.out / f"run{n}.log"
            t0 = time.monotonic()
            with log.open("w") as fh:
                rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     f"--junitxml={args.out / f'run{n}.xml'}", *args.pytest_args],
                                    cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
            wall = time.monotonic() - t0
            text = log.read_text(errors="replace")
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
            summary = (text.strip().splitlines() or ["(no output)"])[-1]
            failed_runs += rc != 0
            print(f"run {n}: exit {rc}, wall {wall:.0f} s, {summary}", flush=True)
            for t in failed:
                print(f"    {t}", flush=True)
    finally:
        if hog is not None:
            hog.send_signal(signal.SIGTERM)
            try:
                hog.wait(timeout=10)
            except subprocess.TimeoutExpired:
                hog.kill()
    print(f"{args.runs - failed_runs}/{args.runs} runs passed; logs in {args.out}", flush=True)
    return 1 if failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
