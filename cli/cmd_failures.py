"""``buildtel failures``: failed targets across stored builds, grouped by signature and class
(docs/failures.md).

``buildtel failures [--since DATE] [--class code|infra|flaky|unknown] [--branch B] [--match TEXT]
[--sessions N] [--limit N] [--json]`` lists one line per group — the same normalised error line
(signature) and class — with its count, first and last seen, and an example build and targets,
over the newest ``--sessions`` stored builds.  Computed by the storage service
(services/storage/failures.py).
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
from buildtel.shared.protocol import FAILURE_CLASSES
from buildtel.shared.settings import Settings


def register(sub: Any) -> None:
    p = sub.add_parser("failures", help="failed targets across stored builds, grouped by signature and class",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--since", help="builds since DATE (2026-01-31, ISO time, 7d, 12h)")
    p.add_argument("--class", dest="failure_class", choices=FAILURE_CLASSES,
                   help="only failures of this class (docs/failures.md)")
    p.add_argument("--branch", help="builds of this branch only")
    p.add_argument("--match", default="", metavar="TEXT", help="groups whose signature or a target contains TEXT")
    p.add_argument("--sessions", type=int, default=1000, metavar="N",
                   help="read the newest N builds that match (default 1000)")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="groups shown (default 50)")
    p.add_argument("--json", action="store_true", help="the storage service's reply as JSON")
    p.set_defaults(func=cmd_failures)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


async def cmd_failures(args: argparse.Namespace, settings: Settings) -> int:
    from buildtel.cli.cmd_analyze import parse_when
    from buildtel.services.storage.api import StorageError
    from buildtel.services.storage.failures import FailuresRequest, failures

    if args.limit < 1 or not 1 <= args.sessions <= 20_000:
        raise CLIError("--limit must be at least 1 and --sessions between 1 and 20000")
    try:
        since = parse_when(args.since) if args.since else None
    except ValueError as exc:
        raise CLIError(f"--since: {exc}") from None
    async with open_bus(settings) as bus:
        try:
            reply = await failures(bus.nc, bus.subjects, FailuresRequest(
                since=since, branch=args.branch, failure_class=args.failure_class, match=args.match,
                sessions=args.sessions, limit=min(args.limit, 10_000)))
        except StorageError as exc:
            raise CLIError(str(exc)) from None
    for note in reply.partial:  # a partition away: its builds are not counted
        print(f"buildtel: {note}: its builds are missing from these figures", file=sys.stderr)
    if args.json:
        sys.stdout.write(dumps(reply) + "\n")
        return 0
    if not reply.groups:
        what = f"{args.failure_class} failures" if args.failure_class else "failures"
        print(f"no {what} in the {reply.sessions_read} build(s) with failed targets read", file=sys.stderr)
        return 0
    print(f"{'COUNT':>5} {'BUILDS':>6}  {'CLASS':<7}  {'FIRST SEEN':<16}  {'LAST SEEN':<16}  SIGNATURE")
    for g in reply.groups:
        print(f"{g.count:>5} {g.sessions:>6}  {g.failure_class:<7}  {_when(g.first_seen):<16}  "
              f"{_when(g.last_seen):<16}  {safe(g.signature)}")
        more = f" (+{g.sessions - 1} more)" if g.sessions > 1 else ""
        print(f"{'':>40}  e.g. build {g.example_sessions[0] if g.example_sessions else '-'}{more}; "
              f"target(s) {safe(', '.join(g.targets))}")
    print(f"{len(reply.groups)} of {reply.groups_total} group(s), {reply.failures_total} failure(s) in "
          f"{reply.sessions_read} build(s) with failed targets", file=sys.stderr)
    return 0
