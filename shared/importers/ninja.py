"""Import ``.ninja_log`` files (format versions 5, 6 and 7) as one BuildSession per build.

Format (ninja ``src/build_log.cc``): a header ``# ninja log vN`` then one line per
*output* of every successfully finished edge, ``start_ms<TAB>end_ms<TAB>mtime<TAB>
output<TAB>command_hash``, appended when the edge finishes.  Times are
milliseconds since that ninja invocation started, so one appended log holds
several builds.  The versions differ only in meaning, not layout:

* v5 (ninja ≤ 1.11): ``mtime`` is the newest output mtime after the command ran
  (≈ wall clock at the edge's end); hash = MurmurHash64A of the command, hex.
* v6 (1.12): ``mtime`` is the edge's *start* (ninja touches a lock file when it
  starts the command), or the output mtime for ``restat``/``generator`` rules.
* v7 (1.13): the command hash became rapidhash; it is still hex and is only ever
  compared for equality here, so it is kept as an opaque string (very old v5
  writers printed it in decimal, which is also accepted).

**Where a build starts.**  ninja finishes edges one at a time in its main loop and
computes ``end_ms`` right there, so within one invocation ``end_ms`` never
decreases; ``start_ms`` does (a long edge started early is logged after short
ones).  Rule 1: *an entry whose end_ms is below the previous entry's end_ms starts
a new build* (the rule ninjatracing uses).  It misses a new build whose first
finished edge ends later than everything of the previous build (a tiny
incremental build followed by a bigger one), so rule 2 uses the wall clock hidden
in ``mtime``: each entry estimates when its build's clock started (v5: mtime −
end, v6+: mtime − start); *an estimate later than the current build's running
median by more than that build's extent plus 2 s* (plus the edge's own duration
for v6+, whose restat/generator outputs record end-ish mtimes) can only come
from a later invocation.  A repeated header line (concatenated logs) also starts
a build.  A log rewritten by ninja's recompaction keeps one entry per output and
loses the boundaries; nothing can recover them.  No-op builds write nothing and
failed edges are never logged, so neither is visible in the log.

**Outcome.**  A log alone cannot say how a build ended: its sessions are ``unknown``.  ninja's
console output and/or exit code (``ninja_output.py``) of the run that wrote the log's *last*
build decide that build's outcome, add its ``FAILED:`` edges as failed targets (error text
included; ninja logs no times for them: duration 0, placed when the edge finished before them
ended) and change its id (the evidence is part of it, so an import with evidence is never
dropped as a duplicate of one without).  An output showing that the run finished no edge
successfully means the log holds nothing of that run: refused rather than pinned on an older build.

Edges: consecutive lines with the same (start, end, hash) are the outputs of one
edge → one target named after the first output; the others are kept as zero-length
phases ``output:<path>`` (the schema has no outputs field).  A later entry for an
output already seen in the same build supersedes the earlier one (with a warning:
it hints at a boundary the rules could not see).
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field

from buildtel.shared.importers.common import (
    ImportFormatError,
    ImportResult,
    ParseWarning,
    assign_lanes,
    content_id,
    decode_utf8,
    make_session,
    maybe_gunzip,
    unique_names,
)
from buildtel.shared.importers.ninja_output import NinjaOutput, ninja_outcome, parse_ninja_output
from buildtel.shared.protocol import Phase, TargetMetrics

AGENT = "import:ninja"
SUPPORTED_VERSIONS = (5, 6, 7)
MTIME_SLACK_S = 2.0  # mtime granularity (1-2 s on old filesystems) plus clock jitter

_HEADER = re.compile(r"# ninja log v(\d{1,4})")
_MS = re.compile(r"\d{1,15}")
_MTIME = re.compile(r"-?\d{1,20}")
_HASH = re.compile(r"[0-9a-fA-F]{1,20}")


@dataclass(slots=True)
class _Entry:
    line: int
    start: int
    end: int
    mtime: int
    output: str
    hash: str
    est: float | None = None  # wall-clock estimate of this build's time zero


class _RunningMedian:
    """Median of a growing set in O(log n) per insert (two heaps)."""

    def __init__(self) -> None:
        self.low: list[float] = []  # max-heap (negated)
        self.high: list[float] = []

    def add(self, x: float) -> None:
        if self.low and x > -self.low[0]:
            heapq.heappush(self.high, x)
        else:
            heapq.heappush(self.low, -x)
        if len(self.low) > len(self.high) + 1:
            heapq.heappush(self.high, -heapq.heappop(self.low))
        elif len(self.high) > len(self.low):
            heapq.heappush(self.low, -heapq.heappop(self.high))

    def value(self) -> float | None:
        if not self.low:
            return None
        if len(self.low) > len(self.high):
            return -self.low[0]
        return (-self.low[0] + self.high[0]) / 2


@dataclass
class _Build:
    version: int
    reason: str  # why a new build started here: first, end-decreased, mtime-jump, header
    entries: list[_Entry] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    median: _RunningMedian = field(default_factory=_RunningMedian)
    max_end: int = 0

    def add(self, entry: _Entry, raw: str) -> None:
        self.entries.append(entry)
        self.lines.append(raw)
        self.max_end = max(self.max_end, entry.end)
        if entry.est is not None:
            self.median.add(entry.est)


def wall_seconds(mtime: int) -> float | None:
    """Unix seconds of a logged mtime when it looks like a wall clock, else None.

    ninja ≥ 1.9 on POSIX logs nanoseconds, older ones seconds, Windows builds 100 ns
    units since 2000-01-01.  0 means "no file" (phony-like outputs), so it and any
    other implausible value are ignored.
    """
    if mtime >= 10**17:
        return mtime / 1e9
    if 10**14 <= mtime < 10**17:
        return mtime / 1e7 + 946684800.0
    if 10**8 <= mtime < 10**11:
        return float(mtime)
    return None


def _parse_entry(line: str, n: int, version: int) -> _Entry:
    parts = line.split("\t")
    if len(parts) < 5:
        raise ImportFormatError(f"expected 5 tab-separated fields, found {len(parts)}", n)
    start_s, end_s, mtime_s, *out_parts, hash_s = parts
    output = "\t".join(out_parts)  # ninja reads the hash as the rest after the 4th tab
    if not _MS.fullmatch(start_s) or not _MS.fullmatch(end_s):
        raise ImportFormatError(f"start/end must be milliseconds, got {start_s[:20]!r}/{end_s[:20]!r}", n)
    if not _MTIME.fullmatch(mtime_s):
        raise ImportFormatError(f"mtime must be an integer, got {mtime_s[:30]!r}", n)
    if not _HASH.fullmatch(hash_s):
        raise ImportFormatError(f"command hash must be hexadecimal, got {hash_s[:30]!r}", n)
    if not output:
        raise ImportFormatError("empty output path", n)
    start, end = int(start_s), int(end_s)
    if end < start:
        raise ImportFormatError(f"edge ends ({end} ms) before it starts ({start} ms)", n)
    entry = _Entry(n, start, end, int(mtime_s), output, hash_s.lower())
    wall = wall_seconds(entry.mtime)
    if wall is not None:
        entry.est = wall - (entry.end if version == 5 else entry.start) / 1000.0
    return entry


def _split_builds(text: str) -> list[_Build]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    first = lines[0].rstrip("\r") if lines else ""
    m = _HEADER.fullmatch(first)
    if not m:
        raise ImportFormatError(f"not a ninja log: expected '# ninja log vN', got {first[:40]!r}", 1)
    version = int(m.group(1))
    builds: list[_Build] = []
    cur: _Build | None = None
    reason = "first"
    for n, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")  # tolerate a log that went through a CRLF conversion
        if not line:
            raise ImportFormatError("empty line (ninja never writes one)", n)
        if line.startswith("#"):
            m = _HEADER.fullmatch(line)
            if not m:
                raise ImportFormatError(f"unexpected comment line {line[:40]!r}", n)
            version, cur, reason = int(m.group(1)), None, "header"  # concatenated logs
            continue
        if version not in SUPPORTED_VERSIONS:
            raise ImportFormatError(f"unsupported ninja log version {version} (supported: 5, 6, 7)", n)
        entry = _parse_entry(line, n, version)
        if cur is not None:
            if entry.end < cur.entries[-1].end:
                cur, reason = None, "end-decreased"
            elif entry.est is not None and (ref := cur.median.value()) is not None:
                limit = cur.max_end / 1000.0 + MTIME_SLACK_S
                if version >= 6:
                    limit = max(limit, (entry.end - entry.start) / 1000.0 + MTIME_SLACK_S)
                if entry.est - ref > limit:
                    cur, reason = None, "mtime-jump"
        if cur is None:
            cur = _Build(version, reason)
            builds.append(cur)
        cur.add(entry, line)
    if version not in SUPPORTED_VERSIONS:
        raise ImportFormatError(f"unsupported ninja log version {version} (supported: 5, 6, 7)", 1)
    return builds


def _edges(build: _Build, warnings: list[ParseWarning]) -> list[list[_Entry]]:
    """Group a build's entries into edges; later entries for an output supersede earlier ones."""
    edges: list[list[_Entry]] = []
    owner: dict[str, int] = {}
    for e in build.entries:
        last = edges[-1][-1] if edges else None
        if (last is not None and (last.start, last.end, last.hash) == (e.start, e.end, e.hash)
                and all(x.output != e.output for x in edges[-1])):
            edges[-1].append(e)
        else:
            edges.append([e])
        prev = owner.get(e.output)
        if prev is not None:
            old = next(x for x in edges[prev] if x.output == e.output)
            edges[prev] = [x for x in edges[prev] if x is not old]
            warnings.append(ParseWarning(e.line, f"{e.output!r} logged again in the same build; "
                                                 f"supersedes line {old.line}"))
        owner[e.output] = len(edges) - 1
    return [edge for edge in edges if edge]


