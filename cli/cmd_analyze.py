"""``buildtel report``, ``buildtel export`` and ``buildtel alerts``: analytics and regression alerts
(``alerts ack|mute|unmute|subscriptions`` and ``--status``: ``cli/cmd_alerts.py``).

Reports are computed by the analyzer service (any replica answers) over the history the
storage service holds (it must be running); alerts are read from the alerts stream.  See
``docs/analytics.md`` and ``docs/export.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from buildtel.cli import cmd_alerts as cmd_alerts_state
from buildtel.cli.common import open_bus
from buildtel.cli.errors import CLIError
from buildtel.cli.textsafe import json_safe, safe, safe_block
from buildtel.services.analyzer.alerts import Alert, explanation_lines
from buildtel.services.analyzer.analytics import AnalyticsReport
from buildtel.services.analyzer.api import (
    AnalyzerClient,
    AnalyzerError,
    ReportRequest,
    follow_alerts,
    read_alerts,
)
from buildtel.services.analyzer.export import fmt_s, sessions_csv, summary, targets_csv, to_json
from buildtel.shared.protocol import OUTCOMES
from buildtel.shared.settings import Settings

_REL = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, *, now: float | None = None) -> float:
    """``2026-01-31``, ``2026-01-31T12:00[:00][Z|+01:00]``, ``7d``/``12h``/``30m`` ago, or Unix seconds."""
    now = time.time() if now is None else now
    t = text.strip()
    m = _REL.match(t)
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(t)  # 3.11 reads a trailing "Z" too
    except ValueError:
        raise CLIError(f"cannot read {text!r} as a date: use 2026-01-31, 2026-01-31T12:00, 7d, 12h or Unix seconds") \
            from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)  # dates without a zone are UTC, as the report's are
    return dt.timestamp()


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--last", type=int, help="the N most recently finished builds")
    p.add_argument("--since", help="builds that finished since DATE (2026-01-31, ISO time, 7d, 12h)")
    p.add_argument("--until", help="builds that finished before DATE")
    p.add_argument("--branch", help="only builds of this VCS branch")
    p.add_argument("--outcome", choices=OUTCOMES, help="only this outcome")
    p.add_argument("--target", help="only builds that ran this target")
    p.add_argument("--top", type=int, help="keep only the N targets with the most total time")
    p.add_argument("--speedup", type=float, default=50.0, help="what-if speed-up in %% (default 50)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the analyzer (default 60), plus 2 ms for every session the window "
                        "may hold, so a long history is never cut off")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="build analytics: build times, trends, targets, flakiness, bottlenecks, and "
                                        "the alerts that began in the window (open, acknowledged, muted)")
    _filters(p)
    p.add_argument("--format", choices=["summary", "json", "csv"], default="summary", help="output (default summary)")
    p.add_argument("--json", dest="format", action="store_const", const="json",
                   help="same as --format json (every data command takes --json: docs/cli.md)")
    p.add_argument("--table", choices=["sessions", "targets"], default="sessions",
                   help="with --format csv: one row per session (default) or per target")
    p.add_argument("-o", "--output", help="write to FILE instead of standard output")
    p.set_defaults(func=cmd_report, quiet_logs=True)
    e = sub.add_parser("export", help="write a report to a file: json, csv (sessions + targets files) or summary")
    _filters(e)
    e.add_argument("--format", choices=["json", "csv", "summary"], required=True)
    e.add_argument("-o", "--output", required=True, help="FILE; csv also writes FILE's stem + '.targets.csv'")
    e.set_defaults(func=cmd_export, quiet_logs=True)
    a = sub.add_parser("alerts",
                       help="regression alerts (build and target durations, host slowdowns), explained; "
                            "ack, mute, unmute, subscriptions")
    a.add_argument("--follow", "-f", action="store_true", help="keep printing new alerts until Ctrl-C")
    a.add_argument("--branch", help="only alerts of this branch")
    a.add_argument("--target", help="only alerts of this target")
    a.add_argument("--kind", choices=["build", "target", "host"],
                   help="only whole-build, only target alerts, or only host slowdowns")
    a.add_argument("--last", type=int, help="show only the N newest stored alerts")
    a.add_argument("--status", choices=cmd_alerts_state.STATUSES,
                   help="only alerts open, acknowledged or muted (their state in the stack's Redis)")
    a.add_argument("--json", action="store_true", help="one JSON object per line")
    a.set_defaults(func=cmd_alerts, quiet_logs=True)
    cmd_alerts_state.add_subcommands(a)


def _request(args: argparse.Namespace, *, sessions: bool) -> ReportRequest:
    if args.last is not None and args.last < 1:
        raise CLIError("--last must be at least 1")
    if args.top is not None and args.top < 1:
        raise CLIError("--top must be at least 1")
    return ReportRequest(last=args.last, since=parse_when(args.since) if args.since else None,
                         until=parse_when(args.until) if args.until else None, branch=args.branch,
                         outcome=args.outcome, target=args.target, include_sessions=sessions, top_targets=args.top,
                         speedup_pct=args.speedup)


async def _fetch(settings: Settings, req: ReportRequest, timeout: float) -> AnalyticsReport:
    async with open_bus(settings) as bus:
        try:
            return await AnalyzerClient(bus.nc, settings.namespace, timeout=timeout).report(req)
        except AnalyzerError as exc:
            raise CLIError(exc.description if exc.code != 500 else str(exc)) from None


def _write(path: str | None, text: str, *, kind: str = "data") -> None:
    if path is None:
        # Target names and branches come from publishers: the summary, and CSV bound for a
        # terminal, have their control characters escaped; JSON gets lossless \u escapes
        # (cli/textsafe.py); files get the data as it is.
        if kind == "json":
            text = json_safe(text)
        elif kind == "summary" or sys.stdout.isatty():
            text = safe_block(text)
        sys.stdout.write(text)
        return
    try:
        Path(path).write_text(text, encoding="utf-8", newline="")
    except OSError as exc:
        raise CLIError(f"cannot write {path}: {exc.strerror or exc}") from None


def targets_path(path: str) -> str:
    p = Path(path)
    return str(p.with_name(p.stem + ".targets.csv"))


async def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    rep = await _fetch(settings, _request(args, sessions=args.format == "csv" and args.table == "sessions"),
                       args.timeout)
    if args.format == "csv":
        _write(args.output, sessions_csv(rep) if args.table == "sessions" else targets_csv(rep), kind="csv")
        return 0
    # The alerts whose change began inside the report's window, with what people decided about them.
    req = _request(args, sessions=False)
    section = await cmd_alerts_state.report_alerts(
        settings, since=req.since if req.since is not None else rep.window_start,
        until=req.until if req.until is not None else rep.window_end, branch=args.branch, target=args.target)
    if args.format == "json":
        doc = msgspec.json.decode(to_json(rep))
        doc["alerts"] = msgspec.to_builtins(section)
        text = msgspec.json.format(msgspec.json.encode(doc), indent=2).decode() + "\n"
    else:
        text = summary(rep) + cmd_alerts_state.report_alerts_text(section)
    _write(args.output, text, kind=args.format)
    return 0


async def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    rep = await _fetch(settings, _request(args, sessions=args.format != "summary"), args.timeout)
    if args.format == "json":
        _write(args.output, to_json(rep))
        print(f"wrote {args.output} ({rep.sessions} sessions, {len(rep.targets)} targets)", file=sys.stderr)
    elif args.format == "csv":
        other = targets_path(args.output)
        _write(args.output, sessions_csv(rep))
        _write(other, targets_csv(rep))
        print(f"wrote {args.output} ({rep.sessions} sessions) and {other} ({len(rep.targets)} targets)",
              file=sys.stderr)
    else:
        _write(args.output, summary(rep))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def alert_line(a: Alert) -> str:
    when = datetime.fromtimestamp(a.detected_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    what = (f"target {safe(a.target)} ({safe(a.cache)})" if a.kind == "target" else
            f"host {safe(a.host)}" if a.kind == "host" else "build")
    commits = f"  commits {safe(a.commit_range)}" if a.commit_range else ""
    if a.explanation is not None and a.explanation.code_change is False:
        commits = f"  no code change between these builds (commit {safe(a.first_bad_commit)})"
    return (f"{when}  {safe(a.direction.upper()):<11}  {what}  branch {safe(a.branch or '-')}  "
            f"{fmt_s(a.before_median_s)} -> {fmt_s(a.after_median_s)} ({a.change_pct:+.1f}%)  "
            f"confidence {a.confidence:.2f}  first session {safe(a.first_session_id)}{commits}")


def alert_text(a: Alert) -> list[str]:
    """The alert's line, then its explanation indented (docs/analytics.md "Explanations")."""
    return [alert_line(a), *(f"    {safe(x)}" for x in explanation_lines(a))]


