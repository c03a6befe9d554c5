"""``buildtel sessions`` and ``buildtel show``: read stored history through the storage service."""

from __future__ import annotations

import argparse
import sys
import time

from buildtel.cli.common import open_bus
from buildtel.cli.errors import CLIError
from buildtel.cli.ids import GRAMMAR, parse_id, resolve_session
from buildtel.cli.jsonout import dumps
from buildtel.cli.textsafe import safe
from buildtel.services.storage.api import SessionSummary, StorageClient, StorageError
from buildtel.shared.protocol import OUTCOMES, BuildSession
from buildtel.shared.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sessions", help="list stored build sessions, newest first")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    p.add_argument("--outcome", choices=OUTCOMES, help="only this outcome")
    p.add_argument("--branch", help="only builds of this VCS branch")
    p.add_argument("--agent",
                   help="only builds an agent took part in; a machine also matches its MACHINE/PID.START agents")
    p.add_argument("--target", help="only builds that ran this target")
    p.add_argument("--json", action="store_true",
                   help="one JSON document: a list of sessions, each as 'show --json' prints it")
    p.set_defaults(func=cmd_sessions, quiet_logs=True)
    s = sub.add_parser("show", help="show one stored session with its targets")
    s.add_argument("id", help=GRAMMAR)
    s.add_argument("--json", action="store_true",
                   help="the whole session as one JSON object (targets as objects, every field stated)")
    s.add_argument("--top", type=int, default=15, help="targets to list, longest first (default 15)")
    s.add_argument("--failures", action="store_true",
                   help="only the failed targets, each with its error lines and output (docs/failures.md); "
                        "with --json: {session_id, outcome, failures: [...]}")
    costs = s.add_mutually_exclusive_group()
    costs.add_argument("--headers", action="store_const", const="headers", dest="costs",
                       help="included files by self time added up across the session's clang -ftime-trace "
                            "compiles, --top of them (docs/importers.md); with --json: {session_id, total_s, costs}")
    costs.add_argument("--templates", action="store_const", const="templates", dest="costs",
                       help="template instantiations by self time, likewise")
    s.set_defaults(func=cmd_show, quiet_logs=True)


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def session_line(s: BuildSession | SessionSummary) -> str:
    """One line per session, from a stored session or from its summary (what lists fetch)."""
    if isinstance(s, SessionSummary):
        branch, targets, reasons = s.branch, s.targets, s.incomplete_reasons + [""] * s.more_reasons
        complete = s.complete
    else:
        branch = s.environment.vcs.branch if s.environment and s.environment.vcs else ""
        targets, c = len(s.targets), s.completeness
        complete, reasons = c is None or c.complete, (c.reasons if c is not None else [])
    # Names, branch and ids come from publishers: escaped (cli/textsafe.py); not in --json.
    return (f"{safe(s.id)}  {_fmt_time(s.start)}  {safe(s.outcome):<9} {s.duration_s:9.1f}s  "
            f"{targets:5d} targets  cache {s.cache_hit_rate:5.1%}  {safe(branch or '-'):<10} {safe(s.name)}"
            + incomplete_note(complete, reasons))


def incomplete_note(complete: bool, reasons: list[str], width: int = 100) -> str:
    """``  INCOMPLETE: <first reason>`` for a session that lost events, else "" (an outcome alone
    would read as a whole build)."""
    if complete:
        return ""
    why = reasons[0] if reasons and reasons[0] else "events were lost"
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return f"  INCOMPLETE: {safe(why if len(why) <= width else why[: width - 1] + '…')}{more}"