def _anchors(builds: list[_Build], base_time: float | None, file_mtime: float | None) -> list[tuple[float, str]]:
    """Wall-clock time of each build's time zero, and where it came from."""
    est = [b.median.value() for b in builds]
    anchors: list[float | None] = [None] * len(builds)
    source = ["chained"] * len(builds)
    if base_time is not None:
        anchors[0], source[0] = base_time, "base_time"
        if est[0] is not None:  # keep the gaps the mtimes show between later builds
            for i, e in enumerate(est):
                if e is not None:
                    anchors[i], source[i] = base_time + e - est[0], "base_time"
    elif any(e is not None for e in est):
        for i, e in enumerate(est):
            if e is not None:
                anchors[i], source[i] = e, "mtime"
    elif file_mtime is not None:  # the log was last written when the last build finished
        anchors[-1], source[-1] = file_mtime - builds[-1].max_end / 1000.0, "file_mtime"
    else:
        anchors[0], source[0] = 0.0, "none"
    for i in range(1, len(builds)):  # builds without a clock follow the previous one
        if anchors[i] is None and anchors[i - 1] is not None:
            anchors[i] = anchors[i - 1] + builds[i - 1].max_end / 1000.0  # type: ignore[operator]
    for i in range(len(builds) - 2, -1, -1):
        if anchors[i] is None and anchors[i + 1] is not None:
            anchors[i] = anchors[i + 1] - builds[i].max_end / 1000.0  # type: ignore[operator]
    return [(a or 0.0, s) for a, s in zip(anchors, source, strict=True)]


