"""Import Trace Event Format files (Bazel ``--profile``, clang ``-ftime-trace``, CMake
``--profiling-output``) as a BuildSession plus the trace's spans.

Input: a JSON object with ``traceEvents`` or a bare JSON array of events
(whose closing ``]`` may be missing, as the format allows), gzipped or not —
detected by the gzip magic bytes.  Timed slices are ``X`` events (``ts`` + ``dur``)
and ``B``/``E`` pairs, matched per (pid, tid) as a stack; times are microseconds.
``M`` events name processes and threads (the lanes, used as workers).  Everything
else (counters ``C``, instants ``i``/``I``, async — except clang's ``Source`` ``b``/``e`` pairs,
matched like ``B``/``E`` on a lane of their own —, flow, samples, objects) is
counted in ``details["ignored"]`` and otherwise ignored.  Every slice becomes a
:class:`TraceSpan` (times as in the file, ``parent`` = innermost enclosing span on
the same thread) so the trace can be stored or re-exported later.

How slices become targets depends on the producer (see
``shared/importers/trace_targets.py``): Bazel → one target per ``action
processing`` event; clang → one target (the source file) with the compiler's
top-level stages as phases; CMake → one target per top-level command; other
producers → the top-level slices of every thread.

Malformed input raises :class:`ImportFormatError` naming the line (of the
decompressed text) where the offending event starts; unmatched ``B``/``E`` events
are tolerated with a warning (a trace cut short by a crash keeps its open slices
until the last timestamp).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from buildtel.shared.importers.common import (
    ImportFormatError,
    ParseWarning,
    clean_text,
    decode_utf8,
    maybe_gunzip,
)

# The span types live in trace_spans.py (trace_targets.py needs them too); re-exported from here.
from buildtel.shared.importers.trace_spans import ChromeTraceImport as ChromeTraceImport
from buildtel.shared.importers.trace_spans import TraceSpan as TraceSpan
from buildtel.shared.importers.trace_spans import async_lane
from buildtel.shared.importers.trace_targets import build_session

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _clean(v: Any, depth: int = 0) -> Any:
    """JSON values that any encoder (msgpack included) can write back: huge ints become text."""
    if depth > 32:  # deeper args are not build data; keep recursion bounded
        return "<nested too deep>"
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v if _INT_MIN <= v <= _INT_MAX else str(v)
    if isinstance(v, str):
        return clean_text(v)
    if isinstance(v, dict):
        return {clean_text(str(k)): _clean(x, depth + 1) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x, depth + 1) for x in v]
    return v


def _event_lines(text: str, in_object: bool) -> list[int]:
    """Line on which each trace event starts; only computed to name bad events.

    Called after ``json.loads`` succeeded, so the text is valid JSON and a small
    scanner (strings, nesting, commas) is enough.  One pass for all events keeps
    many warnings cheap.
    """
    lines: list[int] = []
    line, depth, i, n = 1, 0, 0, len(text)
    events_depth = None if in_object else 1
    awaiting, last_str = False, ""
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        elif awaiting and depth == events_depth and not c.isspace() and c not in ",]":
            lines.append(line)
            awaiting = False
            continue  # re-read this character as the start of the element
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            last_str = text[i + 1:j] if depth == 1 else last_str
            i = j
        elif c in "[{":
            depth += 1
            if events_depth is None and c == "[" and depth == 2 and last_str == "traceEvents":
                events_depth = 2
            if depth == events_depth and c == "[":
                awaiting = True
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == events_depth:
            awaiting = True
        i += 1
    return lines


def _line_finder(text: str, in_object: bool) -> Any:
    cache: list[list[int]] = []

    def line_of(index: int) -> int:
        if not cache:
            cache.append(_event_lines(text, in_object))
        lines = cache[0]
        return lines[index] if 0 <= index < len(lines) else 1

    return line_of


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # The array format may omit its closing bracket (writers killed mid-trace).
        stripped = text.rstrip().rstrip(",")
        if stripped.lstrip().startswith("["):
            try:
                return json.loads(stripped + "]")
            except (json.JSONDecodeError, RecursionError):
                pass
        raise ImportFormatError(f"invalid JSON: {exc.msg}", exc.lineno) from None
    except RecursionError:
        raise ImportFormatError("JSON nested too deeply") from None


def _num(ev: dict[str, Any], key: str, where: str) -> float:
    v = ev.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"{where} event needs a numeric {key!r}, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        raise ValueError(f"{key!r} out of range") from None
    if not math.isfinite(f):
        raise ValueError(f"{key!r} is not finite")
    return f


def _ident(v: Any) -> int | str:
    if isinstance(v, int) and not isinstance(v, bool) and _INT_MIN <= v <= _INT_MAX:
        return v
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        return int(v)
    return 0 if v is None else clean_text(str(v))


@dataclass
class _Parsed:
    spans: list[TraceSpan] = field(default_factory=list)
    threads: dict[tuple[int | str, int | str], str] = field(default_factory=dict)
    processes: dict[int | str, str] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    x_events: int = 0
    be_pairs: int = 0
    warnings: list[ParseWarning] = field(default_factory=list)


def _read_events(events: list[Any], line_of: Any) -> _Parsed:
    out = _Parsed()
    stacks: dict[tuple[int | str, int | str], list[tuple[int, dict[str, Any], float]]] = {}
    last_ts = -math.inf
    for i, ev in enumerate(events):
        try:
            if not isinstance(ev, dict):
                raise TypeError(f"trace event is a {type(ev).__name__}, not an object")
            ph = ev.get("ph")
            if not isinstance(ph, str):
                raise TypeError("trace event without a 'ph' (phase) string")
            pid, tid = _ident(ev.get("pid")), _ident(ev.get("tid"))
            if ph == "M":
                args = ev.get("args")
                label = args.get("name") if isinstance(args, dict) else None
                if ev.get("name") == "thread_name" and label is not None:
                    out.threads[(pid, tid)] = clean_text(str(label))
                elif ev.get("name") == "process_name" and label is not None:
                    out.processes[pid] = clean_text(str(label))
                continue
            if ph in ("b", "e") and ev.get("name") == "Source" and ev.get("cat") == "Source":
                # clang >= 19 writes its included-file slices as nestable async events (they need not
                # nest with the parser's slices): matched on a lane of their own, like B/E.
                tid, ph = async_lane(tid), "B" if ph == "b" else "E"
            elif ph not in ("X", "B", "E"):
                out.ignored[ph] = out.ignored.get(ph, 0) + 1
                continue
            ts = _num(ev, "ts", ph)
            last_ts = max(last_ts, ts)
            if ph == "X":
                dur = _num(ev, "dur", "X") if "dur" in ev else 0.0
                if dur < 0:
                    raise ValueError(f"X event with negative duration {dur}")
                out.spans.append(_span(ev, pid, tid, ts, dur, ev.get("args")))
                out.x_events += 1
                last_ts = max(last_ts, ts + dur)
            elif ph == "B":
                stacks.setdefault((pid, tid), []).append((i, ev, ts))
            else:
                stack = stacks.get((pid, tid))
                if not stack:
                    out.warnings.append(ParseWarning(line_of(i),
                                                     f"E event without a matching B on {pid}/{tid}; ignored"))
                    continue
                _, begin, bts = stack.pop()
                if ts < bts:
                    raise ValueError(f"E event at {ts} before its B event at {bts}")
                args = {**_dict_or_empty(begin.get("args")), **_dict_or_empty(ev.get("args"))}
                out.spans.append(_span(begin, pid, tid, bts, ts - bts, args))
                out.be_pairs += 1
        except (TypeError, ValueError) as exc:
            raise ImportFormatError(f"trace event {i}: {exc}", line_of(i)) from None
    for (pid, tid), stack in stacks.items():
        for i, begin, bts in stack:
            out.warnings.append(ParseWarning(line_of(i), f"B event {str(begin.get('name', ''))[:60]!r} on "
                                                         f"{pid}/{tid} never ended; closed at the last timestamp"))
            out.spans.append(_span(begin, pid, tid, bts, max(0.0, last_ts - bts), begin.get("args")))
    return out


def _dict_or_empty(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _span(ev: dict[str, Any], pid: int | str, tid: int | str, ts: float, dur: float, args: Any) -> TraceSpan:
    name, cat = ev.get("name", ""), ev.get("cat", "")
    return TraceSpan(name=clean_text(name if isinstance(name, str) else json.dumps(name)),
                     category=clean_text(cat if isinstance(cat, str) else json.dumps(cat)),
                     pid=pid, tid=tid, start_us=ts, dur_us=dur, args=_clean(_dict_or_empty(args)))


def nest(spans: list[TraceSpan]) -> list[TraceSpan]:
    """Order spans by thread and start, and set each one's parent (innermost enclosing span).

    Longer spans sort first at equal start so that a parent precedes its children.  A
    span that starts inside another but ends after it (improper nesting, e.g. from
    timestamp rounding) gets the innermost span that does contain it as parent.
    """
    order = sorted(range(len(spans)), key=lambda i: (str(spans[i].pid), str(spans[i].tid), spans[i].start_us,
                                                      -spans[i].dur_us, i))
    out = [spans[i] for i in order]
    stack: list[int] = []
    prev_thread: tuple[str, str] | None = None
    for idx, s in enumerate(out):
        thread = (str(s.pid), str(s.tid))
        if thread != prev_thread:
            stack, prev_thread = [], thread
        while stack and out[stack[-1]].end_us <= s.start_us:
            stack.pop()
        while stack and out[stack[-1]].end_us < s.end_us:
            stack.pop()
        s.parent = stack[-1] if stack else -1
        stack.append(idx)
    return out


def parse_chrome_trace(
    data: bytes, *, base_time: float | None = None, file_mtime: float | None = None, source: str = "",
    exit_code: int | None = None,
) -> ChromeTraceImport:
    """Parse a trace into one BuildSession and its spans.

    ``base_time`` (Unix seconds) is when the trace's first span started; without it
    the producer's own clock is used (clang ``beginningOfTime``, Bazel
    ``otherData.date``), else ``file_mtime`` as the end of the last span.  A trace says
    nothing of how the build ended: the outcome is ``unknown`` unless ``exit_code`` (of the
    command that wrote the trace) is given.
    """
    raw = maybe_gunzip(data)
    text = decode_utf8(raw, "trace")
    doc = _load(text)
    if isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list):
        events, meta = doc["traceEvents"], doc
    elif isinstance(doc, list):
        events, meta = doc, {}
    else:
        raise ImportFormatError("not a trace: expected an object with a 'traceEvents' array or an array of events")
    parsed = _read_events(events, _line_finder(text, isinstance(doc, dict)))
    if not parsed.spans:
        raise ImportFormatError("trace has no complete (X) or begin/end (B/E) events to import")
    spans = nest(parsed.spans)
    result = ChromeTraceImport("chrome-trace", [], parsed.warnings, spans=spans, threads=parsed.threads,
                               processes=parsed.processes)
    result.details.update(events=len(events), x_events=parsed.x_events, be_pairs=parsed.be_pairs,
                          spans=len(spans), threads=len({(s.pid, s.tid) for s in spans}), ignored=parsed.ignored)
    result.sessions.append(build_session(result, meta, raw, base_time=base_time, file_mtime=file_mtime,
                                         source=source, exit_code=exit_code))
    return result