async def cmd_sessions(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit < 1:
        raise CLIError("--limit must be at least 1")
    async with open_bus(settings) as bus:
        client = StorageClient(bus.nc, bus.subjects)
        try:
            # Summaries, not whole sessions: a line needs a few hundred bytes of a session.
            sessions = await client.summaries(outcome=args.outcome, branch=args.branch, agent=args.agent,
                                              target=args.target, limit=args.limit)
            # An empty filtered list: say whether the filters or an empty store are why.
            stored = (await client.stats()).sessions if not sessions and not args.json else None
        except StorageError as exc:
            raise CLIError(str(exc)) from None
    for note in client.partial:  # a partitioned store with a partition away: say the list lacks its share
        print(f"buildtel: {note}: its sessions are missing from this list", file=sys.stderr)
    if args.json:
        sys.stdout.write(dumps(sessions) + "\n")
        return 0
    if not sessions:
        print(_no_match(args, stored), file=sys.stderr)
        return 0
    print(f"{'SESSION':<32}  {'STARTED':<19}  {'OUTCOME':<9} {'DURATION':>10}  {'TARGETS':>13}  "
          f"{'CACHE':>11}  {'BRANCH':<10} NAME")
    for s in sessions:
        print(session_line(s))
    return 0


def _no_match(args: argparse.Namespace, stored: int | None) -> str:
    """Why the list is empty: the filters (named as typed) or an empty store."""
    given = [f"--{flag} {getattr(args, flag)}" for flag in ("branch", "outcome", "agent", "target")
             if getattr(args, flag)]
    if not given or stored == 0:
        return "no sessions stored yet"
    return f"no session matches {safe(' '.join(given))} (of {stored} stored)"


async def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    ref = parse_id(args.id)  # a malformed id is refused before any stack is reached or started
    async with open_bus(settings) as bus:
        s = await resolve_session(StorageClient(bus.nc, bus.subjects), ref)
    if getattr(args, "failures", False):
        from buildtel.cli.failures_view import print_failures

        return print_failures(s, json_out=args.json)
    if getattr(args, "costs", None):
        from buildtel.cli.costs_view import print_costs

        return print_costs(s, args.costs, top=args.top, json_out=args.json)
    if args.json:
        sys.stdout.write(dumps(s) + "\n")
        return 0
    env = s.environment
    print(f"session   {safe(s.id)}  ({safe(s.name or 'unnamed')})")
    print(f"outcome   {safe(s.outcome)}  exit code {s.exit_code if s.exit_code is not None else '-'}")
    c = s.completeness
    if c is not None and not c.complete:
        got, want = sum(c.received.values()), sum(c.expected.values())
        print(f"INCOMPLETE {got} of {want} events received; figures below cover only what arrived")
        for why in c.reasons:
            print(f"          {safe(why)}")
    print(f"time      {_fmt_time(s.start)} → {_fmt_time(s.finish)}  ({s.duration_s:.2f} s)")
    if s.command:
        print(f"command   {safe(' '.join(s.command))}")
    print(f"agents    {safe(', '.join(s.agents)) or '-'}")
    if env:
        vcs = env.vcs
        cpus = f"{env.cpus} CPUs" if env.cpus else "CPUs unknown"  # 0: not reported (e.g. a Bazel build over BES)
        print(f"machine   {' '.join(safe(x) for x in (env.hostname, env.os, env.arch) if x) or '-'}  {cpus}")
        if vcs:
            print(f"vcs       {safe(vcs.branch or '-')} @ {safe((vcs.commit or '-')[:12])}"
                  f"{' (dirty)' if vcs.dirty else ''}")
    t = s.totals
    print(f"targets   {t.targets} ({t.succeeded} ok, {t.failed} failed, {t.skipped} skipped, {t.cancelled} cancelled)"
          f"  serial time {t.target_time_s:.1f} s")
    looked = s.cache_hits + s.cache_misses
    print(f"cache     {s.cache_hits} hits / {s.cache_misses} misses "
          f"({f'{s.cache_hit_rate:.1%}' if looked else 'no cache lookups recorded'})")
    if s.cpu_s is not None:
        rss = f"{s.peak_rss_bytes / 2**20:.1f} MiB" if s.peak_rss_bytes is not None else "unknown"
        print(f"process   cpu {s.cpu_s:.2f} s  peak rss {rss}")
    if s.up_to_date is not None:
        print(f"avoided   {s.up_to_date} targets up to date, not rebuilt")
    if s.failures or (s.log is not None and s.log.object):
        what = [f"output of {len(s.failures)} failed targets: buildtel show {s.id} --failures"] if s.failures else []
        what += [f"console log: buildtel log {s.id}"] if s.log is not None and s.log.object else []
        print(f"kept      {safe('; '.join(what))}")
    if s.targets:
        print(f"\n{'DURATION':>10}  {'STATUS':<9} {'CACHE':<11} TARGET")
        for m in sorted(s.targets, key=lambda m: -m.duration_s)[: args.top]:
            print(f"{m.duration_s:9.3f}s  {safe(m.status):<9} {safe(m.cache):<11} {safe(m.name)}")
    _print_errors(s, args.top)
    return 0


def _print_errors(s: BuildSession, top: int, lines: int = 20) -> None:
    """What the failed targets of an import printed (their failure records, ``source`` import), the
    first ``lines`` lines of each, with their class (``buildtel show --failures`` shows them all)."""
    from buildtel.shared.failrecord import records

    failed = [f for f in records(s) if f.source == "import" and f.output]
    if not failed:
        return
    print(f"\nERRORS of {len(failed)} failed target(s)" + (f", the first {top}" if len(failed) > top else ""))
    for f in failed[:top]:
        print(f"  {safe(f.target)}  [{f.failure_class}]")
        text = f.output
        for line in text[:lines]:
            print(f"    {safe(line)}")
        if len(text) > lines:
            print(f"    … {len(text) - lines} more line(s) (buildtel show --json)")
