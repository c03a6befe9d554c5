"""Exports of an :class:`AnalyticsReport`: JSON (machine-readable), CSV (spreadsheet-ready), summary (people).

* JSON is the report itself, field for field (schema in ``docs/export.md``); it
  reads back with ``json.loads`` or as the Struct with :func:`report_from_json`.
* CSV comes as two tables, because sessions and targets have different columns:
  one row per session (the report must have been asked with ``include_sessions``)
  and one row per target.  RFC 4180 (``csv`` module, CRLF), a header row, times
  both as ISO 8601 UTC and Unix seconds, numbers unformatted (full precision).
* The summary is plain text for a terminal or a chat message.

Rates are quoted only over a span that supports them: a per-build trend from 3
builds up, with its 95 % interval and p-value; a per-day trend only when the
builds cover days (``Trend.per_day_supported``; the CSV's ``trend_s_per_day``
cell is empty otherwise).  A critical path says what it rests on: dependencies
the tool recorded, or only lane order.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import msgspec

from buildtel.services.analyzer.analytics import DAY_S, MIN_DAY_SPAN, MIN_TREND_BUILDS, AnalyticsReport, Trend

SESSION_COLUMNS = ["id", "name", "start_utc", "start", "finish", "duration_s", "outcome", "branch", "commit",
                   "targets", "failed_targets", "cache_hits", "cache_misses", "cache_hit_rate", "target_time_s"]
TARGET_COLUMNS = ["name", "runs", "failures", "failure_rate", "total_s", "share_of_total", "mean_s", "median_s",
                  "p95_s", "stdev_s", "min_s", "max_s", "cache_hits", "cache_misses", "cache_hit_rate", "flaky",
                  "flaky_commits", "trend", "trend_s_per_build", "trend_s_per_day", "trend_r2", "trend_p_value",
                  "critical_s", "what_if_saved_s"]

_json_dec = msgspec.json.Decoder(AnalyticsReport)


def stated(obj: object) -> object:
    """``obj`` as plain data with every field present, defaults included (``null`` for None).

    Some Structs of a report leave fields at their default out when encoded (``ReportFilter`` is
    ``omit_defaults``); a script reading the export should not have to know each default."""
    if isinstance(obj, msgspec.Struct):
        cfg = obj.__struct_config__
        out: dict[str, object] = {} if cfg.tag is None else {cfg.tag_field or "type": cfg.tag}
        for attr, name in zip(obj.__struct_fields__, obj.__struct_encode_fields__, strict=True):
            out[name] = stated(getattr(obj, attr))
        return out
    if isinstance(obj, dict):
        return {k: stated(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [stated(v) for v in obj]
    return obj


def to_json(report: AnalyticsReport, *, indent: int = 2) -> str:
    """The report, every field stated (defaults included); :func:`report_from_json` reads it back."""
    raw = msgspec.json.encode(stated(report))
    return (msgspec.json.format(raw, indent=indent) if indent else raw).decode() + "\n"


def report_from_json(text: str | bytes) -> AnalyticsReport:
    return _json_dec.decode(text)


def _iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _cell(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form: float(cell) gives the report's number back
    return v


def sessions_csv(report: AnalyticsReport) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SESSION_COLUMNS)
    for r in report.session_rows:
        w.writerow([_cell(v) for v in (r.id, r.name, _iso(r.start), r.start, r.finish, r.duration_s, r.outcome,
                                       r.branch, r.commit, r.targets, r.failed_targets, r.cache_hits, r.cache_misses,
                                       r.cache_hit_rate, r.target_time_s)])
    return buf.getvalue()


def targets_csv(report: AnalyticsReport) -> str:
    crit = {b.name: b for b in (report.bottlenecks.targets if report.bottlenecks else [])}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(TARGET_COLUMNS)
    for t in report.targets:
        b = crit.get(t.name)
        w.writerow([_cell(v) for v in (
            t.name, t.runs, t.failures, t.failure_rate, t.total_s, t.share_of_total, t.mean_s, t.median_s, t.p95_s,
            t.stdev_s, t.min_s, t.max_s, t.cache_hits, t.cache_misses, t.cache_hit_rate, t.flaky, t.flaky_commits,
            t.trend.direction, t.trend.per_build.slope,
            t.trend.per_day.slope if t.trend.per_day_supported else None, t.trend.per_build.r2,
            t.trend.per_build.p_value, b.critical_s if b else None,
            b.what_if.saved_s if b and b.what_if else None)])
    return buf.getvalue()


def fmt_s(s: float) -> str:
    """12.3s, 4m 05s, 2h 03m: short durations for people."""
    if s < 60:
        return f"{s:.1f}s" if s >= 1 else f"{s * 1000:.0f}ms"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def summary(report: AnalyticsReport, *, top: int = 10) -> str:
    r = report
    if r.sessions == 0:
        return "No sessions match.\n"
    d = r.duration
    lines = [
        f"Builds: {r.sessions} from {_iso(r.window_start)[:16]} to {_iso(r.window_end)[:16]} UTC"
        + (" (partial: " + "; ".join(n.removeprefix("partial: ") for n in r.notes) + ")" if r.partial else ""),
        (f"Outcome: {r.succeeded} succeeded, {r.failed} failed, {r.abandoned} abandoned "
         f"(success rate {_pct(r.success_rate)})"
         # Stopped early or not known how they ended: outside the rate and the build times.
         + (f"; {r.cancelled} cancelled, {r.unknown} unknown (in neither the success rate nor build times)"
            if r.cancelled or r.unknown else "")
         + (f"; {r.incomplete} INCOMPLETE (lost events; left out of build times)" if r.incomplete else "")),
        (f"Build time: median {fmt_s(d.median_s)}, mean {fmt_s(d.mean_s)}, p90 {fmt_s(d.p90_s)}, "
         f"p95 {fmt_s(d.p95_s)}, sd {fmt_s(d.stdev_s)}"),
    ]
    if d.fastest and d.slowest:
        lines.append(f"  fastest {fmt_s(d.min_s)} (session {d.fastest.session_id}), "
                     f"slowest {fmt_s(d.max_s)} (session {d.slowest.session_id})")
    if r.trend.per_build.n >= MIN_TREND_BUILDS:
        lines.append(trend_line(r.trend))
    lines.append(f"Cache hit rate: {_pct(r.cache_hit_rate)} ({r.cache_hits} hits, {r.cache_misses} misses)")
    if r.targets:
        lines.append(f"Top targets by total time (of {len(r.targets)}):")
        for x in r.targets[:top]:
            flags = (" FLAKY" if x.flaky else "") + (f" {x.trend.direction}" if x.trend.significant else "")
            lines.append(f"  {x.name}: {_pct(x.share_of_total)} of target time, median {fmt_s(x.median_s)}, "
                         f"p95 {fmt_s(x.p95_s)}, hit {_pct(x.cache_hit_rate)}, fail {_pct(x.failure_rate)}{flags}")
    flaky = [x for x in r.targets if x.flaky]
    if flaky:
        lines.append("Flaky targets: " + ", ".join(f"{x.name} ({x.flaky_commits} commits)" for x in flaky[:top]))
    b = r.bottlenecks
    if b and b.targets:
        if b.with_dependencies == b.sessions_analysed:
            basis = "derived from dependencies"
        elif b.with_dependencies:
            basis = f"{b.with_dependencies} derived from dependencies, the others lane order"
        else:
            basis = "lane order (no dependency data)"
        lines.append(f"Bottlenecks (critical paths of the last {b.sessions_analysed} builds, {basis}):")
        for bn in b.targets[:top]:
            wi = bn.what_if
            gain = f"; {b.speedup_pct:.0f}% faster saves {fmt_s(wi.saved_s)} per build" if wi else ""
            lines.append(f"  {bn.name}: {_pct(bn.critical_share)} of critical-path time, on the path in "
                         f"{bn.on_critical_path} builds{gain}")
        if b.latest and b.latest.steps:
            cp = b.latest
            label = f", {cp.label}" if cp.label else ""
            lines.append(f"Latest critical path{label} ({cp.session_id}, {fmt_s(cp.wall_s)} wall, "
                         f"{fmt_s(cp.path_s)} working, {fmt_s(cp.wait_s)} waiting): "
                         + " -> ".join(s.name for s in cp.steps[-8:]))
    return "\n".join(lines) + "\n"


def trend_line(t: Trend) -> str:
    """The build-time trend with its confidence, per day only over a span of days."""
    word = {"rising": "getting slower", "falling": "getting faster", "flat": "no significant trend"}[t.direction]
    pb = t.per_build
    line = (f"Trend: {word}: {pb.slope:+.3f}s per build (95% CI {pb.ci_low:+.3f} to {pb.ci_high:+.3f}, "
            f"p={pb.p_value:.3g}, r²={pb.r2:.2f}, {pb.n} builds)")
    pd = t.per_day
    if t.per_day_supported:
        return line + (f"; {pd.slope:+.2f}s per day (95% CI {pd.ci_low:+.2f} to {pd.ci_high:+.2f}, "
                       f"builds over {t.span_days:.1f} days)")
    return line + (f"; no per-day rate: the builds cover {fmt_s(t.span_days * DAY_S)}, "
                   f"a per-day rate needs {MIN_DAY_SPAN:g} days")