def _failed_targets(out: NinjaOutput, edges: list[list[_Entry]], anchor: float) -> list[TargetMetrics]:
    """The output's FAILED edges as failed targets.  ninja logs no times for them, so each sits,
    with duration 0, where the successful edge that finished just before it ended."""
    ends = [edge[0].end for edge in edges]  # log order = the order edges finished
    targets = []
    for fe in out.failed:
        k = min(fe.finished_before, len(ends))
        at = anchor + (max(ends[:k]) if k else 0) / 1000.0
        targets.append(TargetMetrics(
            name=fe.outputs[0] if fe.outputs else f"FAILED edge (output line {fe.line})", start=at, end=at,
            duration_s=0.0, status="failed", agent_id=AGENT, exit_code=fe.code, error=fe.text or None,
            phases=[Phase(f"output:{o}", 0.0) for o in fe.outputs[1:]]))
    return targets


def _check_evidence(out: NinjaOutput | None, builds: list[_Build], warnings: list[ParseWarning]) -> None:
    """Refuse evidence that cannot belong to the log's last build (ninja logs successes only)."""
    if not builds:
        raise ImportFormatError("the log holds no build to apply --output/--exit-code to "
                                "(ninja logs only edges that succeeded)")
    done = out.succeeded_edges if out is not None else None
    if done == 0:
        raise ImportFormatError("the ninja output shows no edge finished successfully in that run, so the log "
                                "holds nothing of it (its last build is an earlier run); nothing was imported")
    logged = len(_edges(builds[-1], []))
    if done is not None and done != logged:
        warnings.append(ParseWarning(builds[-1].entries[0].line, f"the output shows {done} edge(s) finished "
                                     f"successfully, the log's last build {logged}: is it the same run?"))


