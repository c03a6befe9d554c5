"""Load the machine on purpose so the test suite is run the way a busy build farm runs it.

Starts N busy-loop processes (default: one per core) and keeps them running until it is
interrupted or --seconds elapse. A suite that only passes on an idle machine has tests that
wait on time they do not control; running it next to this hog shows them (docs/testing.md).

    python tests/tools/cpu_hog.py               # one spinner per core until Ctrl-C
    python tests/tools/cpu_hog.py -n 2 --seconds 900
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time


def _spin(stop_at: float) -> None:
    """Burn one core with pure-Python arithmetic until stop_at (monotonic); never sleeps."""
    x = 0
    while time.monotonic() < stop_at:
        for i in range(100_000):
            x = (x * 31 + i) & 0xFFFFFFFF


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--procs", type=int, default=os.cpu_count() or 2,
                        help="busy processes to start (default: number of cores)")
    parser.add_argument("--seconds", type=float, default=24 * 3600.0,
                        help="stop after this long (default: a day, i.e. until interrupted)")
    args = parser.parse_args(argv)
    if args.procs < 1:
        parser.error("--procs must be at least 1")
    stop_at = time.monotonic() + args.seconds
    procs = [multiprocessing.Process(target=_spin, args=(stop_at,), daemon=True)
             for _ in range(args.procs)]
    for p in procs:
        p.start()
    print(f"cpu_hog: {args.procs} spinner(s) running, pids "
          f"{' '.join(str(p.pid) for p in procs)}; stop with SIGINT/SIGTERM", file=sys.stderr, flush=True)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
