"""Importing a JUnit XML report of 100,000 test cases (docs/performance.md, docs/tests.md).

A report of ``--cases`` cases (default 100,000: 1 in 50 failed with a 300-character message and
a traceback, 1 in 100 skipped, suites of 500 cases) is generated in a temporary directory, then
timed, best of ``--runs``:

- ``buildtel import junit FILE`` as a whole process (interpreter start, parse, session build,
  encode, publish).  It publishes to the stack the usual settings name (``BUILDER_TELEMETRY_*``
  or the one ``buildtel up`` started); with ``--dry-run`` (or no stack answering) it is
  ``buildtel import junit --dry-run FILE``, which stops before encoding and publishing;
- the baselines in the same run: a bare ``xml.etree.ElementTree.parse`` of the file and
  ``json.loads`` of the same cases as JSON (in this process, no interpreter start).

Goal: ``junit_100k_s`` <= 5 s.  The last line is one JSON object with every figure.

Run: ``.venv/bin/python benchmarks/bench_tests.py [--cases N] [--runs N] [--dry-run]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

MESSAGE = "AssertionError: expected the widget count to match after a reload of the cache " * 4


def generate(path: Path, cases: int, *, per_suite: int = 500, fail_every: int = 50, skip_every: int = 100,
             seed: str = "") -> dict[str, int]:
    """Write a JUnit XML report of ``cases`` cases to ``path``; counts by outcome.  ``seed``
    makes the content (and so the imported session's id) differ between runs."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    with path.open("w", encoding="utf-8") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n')
        for i in range(cases):
            if i % per_suite == 0:
                if i:
                    f.write("</testsuite>\n")
                f.write(f'<testsuite name="pkg.suite{i // per_suite}{seed}" tests="{per_suite}">\n')
            cls = f"pkg.suite{i // per_suite}.TestClass{(i // 25) % 20}"
            head = f'<testcase classname="{cls}" name="test_case_{i}[param-{i % 7}]" time="{(i % 997) / 1000:.3f}"'
            if i % fail_every == 1:
                counts["failed"] += 1
                f.write(f'{head}><failure message="{MESSAGE[:300]}">Traceback (most recent call last):\n'
                        f'  File "tests/test_x.py", line {i % 400}, in test_case\n    assert a == b\n'
                        f'</failure><system-out>log line\n</system-out></testcase>\n')
            elif i % skip_every == 2:
                counts["skipped"] += 1
                f.write(f'{head}><skipped message="needs a GPU"/></testcase>\n')
            else:
                counts["passed"] += 1
                f.write(f"{head}/>\n")
        f.write("</testsuite>\n</testsuites>\n")
    return counts


def _as_json(path: Path) -> bytes:
    rows = [{"suite": e.get("classname"), "name": e.get("name"), "time": e.get("time"),
             "outcome": "failed" if e.find("failure") is not None else "passed"}
            for e in ET.parse(path).iter("testcase")]
    return json.dumps(rows).encode()


def _best(fn: object, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="time `import junit --dry-run` (no stack needed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.xml"
        counts = generate(path, args.cases, seed=str(time.time_ns()))
        size = path.stat().st_size
        doc = _as_json(path)
        etree_s = _best(lambda: ET.parse(path), args.runs)
        json_s = _best(lambda: json.loads(doc), args.runs)
        cmd = [sys.executable, "-m", "buildtel.cli.main", "import", "junit", str(path), "--commit", "b" * 40]
        if args.dry_run:
            cmd.insert(5, "--dry-run")
        best, mode = float("inf"), "dry-run" if args.dry_run else "publish"
        for i in range(args.runs):
            if not args.dry_run and i:  # a new file each run: a re-import would be a duplicate
                counts = generate(path, args.cases, seed=str(time.time_ns()))
            t = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=False)
            elapsed = time.perf_counter() - t
            if res.returncode != 0:
                sys.exit(f"buildtel import junit failed ({res.returncode}): {res.stderr.strip()} "
                         "(no stack? run `buildtel up`, or pass --dry-run)")
            best = min(best, elapsed)
    print(f"report: {args.cases:,} cases ({counts['failed']} failed, {counts['skipped']} skipped), {size / 1e6:.1f} MB")
    print(f"buildtel import junit ({mode}, whole process): {best:.2f} s")
    print(f"baseline ElementTree.parse of the file: {etree_s:.2f} s; json.loads of the same cases: {json_s:.2f} s")
    print(json.dumps({"junit_100k_s": round(best, 3), "mode": mode, "cases": args.cases, "bytes": size,
                      "etree_parse_s": round(etree_s, 3), "json_loads_s": round(json_s, 3),
                      "goal_s": 5.0, "ok": best <= 5.0}))


if __name__ == "__main__":
    main()
