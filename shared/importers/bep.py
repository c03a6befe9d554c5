"""Import a Bazel Build Event Protocol JSON stream (``--build_event_json_file``) as one BuildSession.

The file holds one JSON ``BuildEvent`` per line: ``{"id": {<kind>: {...}},
"children": [...], <payload>: {...}}`` (proto3 JSON: camelCase names, int64 as
strings, zero values omitted).  Mapped:

* ``started`` → session id (the invocation uuid, dashes removed: already 128 bits),
  start time, command, Bazel version, working directory;
* ``structuredCommandLine`` (label ``original``) → ``command``, minus the options the
  Bazel client injects (``--client_env`` would leak the user's environment);
* ``pattern`` → session name; ``workspaceStatus``/``buildMetadata`` → host, user and the
  checkout (``BUILD_SCM_*``) — the session's head, read by :func:`.bep_session.header`;
* ``buildFinished`` → finish time, exit code, outcome (``INTERRUPTED``, code 8: cancelled);
  without it the session is abandoned and incomplete, or ``cancelled`` with no exit code when
  an event was aborted ``USER_INTERRUPTED``; ``buildMetrics`` → action cache hits/misses (these
  count *actions*; they become the session's cache figures), actions executed and created,
  remote cache hits, CPU and phase times; ``testSummary`` → Bazel's verdict per test as labels
  — the session's end, read by :func:`.bep_session.ending`;
* ``targetConfigured`` → the target's kind; ``targetCompleted`` → one target per
  label and configuration (:func:`.bep_events.target_name`; success/failed, a failed one's record with
  ``failureDetail``'s message and code; aborted → failed for an analysis or loading failure,
  else skipped/cancelled).  BEP has no per-target timing, so these targets have duration 0
  at the build's start;
* ``testResult`` → one target per test label, run and shard (attempts folded, the
  last attempt wins) with status, start, duration, local/remote cache hit,
  exit code and the timing breakdown as phases;
* ``actionCompleted`` (only failed actions unless ``--build_event_publish_all_actions``)
  → a target per action: mnemonic, exit code, times when present; a failed action's
  stdout/stderr → the failure record of its target (read only under the invocation's
  output base, ``workspace`` event: :mod:`.bep_details`);
* ``testResult`` → also a test case per attempt (flaky: failed, then passed);
  ``buildToolLogs`` → the critical path as labels.

The per-event readers and their state are :mod:`.bep_events`; the live BES endpoint
(:mod:`.bep_stream`) folds its stream with those same handlers into the same state, so both
give one session.  Everything else (progress, namedSet, configuration
details, …) is ignored.  The importer never crashes on a stream: malformed lines, unknown event
kinds, payloads of the wrong type (hand-redacted files), aborted events and a
stream that ends without ``lastMessage`` become warnings with line numbers.  Only
input without a single build event raises :class:`ImportFormatError`.
"""

from __future__ import annotations

import json
import re

from buildtel.shared.importers import bep_session
from buildtel.shared.importers.bep_events import (
    AGENT,
    HANDLERS,
    KNOWN_KINDS,
    State,
    build_start,
    completed_target,
    note_abort,
)
from buildtel.shared.importers.common import (
    ImportFormatError,
    ImportResult,
    ParseWarning,
    content_id,
    make_session,
    maybe_gunzip,
    unique_names,
)
from buildtel.shared.protocol import Completeness, TargetMetrics


