"""``buildtel alerts ack|mute|unmute|subscriptions``, the ``--status`` filter of ``buildtel alerts`` and the
alerts section of ``buildtel report``.

What people decide about an alert lives in the stack's Redis (``shared/alertstate.py``, the state
the web API writes too): these commands write it directly, as ``buildtel keys`` does, and find the
alert (its series, for a mute) on the alerts stream.  ``subscriptions`` lists the notifier's
subscriptions file (``BUILDER_TELEMETRY_ALERTS_CONFIG``) with the delivery counts every replica
shares; secrets and Slack URLs are never shown.  See docs/alerts.md and docs/cli.md.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec

from buildtel.cli.common import open_bus, resolve
from buildtel.cli.errors import CLIError
from buildtel.cli.textsafe import safe
from buildtel.services.analyzer.alerts import Alert
from buildtel.services.analyzer.api import read_alerts
from buildtel.services.notifier.api import ConfigError, delivery_counts, describe_stored, load, load_stored
from buildtel.shared import alertstate
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
STATUSES = ("open", "acknowledged", "muted")


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """The sub-commands of ``buildtel alerts`` (without one, it lists alerts)."""
    sub = parser.add_subparsers(dest="alerts_command", metavar="{ack,mute,unmute,subscriptions}")
    ack = sub.add_parser("ack", help="acknowledge an alert: it stays listed, marked acknowledged, and the notifier "
                                     "does not deliver it (any more)")
    ack.add_argument("id", help="the alert's id (or a unique prefix of at least 6 characters)")
    ack.add_argument("--note", default="", help="why (shown with the alert; at most 500 characters)")
    ack.set_defaults(func=cmd_ack)
    mute = sub.add_parser("mute", help="mute the alert's series (kind, branch, target) for a while: its alerts "
                                       "detected until then are muted and not delivered")
    mute.add_argument("id", help="an alert of the series (id or unique prefix)")
    mute.add_argument("--for", dest="duration", required=True,
                      help="how long: 90m, 24h, 7d, 2w (at most 90 days)")
    mute.add_argument("--note", default="", help="why")
    mute.set_defaults(func=cmd_mute)
    unmute = sub.add_parser("unmute", help="end the mute of the alert's series now")
    unmute.add_argument("id", help="an alert of the series (id or unique prefix)")
    unmute.set_defaults(func=cmd_unmute)
    subs = sub.add_parser("subscriptions", help="the notifier's subscriptions, from its file "
                                                "(BUILDER_TELEMETRY_ALERTS_CONFIG) and made over the web API "
                                                "(/api/v1/subscriptions), and their delivery counts; never a secret")
    subs.add_argument("--json", action="store_true", help="one JSON object per subscription")
    subs.set_defaults(func=cmd_subscriptions)


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise CLIError(f"cannot read {text!r} as a duration: use 90m, 24h, 7d or 2w")
    return float(m.group(1)) * _UNIT[m.group(2)]


@asynccontextmanager
async def _redis(settings: Settings) -> Any:
    from redis.exceptions import RedisError

    from buildtel.shared.bus import connect_redis

    resolved = resolve(settings, autostart=False)
    r = connect_redis(resolved.redis_url or "")
    try:
        yield r
    except (OSError, RedisError) as exc:  # redis-py's connection errors are not OSErrors
        raise CLIError(f"cannot reach Redis: {exc}") from None
    finally:
        await r.aclose()


async def _find(settings: Settings, word: str) -> Alert:
    """The stored alert ``word`` names: its full id or a unique prefix of >= 6 characters."""
    word = word.strip().lower()
    if len(word) < 6:
        raise CLIError("give an alert's id or at least its first 6 characters ('buildtel alerts --json' lists them)")
    async with open_bus(settings) as bus:
        found = [a for a in await read_alerts(bus.js, settings.namespace) if a.id.startswith(word)]
    if not found:
        raise CLIError(f"no alert has id {word!r} (see 'buildtel alerts')")
    if len({a.id for a in found}) > 1:
        raise CLIError(f"{word!r} is the start of {len(found)} alerts' ids: give more of it")
    return found[0]


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a container)
        return "cli"


def _what(a: Alert) -> str:
    return f"target {safe(a.target)}" if a.kind == "target" else f"{a.kind} alert"


def _series(a: Alert) -> str:
    return alertstate.series_key(a.kind, a.branch, a.target)


async def cmd_ack(args: argparse.Namespace, settings: Settings) -> int:
    alert = await _find(settings, args.id)
    async with _redis(settings) as r:
        await alertstate.acknowledge(r, Keys(settings.namespace), alert.id, by=_who(), note=args.note)
    print(f"buildtel: acknowledged alert {alert.id} ({_what(alert)}, branch {safe(alert.branch or '-')})",
          file=sys.stderr)
    return 0


async def cmd_mute(args: argparse.Namespace, settings: Settings) -> int:
    seconds = parse_duration(args.duration)
    alert = await _find(settings, args.id)
    async with _redis(settings) as r:
        try:
            m = await alertstate.mute(r, Keys(settings.namespace), _series(alert), seconds=seconds, by=_who(),
                                      note=args.note)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    until = datetime.fromtimestamp(m.until, UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"buildtel: muted series {safe(m.series)} until {until}", file=sys.stderr)
    return 0


async def cmd_unmute(args: argparse.Namespace, settings: Settings) -> int:
    alert = await _find(settings, args.id)
    async with _redis(settings) as r:
        if not await alertstate.unmute(r, Keys(settings.namespace), _series(alert)):
            raise CLIError(f"series {safe(_series(alert))} is not muted")
    print(f"buildtel: unmuted series {safe(_series(alert))}", file=sys.stderr)
    return 0


async def cmd_subscriptions(args: argparse.Namespace, settings: Settings) -> int:
    try:
        loaded = load(settings.alerts_config)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    for w in loaded.warnings:
        print(f"buildtel: warning: {w}", file=sys.stderr)
    keys = Keys(settings.namespace)
    async with _redis(settings) as r:
        counts = await delivery_counts(r, keys)
        made, bad = await load_stored(r, keys)  # made over the web API (/api/v1/subscriptions)
    for b in bad:
        print(f"buildtel: warning: a subscription made over the API cannot be read and is not used: {safe(b)}",
              file=sys.stderr)
    taken = {s.id for s in loaded.subscriptions}
    described = [{**d, "source": "file"} for d in loaded.describe()] + [
        describe_stored(st, shadowed=st.subscription.id in taken) for st in made]
    if not described:
        print("buildtel: no subscriptions" + ("" if settings.alerts_config else
                                              " (BUILDER_TELEMETRY_ALERTS_CONFIG is not set, and none was made "
                                              "over the API)"), file=sys.stderr)
        return 0
    rows = [{**d, "deliveries": counts.get(d["id"], {})} for d in described]
    if args.json:
        from buildtel.cli.jsonout import emit

        for row in rows:
            emit(row)
        return 0
    print(f"{'ID':<20}  {'KIND':<7}  {'DESTINATION':<32}  {'DONE':>6}  {'DEAD':>5}  {'SUPPR':>5}  {'RETRY':>5}  "
          f"{'SOURCE':<6}  RULES")
    for row in rows:
        n = row["deliveries"]
        dest = row["url"] or f"<ns>.notify.{row['subject']}"
        # An API subscription whose id the file uses is not used: say so where it is listed.
        source = "api" + ("(shadowed)" if row.get("shadowed") else "") if row["source"] == "api" else "file"
        print(f"{safe(row['id']):<20}  {row['kind']:<7}  {safe(dest):<32}  {n.get('done', 0):>6}  "
              f"{n.get('dead', 0):>5}  {n.get('suppressed', 0):>5}  {n.get('retried', 0):>5}  {source:<6}  "
              f"{_rules(row)}")
    return 0


def _rules(row: dict[str, Any]) -> str:
    parts = [f"{k}={','.join(row[k])}" for k in ("tenants", "kinds", "branches", "targets") if row.get(k)]
    if row.get("direction") != "any":
        parts.append(f"direction={row['direction']}")
    parts += [f"{k}={row[k]:g}" for k in ("min_change_pct", "min_confidence") if row.get(k)]
    if row.get("digest") == "daily":
        parts.append("digest=daily" + (f"@{row['digest_hour']}h" if row.get("digest_hour") is not None else ""))
    return safe(" ".join(parts) or "all alerts")


@asynccontextmanager
async def status_filter(settings: Settings, status: str | None) -> Any:
    """Yields ``keep(alerts) -> alerts`` of the given status (``shared/alertstate.py``), or None."""
    if status is None:
        yield None
        return
    async with _redis(settings) as r:
        keys = Keys(settings.namespace)

        async def keep(alerts: list[Alert]) -> list[Alert]:
            found = await alertstate.states(r, keys, [(a.id, _series(a), a.detected_at) for a in alerts])
            return [a for a, s in zip(alerts, found, strict=True) if s.status == status]

        yield keep



class ReportAlert(msgspec.Struct, kw_only=True):
    """One alert as ``buildtel report`` lists it: what changed, how sure, and what people decided."""

    id: str
    kind: str
    series: str
    target: str | None
    branch: str | None
    direction: str
    change_pct: float
    before_median_s: float
    after_median_s: float
    confidence: float
    first_session_start: float
    status: str  # open, acknowledged or muted


class ReportAlerts(msgspec.Struct, kw_only=True):
    """The report's alerts section: alerts whose change began inside the report's window.  ``error``
    says why the section is empty when the alerts or their states could not be read."""

    since: float | None
    until: float | None
    alerts: list[ReportAlert] = []
    error: str | None = None


async def report_alerts(settings: Settings, *, since: float | None, until: float | None, branch: str | None,
                        target: str | None) -> ReportAlerts:
    """The alerts whose first bad build started in ``[since, until]`` (a bound left None is open), of the
    report's branch and target, with their state.  Never raises for an unreachable stream or Redis: the
    section then carries the reason, and the report itself still prints."""
    out = ReportAlerts(since=since, until=until)
    try:
        async with open_bus(settings) as bus:
            found = await read_alerts(bus.js, settings.namespace, branch=branch, target=target)
        found = [a for a in found if (since is None or a.first_session_start >= since)
                 and (until is None or a.first_session_start <= until)]
        if not found:
            return out
        async with _redis(settings) as r:
            st = await alertstate.states(r, Keys(settings.namespace),
                                         [(a.id, _series(a), a.detected_at) for a in found])
    except Exception as exc:  # noqa: BLE001 - NATS or Redis away (redis' errors are no OSError): said, not fatal
        out.error = f"alerts could not be read: {type(exc).__name__}: {exc}"[:300]
        return out
    out.alerts = [ReportAlert(id=a.id, kind=a.kind, series=a.series, target=a.target, branch=a.branch,
                              direction=a.direction, change_pct=a.change_pct, before_median_s=a.before_median_s,
                              after_median_s=a.after_median_s, confidence=a.confidence,
                              first_session_start=a.first_session_start, status=s.status)
                  for a, s in zip(found, st, strict=True)]
    return out


def report_alerts_text(sec: ReportAlerts) -> str:
    """The section as the text report ends with it (publisher-given names escaped by the caller)."""
    if sec.error:
        return f"\nAlerts: not shown ({sec.error})\n"
    if not sec.alerts:
        return "\nAlerts: none began in this window\n"
    counts = {s: sum(1 for a in sec.alerts if a.status == s) for s in STATUSES}
    lines = ["", f"Alerts: {len(sec.alerts)} began in this window ("
             + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")"]
    for a in sorted(sec.alerts, key=lambda x: (STATUSES.index(x.status) if x.status in STATUSES else 9,
                                              -x.first_session_start)):
        what = f"target {a.target}" if a.target is not None else f"{a.kind} (whole build)"
        when = datetime.fromtimestamp(a.first_session_start, UTC).strftime("%Y-%m-%d %H:%M")
        lines.append(f"  {a.status:<12}  {a.direction:<11}  {what}  branch {a.branch or '-'}  "
                     f"{a.before_median_s:.2f}s -> {a.after_median_s:.2f}s ({a.change_pct:+.1f}%)  "
                     f"confidence {a.confidence:.2f}  since {when}  id {a.id[:12]}")
    return "\n".join(lines) + "\n"
