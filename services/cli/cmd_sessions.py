"""``buildtel sessions`` and ``buildtel show``: read stored history through the storage service."""

from __future__ import annotations

import argparse
import sys
import time

import msgspec

from services.cli.common import open_bus
from services.cli.main import CLIError
from services.cli.textsafe import json_safe, safe
from services.storage.api import StorageClient, StorageError
from shared.protocol import BuildSession
from shared.settings import Settings

_json = msgspec.json.Encoder()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sessions", help="list stored build sessions, newest first")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    p.add_argument("--outcome", choices=["success", "failed", "abandoned"], help="only this outcome")
    p.add_argument("--branch", help="only builds of this VCS branch")
    p.add_argument("--agent", help="only builds an agent took part in")
    p.add_argument("--target", help="only builds that ran this target")
    p.add_argument("--json", action="store_true", help="one JSON document (a list of sessions)")
    p.set_defaults(func=cmd_sessions, quiet_logs=True)
    s = sub.add_parser("show", help="show one stored session with its targets")
    s.add_argument("id", help="session id (a unique prefix of at least 6 hex digits also works)")
    s.add_argument("--json", action="store_true", help="the whole session as JSON")
    s.add_argument("--top", type=int, default=15, help="targets to list, longest first (default 15)")
    s.set_defaults(func=cmd_show, quiet_logs=True)


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def session_line(s: BuildSession) -> str:
    branch = s.environment.vcs.branch if s.environment and s.environment.vcs else ""
    # Names, branch and ids come from publishers: escaped (services/cli/textsafe.py); not in --json.
    return (f"{safe(s.id)}  {_fmt_time(s.start)}  {safe(s.outcome):<9} {s.duration_s:9.1f}s  "
            f"{len(s.targets):5d} targets  cache {s.cache_hit_rate:5.1%}  {safe(branch or '-'):<10} {safe(s.name)}")


async def cmd_sessions(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit < 1:
        raise CLIError("--limit must be at least 1")
    async with open_bus(settings, autostart=True) as bus:
        client = StorageClient(bus.nc, bus.subjects)
        try:
            if any((args.outcome, args.branch, args.agent, args.target)):
                sessions = await client.query(outcome=args.outcome, branch=args.branch, agent=args.agent,
                                              target=args.target, limit=args.limit)
            else:
                sessions = await client.recent(args.limit)
        except StorageError as exc:
            raise CLIError(str(exc)) from None
    if args.json:
        sys.stdout.write(json_safe(_json.encode(sessions).decode()) + "\n")
        return 0
    if not sessions:
        print("no sessions stored yet", file=sys.stderr)
        return 0
    print(f"{'SESSION':<32}  {'STARTED':<19}  {'OUTCOME':<9} {'DURATION':>10}  {'TARGETS':>13}  "
          f"{'CACHE':>11}  {'BRANCH':<10} NAME")
    for s in sessions:
        print(session_line(s))
    return 0


async def _resolve(client: StorageClient, ident: str) -> BuildSession:
    try:
        return await client.get(ident)
    except StorageError as exc:
        if not exc.not_found or len(ident) >= 32:
            raise CLIError(str(exc)) from None
    if len(ident) < 6:
        raise CLIError(f"no session {ident!r}; give at least 6 hex digits of its id")
    matches = [s for s in await client.recent(10_000) if s.id.startswith(ident)]
    if len(matches) != 1:
        raise CLIError(f"{'no' if not matches else len(matches)} stored sessions match {ident!r}")
    return matches[0]


async def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    async with open_bus(settings, autostart=True) as bus:
        s = await _resolve(StorageClient(bus.nc, bus.subjects), args.id)
    if args.json:
        sys.stdout.write(json_safe(_json.encode(s).decode()) + "\n")
        return 0
    env = s.environment
    print(f"session   {safe(s.id)}  ({safe(s.name or 'unnamed')})")
    print(f"outcome   {safe(s.outcome)}  exit code {s.exit_code if s.exit_code is not None else '-'}")
    print(f"time      {_fmt_time(s.start)} → {_fmt_time(s.finish)}  ({s.duration_s:.2f} s)")
    if s.command:
        print(f"command   {safe(' '.join(s.command))}")
    print(f"agents    {safe(', '.join(s.agents)) or '-'}")
    if env:
        vcs = env.vcs
        print(f"machine   {safe(env.hostname)} {safe(env.os)} {safe(env.arch)} {env.cpus} CPUs")
        if vcs:
            print(f"vcs       {safe(vcs.branch or '-')} @ {safe((vcs.commit or '-')[:12])}"
                  f"{' (dirty)' if vcs.dirty else ''}")
    t = s.totals
    print(f"targets   {t.targets} ({t.succeeded} ok, {t.failed} failed, {t.skipped} skipped, {t.cancelled} cancelled)"
          f"  serial time {t.target_time_s:.1f} s")
    print(f"cache     {s.cache_hits} hits / {s.cache_misses} misses ({s.cache_hit_rate:.1%})")
    if s.cpu_s is not None:
        print(f"process   cpu {s.cpu_s:.2f} s  peak rss {(s.peak_rss_bytes or 0) / 2**20:.1f} MiB")
    if s.targets:
        print(f"\n{'DURATION':>10}  {'STATUS':<9} {'CACHE':<11} TARGET")
        for m in sorted(s.targets, key=lambda m: -m.duration_s)[: args.top]:
            print(f"{m.duration_s:9.3f}s  {safe(m.status):<9} {safe(m.cache):<11} {safe(m.name)}")
    return 0