def _read(data: bytes, st: State) -> None:
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            ev = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            st.warn(n, f"malformed JSON skipped ({str(exc)[:80]})")
            continue
        idv = ev.get("id") if isinstance(ev, dict) else None
        if not isinstance(idv, dict) or len(idv) != 1 or not isinstance(next(iter(idv.values())), dict):
            st.warn(n, "not a build event (no single-kind 'id' object); skipped")
            continue
        kind, body = next(iter(idv.items()))
        st.events += 1
        if st.last_message_line:
            st.warn(n, f"{kind} event after the lastMessage on line {st.last_message_line}")
        if ev.get("lastMessage") is True:
            st.last_message_line = n
        if (reason := note_abort(st, kind, ev, n)) is not None:
            st.warn(n, f"{kind} {str(body.get('label', '')) or kind} aborted: {reason}".rstrip())
        if kind not in KNOWN_KINDS:
            st.warn(n, f"unknown event kind {kind!r} ignored")
            continue
        bad = [k for k, v in ev.items() if k not in ("id", "children", "lastMessage") and not isinstance(v, dict)]
        if bad:  # e.g. payloads hand-replaced by a string to redact them
            st.warn(n, f"{kind} event ignored: its {bad[0]!r} payload is a {type(ev[bad[0]]).__name__}, not an object")
            continue
        if kind == "started":  # the patterns the user asked for are announced as its children
            children = ev.get("children")
            for child in children if isinstance(children, list) else []:
                pat = child.get("pattern") if isinstance(child, dict) else None
                if isinstance(pat, dict) and isinstance(pat.get("pattern"), list):
                    st.requested += [str(p) for p in pat["pattern"]]
        handler = HANDLERS.get(kind)
        if handler is None:
            continue
        try:
            handler(st, body, ev, n)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            st.warn(n, f"malformed {kind} event ignored ({type(exc).__name__}: {str(exc)[:80]})")


def _session_id(st: State, data: bytes) -> str:
    uuid = str(st.started.get("uuid", "")).replace("-", "").lower()
    if re.fullmatch(r"[0-9a-f]{32}", uuid) and uuid != "0" * 32:
        return uuid
    return content_id("bep", data)


def parse_bep(data: bytes, *, source: str = "") -> ImportResult:
    """Parse a BEP JSON stream into one BuildSession (warnings list what was tolerated)."""
    data = maybe_gunzip(data)
    st = State()
    _read(data, st)
    if st.events == 0:
        first = st.warnings[0] if st.warnings else ParseWarning(1, "empty input")
        raise ImportFormatError(f"no Build Event Protocol events found ({first.message})", first.line)
    if not st.last_message_line:
        st.warn(data.count(b"\n") + 1, "stream ended without lastMessage: truncated or still being written")
    return _assemble(st, data, source)


def _targets(st: State, start: float) -> list[TargetMetrics]:
    """Completed targets, tests and actions; events without times are placed at the build's start."""
    targets = [completed_target(st, key, start) for key in st.completed]
    targets += [test.metrics for test in st.tests.values() if test.metrics is not None]
    for m, has_times in st.actions:
        if not has_times:
            m.start = m.end = start
        targets.append(m)
    unique_names(targets)
    return targets


def _assemble(st: State, data: bytes, source: str) -> ImportResult:
    warn_line = data.count(b"\n") + 1  # problems of the stream as a whole are reported at its end
    if not build_start(st):
        st.warn(1, "no usable started event: build start unknown, times fall back to the epoch")
    start = build_start(st)
    targets = _targets(st, start)
    head = bep_session.header(st)
    end = bep_session.ending(st)
    for problem in end.problems:
        st.warn(warn_line, problem)
    completeness = None
    if end.outcome == "abandoned":
        st.warn(warn_line, f"{end.why}; outcome abandoned, session incomplete")
        completeness = Completeness(complete=False, reasons=[end.why])
    elif end.why:
        st.warn(warn_line, end.why)
    labels = {"importer": "bep", **head.labels, **end.labels}
    if source:
        labels["source"] = source
    session = make_session(
        session_id=_session_id(st, data), name=head.name, start=start, finish=max(end.finish, start),
        targets=targets, events=st.events, outcome=end.outcome, exit_code=end.exit_code, command=head.command,
        labels=labels, agent=AGENT, duration_s=end.duration_s, environment=head.environment,
        cache=None if end.outcome == "abandoned" else end.cache,  # abandoned: from the targets, as the collector
        cpu_s=end.cpu_s, completeness=completeness, failures=end.failures, tests=st.test_cases,
    )
    details = {
        "events": st.events, "target_completed": st.completed_events,
        "test_results": sum(t.attempts for t in st.tests.values()), "tests": len(st.tests),
        "actions": st.actions_seen, "warnings": len(st.warnings),
    }
    return ImportResult("bep", [session], st.warnings, details)
