"""Turn the spans of a parsed trace into a BuildSession, one rule per producer.

Which slices are "targets" differs by tool, so the producer is recognised first:

* **bazel** (``otherData.build_id``/``output_base`` or ``build phase marker`` events):
  one target per ``action processing`` slice (Bazel's executed actions), worker =
  the skyframe thread name, mnemonic from ``args.mnemonic`` when the profile has
  it, direct child slices (e.g. ``complete action execution``) as phases.  The
  profile's ``otherData.date`` (second precision) anchors the clock;
  ``critical path component`` slices are summed into a ``critical_path_s`` label.
* **clang** (``ExecuteCompiler`` slices): one target per compiler run, named after
  the source file the compiler says it compiled (``clang_trace.py``: ``OptModule``, then
  top-level ``ParseDeclarationOrFunctionDefinition``, then the trace file name), phases =
  direct children (``Frontend``, ``Backend``…) plus the ``header:``/``template:`` cost
  breakdown.  ``beginningOfTime`` anchors the clock.  The ``Total …`` summary slices clang
  writes on extra threads stay in the spans but are not targets.
* **cmake** (``cat == "cmake"``): one target per top-level command invocation,
  named ``<command> <file:line>``, phases = the commands it ran directly.  CMake
  uses a monotonic clock and says so nowhere in the file: times need ``--start``/``--base-time``
  or fall back to the file's mtime as the end of the trace, with a warning saying which.
* **generic**: the top-level slices of every thread.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import PurePath
from typing import Any

import msgspec

from buildtel.shared.importers.clang_trace import cost_phases, source_file
from buildtel.shared.importers.common import (
    ParseWarning,
    content_id,
    iso,
    make_session,
    outcome_of_exit_code,
    unique_names,
)
from buildtel.shared.importers.trace_spans import ChromeTraceImport, TraceSpan
from buildtel.shared.protocol import BuildSession, Phase, TargetMetrics

AGENT = "import:chrome-trace"
# labels.start_from: where the session's start came from, in words (a guess is never silent).
START_FROM = {"base_time": "--start (given to the import)", "beginningOfTime": "the trace (clang beginningOfTime)",
              "otherData.date": "the trace (Bazel otherData.date, 1 s precision)",
              "file_mtime": "the file's modification time (the trace has no wall clock)",
              "none": "nowhere: no clock in the trace and none given (times from the Unix epoch)"}
# Java's Date.toString() zone abbreviations Bazel writes into otherData.date; CST is read as US Central.
_TZ_HOURS = {
    "UTC": 0, "GMT": 0, "Z": 0, "WET": 0, "WEST": 1, "BST": 1, "CET": 1, "CEST": 2, "EET": 2, "EEST": 3,
    "MSK": 3, "IST": 5.5, "JST": 9, "KST": 9, "AWST": 8, "ACST": 9.5, "AEST": 10, "AEDT": 11, "NZST": 12,
    "NZDT": 13, "EST": -5, "EDT": -4, "CST": -6, "CDT": -5, "MST": -7, "MDT": -6, "PST": -8, "PDT": -7,
    "AKST": -9, "AKDT": -8, "HST": -10,
}
_MONTHS = {m: i for i, m in enumerate(
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], start=1)}
_JAVA_DATE = re.compile(r"\w{3} (\w{3}) +(\d{1,2}) (\d\d):(\d\d):(\d\d) (\S+) (\d{4})")


def java_date(text: str) -> tuple[float | None, str]:
    """Unix seconds from ``Wed Aug 03 17:35:01 MDT 2022``; (None, reason) when unusable."""
    import datetime as dt

    m = _JAVA_DATE.fullmatch(text.strip())
    if not m or m.group(1) not in _MONTHS:
        return None, f"unrecognised date {text[:40]!r}"
    mon, day, hh, mm, ss, zone, year = m.groups()
    offset = _TZ_HOURS.get(zone)
    note = ""
    if offset is None:
        offset, note = 0, f"unknown time zone {zone!r} in otherData.date, read as UTC"
    try:
        when = dt.datetime(int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss), tzinfo=dt.UTC)
    except ValueError as exc:
        return None, f"bad date {text[:40]!r}: {exc}"
    return when.timestamp() - offset * 3600, note


def detect(result: ChromeTraceImport, meta: dict[str, Any]) -> str:
    other = meta.get("otherData")
    cats = Counter(s.category for s in result.spans)
    if (isinstance(other, dict) and ("build_id" in other or "output_base" in other)) or cats["build phase marker"]:
        return "bazel"
    if any(s.name == "ExecuteCompiler" for s in result.spans):
        return "clang"
    if cats["cmake"] and cats["cmake"] >= len(result.spans) / 2:
        return "cmake"
    return "generic"


def _children(spans: list[TraceSpan]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in spans]
    for i, s in enumerate(spans):
        if s.parent >= 0:
            kids[s.parent].append(i)
    return kids


def _phases(spans: list[TraceSpan], kids: list[int]) -> list[Phase]:
    """Direct children summed by name, in order of first appearance."""
    total: dict[str, float] = {}
    for k in kids:  # sum microseconds, convert once: fewer rounding artefacts
        total[spans[k].name] = total.get(spans[k].name, 0.0) + spans[k].dur_us
    return [Phase(name, dur / 1e6) for name, dur in total.items()]


def _select(producer: str, spans: list[TraceSpan], source: str) -> list[tuple[int, str, str | None]]:
    """(span index, target name, kind) of the spans that become targets."""
    if producer == "bazel":
        picked: list[tuple[int, str, str | None]] = [
            (i, s.name, "action") for i, s in enumerate(spans) if s.category == "action processing"]
        if picked:
            return picked
    elif producer == "clang":
        return [(i, "", "compile") for i, s in enumerate(spans) if s.name == "ExecuteCompiler"]
    elif producer == "cmake":
        return [(i, f"{s.name} {s.args.get('location', '')}".strip(), "cmake_command")
                for i, s in enumerate(spans) if s.parent < 0]
    return [(i, s.name, None) for i, s in enumerate(spans) if s.parent < 0]


def _clock(producer: str, result: ChromeTraceImport, meta: dict[str, Any], base_time: float | None,
           file_mtime: float | None, lo: float, hi: float) -> tuple[float, str]:
    if base_time is not None:
        return base_time - lo / 1e6, "base_time"
    bot = meta.get("beginningOfTime")
    if producer == "clang" and isinstance(bot, int | float) and not isinstance(bot, bool) and bot > 0:
        return bot / 1e6, "beginningOfTime"
    other = meta.get("otherData")
    if producer == "bazel" and isinstance(other, dict) and isinstance(other.get("date"), str):
        when, note = java_date(other["date"])
        if note:
            result.warnings.append(ParseWarning(1, note))
        if when is not None:
            return when, "otherData.date"
    if file_mtime is not None:
        why = {"cmake": "CMake profiles record a monotonic clock, not the time of day",
               "clang": "no beginningOfTime", "bazel": "no usable otherData.date"}.get(producer, "no clock field")
        result.warnings.append(ParseWarning(1, f"the trace has no wall clock ({why}): its start, "
                                               f"{iso(file_mtime - (hi - lo) / 1e6)}, was taken from the file's "
                                               "modification time (as the end of the trace); give --start to set it"))
        return file_mtime - hi / 1e6, "file_mtime"
    result.warnings.append(ParseWarning(1, "the trace has no wall clock and no base time was given: "
                                           "times are relative to the Unix epoch"))
    return 0.0, "none"


def build_session(result: ChromeTraceImport, meta: dict[str, Any], raw: bytes, *, base_time: float | None,
                  file_mtime: float | None, source: str, exit_code: int | None = None) -> BuildSession:
    spans = result.spans
    producer = detect(result, meta)
    lo = min(s.start_us for s in spans)
    hi = max(s.end_us for s in spans)
    base, time_source = _clock(producer, result, meta, base_time, file_mtime, lo, hi)
    result.producer, result.time_base_s, result.time_source = producer, base, time_source
    kids = _children(spans)
    picked = _select(producer, spans, source)
    if producer == "bazel" and not any(spans[i].category == "action processing" for i, _, _ in picked):
        result.warnings.append(ParseWarning(1, "Bazel profile without 'action processing' events: "
                                               "top-level slices used as targets"))
    targets = []
    clang_labels: dict[str, str] = {}
    for i, name, kind in picked:
        s = spans[i]
        phases = _phases(spans, kids[i])
        if producer == "clang":
            name, clang_labels["source_file_from"] = source_file(spans, i, source, result.warnings)
            costs, counts = cost_phases(spans, i)
            phases += costs
            clang_labels.update(counts)
        thread = result.threads.get((s.pid, s.tid)) or f"{result.processes.get(s.pid, s.pid)}/{s.tid}"
        mnemonic = s.args.get("mnemonic")
        targets.append(TargetMetrics(
            name=name or "(unnamed)", start=base + s.start_us / 1e6, end=base + s.end_us / 1e6,
            duration_s=s.dur_us / 1e6, worker=thread, agent_id=AGENT, kind=kind,
            mnemonic=mnemonic if isinstance(mnemonic, str) else None, phases=phases,
        ))
    unique_names(targets)
    labels = {"importer": "chrome-trace", "producer": producer, "time_source": time_source,
              "start_from": START_FROM[time_source],
              "spans": str(len(spans)), **clang_labels}
    other = meta.get("otherData")
    if producer == "bazel" and isinstance(other, dict) and other.get("build_id"):
        labels["bazel_build_id"] = str(other["build_id"])  # the invocation id: joins the BEP import
    if producer == "bazel":
        crit = sum(s.dur_us for s in spans if s.category == "critical path component") / 1e6
        labels["critical_path_s"] = f"{crit:.3f}"
    if source:
        labels["source"] = source
    labels["outcome_evidence"] = "none" if exit_code is None else f"exit code {exit_code}"
    names = {"bazel": "bazel profile", "clang": f"clang {targets[0].name}" if targets else "clang",
             "cmake": "cmake profile", "generic": "trace"}
    # The exit code is part of the id: an import with it is never dropped as a duplicate of one without.
    ident = ("chrome-trace", raw) if exit_code is None else ("chrome-trace", raw, str(exit_code))
    return make_session(
        session_id=content_id(*ident),
        name=names[producer] + (f" ({PurePath(source).name})" if source and producer != "clang" else ""),
        start=base + lo / 1e6, finish=base + hi / 1e6, duration_s=(hi - lo) / 1e6,
        targets=targets, events=int(result.details.get("events", len(spans))), labels=labels, agent=AGENT,
        outcome="unknown" if exit_code is None else outcome_of_exit_code(exit_code), exit_code=exit_code,
    )


def merge_compiles(sessions: list[BuildSession], name: str = "") -> BuildSession:
    """The compiles of several clang traces (one session each) as one session, one target per
    compile: a build's ``-ftime-trace`` files imported together, so its header and template costs
    add up across its files (``buildtel import chrome-trace --merge``)."""
    targets = [msgspec.structs.replace(t) for s in sessions for t in s.targets]
    unique_names(targets)
    sources = sorted({s.labels.get("time_source", "none") for s in sessions})
    start, finish = min(s.start for s in sessions), max(s.finish for s in sessions)
    return make_session(
        session_id=content_id("chrome-trace-merge", *sorted(s.id for s in sessions)),
        name=name or f"clang build ({len(sessions)} compiles)", start=start, finish=finish,
        targets=targets, events=sum(s.totals.events for s in sessions), agent=AGENT, outcome="unknown",
        labels={"importer": "chrome-trace", "producer": "clang", "merged_traces": str(len(sessions)),
                "time_source": ",".join(sources), "outcome_evidence": "none"},
    )
