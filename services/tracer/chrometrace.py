"""A trace as Chrome's Trace Event Format (JSON object form), which Perfetto (ui.perfetto.dev) and
``chrome://tracing`` open: one process per service, one track per build worker.

Format: https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU —
``{"traceEvents": [...], "displayTimeUnit": "ms"}``; each span is a *complete* event
(``"ph": "X"``) with ``ts``/``dur`` in microseconds (floats keep the nanoseconds), ``pid``/``tid``
integers, ``name``, ``cat`` and ``args`` (the span's attributes, status and ids); metadata events
(``"ph": "M"``) name the processes (``process_name``) and tracks (``thread_name``,
``thread_sort_index``).

Tracks: a target span goes on its worker's track (``build.worker``), its phase spans with it;
the build's own span on a track of its own; any other span (a compiler's, an OTLP client's)
on its service's track.  Complete events on one track must nest (each inside the one below it or
after it): where two spans of one worker overlap (clocks of different agents, a retried
target), the later one goes on a second track of that worker (``w3 (2)``), so nothing is
dropped or drawn across another.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from buildtel.shared.tracemodel import KIND_NAMES, STATUS_NAMES, SpanRecord

BUILD_TRACK = "build"


def _group(span: SpanRecord, parents: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(process, track name before lanes) of a span."""
    service = span.service_name
    worker = span.attributes.get("build.worker")
    if isinstance(worker, str) and worker:
        return service, f"worker {worker}"
    if span.parent_span_id in parents:
        return parents[span.parent_span_id]  # a phase: with its target
    if "build.targets" in span.attributes:
        return service, BUILD_TRACK
    return service, service


class _Lanes:
    """Tracks of one group: each a stack of open (end) times; a span goes on the first track where
    it nests inside the innermost open span or starts after every open span ended."""

    def __init__(self) -> None:
        self.stacks: list[list[int]] = []

    def place(self, start: int, end: int, prefer: int | None = None) -> int:
        """The track for [start, end): ``prefer`` (the parent's) when it fits there, else the first."""
        order = range(len(self.stacks))
        for i in ([prefer] if prefer is not None else []) + list(order):
            stack = self.stacks[i]
            while stack and stack[-1] <= start:
                stack.pop()
            if not stack or end <= stack[-1]:
                stack.append(end)
                return i
        self.stacks.append([end])
        return len(self.stacks) - 1


def _args(span: SpanRecord) -> dict[str, Any]:
    args: dict[str, Any] = {k: v for k, v in span.attributes.items() if not isinstance(v, bytes)}
    args["span_id"] = span.span_id
    args["trace_id"] = span.trace_id
    if span.parent_span_id:
        args["parent_span_id"] = span.parent_span_id
    args["kind"] = KIND_NAMES.get(span.kind, str(span.kind))
    if span.status_code:
        args["status"] = STATUS_NAMES.get(span.status_code, str(span.status_code))
        if span.status_message:
            args["status_message"] = span.status_message
    return args


def chrome_trace(spans: Iterable[SpanRecord]) -> dict[str, Any]:
    """The Trace Event Format document of ``spans`` (any order)."""
    ordered = sorted(spans, key=lambda s: (s.start_ns, -s.end_ns, s.span_id))
    origin = ordered[0].start_ns if ordered else 0
    groups: dict[str, tuple[str, str]] = {}
    placed: dict[str, int] = {}  # span id -> its track within its group
    lanes: dict[tuple[str, str], _Lanes] = {}
    pids: dict[str, int] = {}
    tids: dict[tuple[str, str, int], int] = {}
    events: list[dict[str, Any]] = []
    for span in ordered:
        group = groups[span.span_id] = _group(span, groups)
        service, track = group
        start, end = span.start_ns, max(span.end_ns, span.start_ns)
        parent_lane = placed.get(span.parent_span_id) if groups.get(span.parent_span_id) == group else None
        lane = placed[span.span_id] = lanes.setdefault(group, _Lanes()).place(start, end, parent_lane)
        pid = pids.setdefault(service, len(pids) + 1)
        tid = tids.setdefault((service, track, lane), len(tids) + 1)
        events.append({"name": span.name, "cat": _category(span), "ph": "X", "pid": pid, "tid": tid,
                       "ts": (start - origin) / 1000, "dur": (end - start) / 1000, "args": _args(span)})
    meta: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                                   "args": {"name": service}} for service, pid in pids.items()]
    for (service, track, lane), tid in tids.items():
        name = track if lane == 0 else f"{track} ({lane + 1})"
        sort = 0 if track == BUILD_TRACK else tid
        meta.append({"name": "thread_name", "ph": "M", "pid": pids[service], "tid": tid, "args": {"name": name}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": pids[service], "tid": tid,
                     "args": {"sort_index": sort}})
    return {"traceEvents": meta + events, "displayTimeUnit": "ms",
            "otherData": {"trace_ids": sorted({s.trace_id for s in ordered}), "origin_unix_ns": origin}}


def _category(span: SpanRecord) -> str:
    attrs = span.attributes
    if "build.phase" in attrs:
        return "phase"
    if "build.target" in attrs:
        return f"target,{attrs.get('build.cache', 'miss')},{attrs.get('build.status', 'success')}"
    if "build.targets" in attrs:
        return "build"
    return "span"
