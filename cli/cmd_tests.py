"""``buildtel tests``: test cases across stored builds — flaky, slowest, failing (docs/tests.md).

``buildtel tests [--flaky] [--slowest] [--failing] [--since DATE] [--branch B] [--match TEXT]
[--sessions N] [--limit N] [--json]`` lists one line per test (``suite::name``) over the newest
``--sessions`` stored builds that hold test results; ``buildtel tests --history TEST`` lists one
test's runs.  Computed by the storage service (services/storage/tests_history.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from buildtel.cli.common import open_bus
from buildtel.cli.errors import CLIError
from buildtel.cli.jsonout import dumps
from buildtel.cli.textsafe import safe
from buildtel.shared.settings import Settings


def register(sub: Any) -> None:
    p = sub.add_parser("tests", help="test results across stored builds: flaky, slowest, failing tests",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    order = p.add_mutually_exclusive_group()
    p.add_argument("--flaky", action="store_true",
                   help="only flaky tests: passed and failed on the same commit (docs/tests.md)")
    order.add_argument("--slowest", action="store_true", help="slowest first (mean duration)")
    order.add_argument("--failing", action="store_true", help="most failures first")
    p.add_argument("--since", help="builds since DATE (2026-01-31, ISO time, 7d, 12h)")
    p.add_argument("--branch", help="builds of this branch only")
    p.add_argument("--match", default="", metavar="TEXT", help="tests whose id contains TEXT")
    p.add_argument("--target", metavar="TARGET",
                   help="only runs of this build target (exact: a Bazel label, a make target, a ninja output)")
    p.add_argument("--history", metavar="TEST", help="one test's runs, newest first (TEST: suite::name)")
    p.add_argument("--sessions", type=int, default=1000, metavar="N",
                   help="read the newest N builds that match (default 1000)")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="lines shown (default 50)")
    p.add_argument("--json", action="store_true", help="the storage service's reply as JSON")
    p.set_defaults(func=cmd_tests)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


async def cmd_tests(args: argparse.Namespace, settings: Settings) -> int:
    from buildtel.cli.cmd_analyze import parse_when
    from buildtel.services.storage.api import StorageError
    from buildtel.services.storage.tests_history import TestHistoryRequest, TestsRequest, test_history, tests

    if args.limit < 1 or not 1 <= args.sessions <= 20_000:
        raise CLIError("--limit must be at least 1 and --sessions between 1 and 20000")
    since = parse_when(args.since) if args.since else None
    async with open_bus(settings) as bus:
        try:
            if args.history:
                hist = await test_history(bus.nc, bus.subjects, TestHistoryRequest(
                    test=args.history, since=since, branch=args.branch, sessions=args.sessions,
                    limit=min(args.limit, 10_000)))
            else:
                sort: Any = "slowest" if args.slowest else "failing" if args.failing else "flaky"
                reply = await tests(bus.nc, bus.subjects, TestsRequest(
                    since=since, branch=args.branch, test=args.match, target=args.target or None, flaky=args.flaky,
                    sort=sort, sessions=args.sessions, limit=min(args.limit, 10_000)))
        except StorageError as exc:
            raise CLIError(str(exc)) from None
    for note in (hist if args.history else reply).partial:  # a partition away: its builds are not counted
        print(f"buildtel: {note}: its builds are missing from these figures", file=sys.stderr)
    if args.history:
        if args.json:
            sys.stdout.write(dumps(hist) + "\n")
            return 0
        if not hist.runs:
            print(f"no run of {safe(args.history)} in the builds read", file=sys.stderr)
            return 0
        print(f"{'WHEN':<16}  {'OUTCOME':<8} {'DURATION':>9}  {'COMMIT':<12} SESSION")
        for r in hist.runs:
            print(f"{_when(r.t):<16}  {r.outcome:<8} {r.duration_s:>8.3f}s  {safe((r.commit or '-')[:12]):<12} "
                  f"{r.session_id}")
            if r.message and r.outcome in ("failed", "error"):
                print(f"    {safe(r.message.splitlines()[0][:160])}")
        return 0
    if args.json:
        sys.stdout.write(dumps(reply) + "\n")
        return 0
    if not reply.tests:
        what = "flaky tests" if args.flaky else "test results"
        print(f"no {what} in the {reply.sessions_read} build(s) with test results read", file=sys.stderr)
        return 0
    print(f"{'RUNS':>5} {'PASS':>5} {'FAIL':>5} {'SKIP':>5} {'MEAN':>9}  {'FLAKE':>6}  {'LAST FLAKE':<16}  TEST")
    for t in reply.tests:
        flake = f"{t.flake_rate:6.0%}" if t.flaky else f"{'-':>6}"
        print(f"{t.runs:>5} {t.passed:>5} {t.failed + t.errors:>5} {t.skipped:>5} {t.mean_duration_s:>8.3f}s  "
              f"{flake}  {_when(t.last_flake):<16}  {safe(t.test)}")
    print(f"{len(reply.tests)} of {reply.tests_total} test(s), over {reply.sessions_read} build(s) with test results",
          file=sys.stderr)
    return 0