def _print_alert(a: Alert, as_json: bool) -> None:
    print(json_safe(msgspec.json.encode(a).decode()) if as_json else "\n".join(alert_text(a)), flush=True)


async def cmd_alerts(args: argparse.Namespace, settings: Settings) -> int:
    if args.last is not None and args.last < 1:
        raise CLIError("--last must be at least 1")
    async with cmd_alerts_state.status_filter(settings, args.status) as keep, open_bus(settings) as bus:

        async def show(alerts: list[Alert]) -> None:
            for a in (await keep(alerts) if keep is not None else alerts):
                _print_alert(a, args.json)

        if args.follow and args.last is None:
            # One reader from the stream's start: nothing falls between "stored" and "new".
            async for a in follow_alerts(bus.js, settings.namespace, branch=args.branch, target=args.target,
                                         kind=args.kind, from_start=True):
                await show([a])
            return 0
        stored = await read_alerts(bus.js, settings.namespace, branch=args.branch, target=args.target,
                                   kind=args.kind)
        if keep is not None:
            stored = await keep(stored)  # --last: the N newest of that status
        if args.last is not None:
            stored = stored[-args.last:]
        for a in stored:
            _print_alert(a, args.json)
        if not args.follow:
            if not stored and not args.json:
                print("no alerts" + (f" {args.status}" if args.status else ""), file=sys.stderr)
            return 0
        async for a in follow_alerts(bus.js, settings.namespace, branch=args.branch, target=args.target,
                                     kind=args.kind, from_start=False):
            await show([a])
    return 0