def parse_ninja_log(
    data: bytes, *, base_time: float | None = None, file_mtime: float | None = None, source: str = "",
    output: bytes | None = None, exit_code: int | None = None, last_build: bool = False,
) -> ImportResult:
    """Parse a whole ``.ninja_log``: one BuildSession per build, oldest first.

    ``base_time`` (Unix seconds) is when the first build's ninja started; without it
    each build is placed by the wall clock in its mtimes, else by ``file_mtime``
    (the log's modification time = end of the last build).  ``output`` (ninja's console
    output) and ``exit_code`` of the run that wrote the last build decide its outcome;
    without them every build is ``unknown``.  ``last_build`` keeps only the newest build (found by
    the same rules; same id and labels as in a whole-log import), ``base_time`` then being its start.
    """
    text = decode_utf8(maybe_gunzip(data), "ninja log")
    builds = _split_builds(text)
    warnings: list[ParseWarning] = []
    out = parse_ninja_output(maybe_gunzip(output)) if output is not None else None
    evidence = output is not None or exit_code is not None
    outcome, said, disagreements = ninja_outcome(out, exit_code)
    if evidence:
        _check_evidence(out, builds, warnings)
        warnings += [ParseWarning(1, f"--output/--exit-code: {w}") for w in disagreements]
    first = max(0, len(builds) - 1) if last_build else 0  # index in the log of the first build imported
    anchors = _anchors(builds[first:], base_time, file_mtime) if builds else []
    if any(s == "none" for _, s in anchors):
        warnings.append(ParseWarning(1, "no wall clock in the log (mtimes are 0) and no base time: "
                                        "times are relative to the Unix epoch"))
    sessions = []
    for i, (build, (anchor, time_source)) in enumerate(zip(builds[first:], anchors, strict=True), start=first):
        edges = _edges(build, warnings)
        lanes = assign_lanes([(edge[0].start, edge[0].end) for edge in edges])
        targets = [
            TargetMetrics(
                name=edge[0].output,
                start=anchor + edge[0].start / 1000.0,
                end=anchor + edge[0].end / 1000.0,
                duration_s=(edge[0].end - edge[0].start) / 1000.0,
                worker=f"lane-{lane}",
                agent_id=AGENT,
                phases=[Phase(f"output:{e.output}", 0.0) for e in edge[1:]],
            )
            for edge, lane in zip(edges, lanes, strict=True)
        ]
        labels = {
            "importer": "ninja",
            "ninja_log_version": str(build.version),
            "build_index": str(i + 1),
            "builds_in_log": str(len(builds)),
            "first_line": str(build.entries[0].line),
            "boundary": build.reason,
            "time_source": time_source,
            "lanes": str(max(lanes, default=-1) + 1),
        }
        if source:
            labels["source"] = source
        last = evidence and i == len(builds) - 1
        ident = ["ninja-log", str(i), "\n".join(build.lines)]
        labels["outcome_evidence"] = said if last else "none"
        if last:
            if out is not None:
                targets += _failed_targets(out, edges, anchor)
                unique_names(targets)
                if out.stopped:
                    labels["ninja_stopped"] = out.stopped
                if out.failed:
                    labels["failed_edge_times"] = "not logged by ninja: duration 0, at the end of the edge before"
            ident += [said, "" if output is None else content_id(output)]
        sessions.append(make_session(
            session_id=content_id(*ident),
            name=f"ninja build {i + 1}/{len(builds)}" + (f" of {source}" if source else ""),
            start=anchor,
            finish=anchor + build.max_end / 1000.0,
            targets=targets,
            events=len(build.entries),
            duration_s=build.max_end / 1000.0,
            labels=labels,
            agent=AGENT,
            outcome=outcome if last else "unknown",
            exit_code=exit_code if last else None,
        ))
    details = {
        "builds": len(builds),
        "entries": sum(len(b.entries) for b in builds),
        "edges": sum(len(s.targets) for s in sessions) - (len(out.failed) if evidence and out is not None else 0),
        "failed_edges": len(out.failed) if out is not None else 0,  # from --output; not in the log
        "versions": sorted({b.version for b in builds}),
    }
    if last_build:  # the figures above are the whole log's; say what was left out
        details["builds_skipped"] = first
        details["entries_skipped"] = sum(len(b.entries) for b in builds[:first])
    return ImportResult("ninja", sessions, warnings, details)
