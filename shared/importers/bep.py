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
  label and configuration (:func:`target_name`; success/failed, a failed one's record with
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

The live BES endpoint (:mod:`.bep_stream`) folds its stream with these same handlers into the
same state, so both give one session.  Everything else (progress, namedSet, configuration
details, …) is ignored.  The importer never crashes on a stream: malformed lines, unknown event
kinds, payloads of the wrong type (hand-redacted files), aborted events and a
stream that ends without ``lastMessage`` become warnings with line numbers.  Only
input without a single build event raises :class:`ImportFormatError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from buildtel.shared.capture.failures import MAX_FAILURES
from buildtel.shared.failrecord import from_error
from buildtel.shared.importers import bep_session
from buildtel.shared.importers import proto_json as pj
from buildtel.shared.importers.bep_details import Failures, TestSummaries, critical_path, test_case
from buildtel.shared.importers.common import (
    ImportFormatError,
    ImportResult,
    ParseWarning,
    content_id,
    make_session,
    maybe_gunzip,
    unique_names,
)
from buildtel.shared.protocol import (
    Completeness,
    Outcome,
    Phase,
    TargetFailure,
    TargetMetrics,
    TestCase,
)

AGENT = "import:bep"

# Every BuildEventId kind of build_event_stream.proto; a kind outside this set is reported.
KNOWN_KINDS = frozenset({
    "unknown", "progress", "started", "unstructuredCommandLine", "structuredCommandLine",
    "workspaceStatus", "optionsParsed", "fetch", "configuration", "targetConfigured", "pattern",
    "patternSkipped", "namedSet", "targetCompleted", "actionCompleted", "unconfiguredLabel",
    "configuredLabel", "testResult", "testProgress", "testSummary", "targetSummary",
    "buildFinished", "buildToolLogs", "buildMetrics", "workspace", "buildMetadata",
    "convenienceSymlinksIdentified", "execRequest", "coverageActionsFinished",
})
# Options the Bazel client adds to the "original" command line; not what the user typed.
_CLIENT_OPTIONS = frozenset({
    "rc_source", "default_override", "client_env", "client_cwd", "startup_time",
    "command_wait_time", "extract_data_time", "binary_path", "isatty", "terminal_columns",
    "ignore_client_env", "invocation_policy", "tool_tag", "restart_reason", "emacs",
})
# Aborted targetCompleted reasons that mean the target failed (Bazel's description says why).
FAILED_ABORTS = frozenset({"ANALYSIS_FAILURE", "LOADING_FAILURE"})
TEST_STATUS = {
    "PASSED": "success", "FLAKY": "success",
    "FAILED": "failed", "TIMEOUT": "failed", "REMOTE_FAILURE": "failed",
    "FAILED_TO_BUILD": "skipped",
}  # anything else (NO_STATUS, INCOMPLETE, TOOL_HALTED_BEFORE_TESTING) → cancelled


@dataclass
class _Test:
    label: str
    run: int
    shard: int
    attempts: int = 0
    best: tuple[int, int] = (-1, -1)  # (attempt, line) of the winning attempt
    metrics: TargetMetrics | None = None
    timed: bool = False  # False: no start time in the event, placed at the build's start


@dataclass
class _State:
    warnings: list[ParseWarning] = field(default_factory=list)
    events: int = 0
    started: dict[str, Any] = field(default_factory=dict)
    finished: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)  # patterns named by the started event
    workspace: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    completed: dict[tuple[str, str], str] = field(default_factory=dict)  # (label, config) → status
    names: dict[tuple[str, str], str] = field(default_factory=dict)  # (label, config) → target name
    codes: dict[tuple[str, str], str] = field(default_factory=dict)  # (label, config) → failureDetail code
    target_failures: list[TargetFailure] = field(default_factory=list)  # failed targets' messages (targetCompleted)
    target_failures_dropped: int = 0  # past MAX_FAILURES: counted, not kept
    interrupted: tuple[int, str] | None = None  # (line, reason) of the first event aborted USER_INTERRUPTED
    completed_events: int = 0
    tests: dict[tuple[str, str, int, int], _Test] = field(default_factory=dict)
    # (metrics, has_times): the importer keeps every action for its session; the live mapper
    # (bep_stream.py) takes each out as soon as it is published, so a stream holds none.
    actions: list[tuple[TargetMetrics, bool]] = field(default_factory=list)
    actions_seen: int = 0
    last_action_end: float = 0.0  # latest end of an action with times (s): the finish without buildFinished
    last_message_line: int = 0
    failures: Failures = field(default_factory=Failures)  # failed actions' output
    test_cases: list[TestCase] = field(default_factory=list)  # one per testResult attempt (live: emptied as sent)
    shards: dict[str, set[int]] = field(default_factory=dict)  # test label -> shards its targetCompleted announced
    tool_labels: dict[str, str] = field(default_factory=dict)  # from buildToolLogs (critical path)
    metadata: dict[str, str] = field(default_factory=dict)  # buildMetadata (--build_metadata)
    plain: set[str] = field(default_factory=set)  # labels named plainly (their first configuration)
    runs: dict[str, set[tuple[int, int]]] = field(default_factory=dict)  # test label -> (run, shard) announced or seen
    summaries: TestSummaries = field(default_factory=TestSummaries)  # testSummary, bounded

    def warn(self, line: int, message: str) -> None:
        self.warnings.append(ParseWarning(line, message))


def _on_started(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.started = pj.obj(ev["started"])


def _on_command_line(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    if pj.get(idv, "commandLineLabel") != "original":
        return
    cmd: list[str] = []
    for section in pj.arr(pj.obj(ev["structuredCommandLine"]).get("sections", [])):
        section = pj.obj(section)
        for chunk in pj.arr(pj.obj(pj.get(section, "chunkList", {})).get("chunk", [])):
            cmd.append(str(chunk))
        for opt in pj.arr(pj.obj(pj.get(section, "optionList", {})).get("option", [])):
            opt = pj.obj(opt)
            form = str(pj.get(opt, "combinedForm", ""))
            name = str(pj.get(opt, "optionName", "") or form.lstrip("-").split("=", 1)[0])
            if form and name not in _CLIENT_OPTIONS:
                cmd.append(form)
    st.command = cmd


def _on_pattern(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.patterns += [str(p) for p in pj.arr(idv.get("pattern", [])) if str(p) not in st.patterns]


def _on_workspace_status(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    for item in pj.arr(pj.obj(ev["workspaceStatus"]).get("item", [])):
        item = pj.obj(item)
        st.workspace[str(item.get("key", ""))] = str(item.get("value", ""))


def _on_configuration(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    if "configuration" in ev:
        st.configs[str(idv.get("id", ""))] = str(pj.obj(ev["configuration"]).get("mnemonic", ""))


def _on_configured(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    if "configured" in ev:
        kind = str(pj.get(pj.obj(ev["configured"]), "targetKind", ""))
        st.kinds[str(idv.get("label", ""))] = kind.removesuffix(" rule")


def _on_completed(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    label = str(idv["label"])
    key = (label, str(pj.obj(idv.get("configuration", {})).get("id", "")))
    name = target_name(st, *key)
    message, code = "", ""
    if "completed" in ev:
        done = pj.obj(ev["completed"])
        status = "success" if done.get("success") else "failed"
        detail = pj.obj(pj.get(done, "failureDetail", {}))
        if status == "failed":
            message, code = str(pj.get(detail, "message", "") or ""), detail_code(detail)
    else:
        aborted = pj.obj(ev.get("aborted", {}))
        reason = str(aborted.get("reason", ""))
        status = "skipped" if reason == "SKIPPED" else "cancelled"
        if reason in FAILED_ABORTS:  # the target failed before it could be built: Bazel says why
            status, code = "failed", f"aborted.{reason}"
            message = str(aborted.get("description", "") or reason)
    st.completed[key] = status
    st.completed_events += 1
    if code:
        st.codes[key] = code
    if status == "failed" and (message or code):  # the one failure record, with Bazel's own failure code
        if len(st.target_failures) < MAX_FAILURES:
            rec = from_error(TargetMetrics(name=name, start=0.0, end=0.0, duration_s=0.0, error=message or None))
            st.target_failures.append(msgspec.structs.replace(rec, tool_code=code))
        else:
            st.target_failures_dropped += 1
    for child in pj.arr(ev.get("children", [])):  # a test's targetCompleted announces its testResults
        if isinstance(child, dict) and isinstance(tr := child.get("testResult"), dict):
            run, shard = (pj.int64(tr.get(k)) or 0 for k in ("run", "shard"))
            st.shards.setdefault(str(tr.get("label", "")), set()).add(shard)
            st.runs.setdefault(str(tr.get("label", "")), set()).add((run, shard))


def target_name(st: _State, label: str, config: str) -> str:
    """A target's name: its label, and for a label built in a second configuration (a tool built
    for the host too) the label with that configuration's mnemonic — decided when the target first
    completes, so a live stream and an imported file name it alike."""
    if (name := st.names.get((label, config))) is not None:
        return name
    plain = label not in st.plain
    name = label if plain else f"{label} ({st.configs.get(config) or config[:12]})"
    st.plain.add(label)
    st.names[(label, config)] = name
    return name


def _on_test_result(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    label = str(idv["label"])
    run, shard, attempt = (pj.int64(idv.get(k)) or 0 for k in ("run", "shard", "attempt"))
    key = (label, str(pj.obj(idv.get("configuration", {})).get("id", "")), run, shard)
    test = st.tests.setdefault(key, _Test(label, run, shard))
    test.attempts += 1
    res = pj.obj(ev.get("testResult", {}))
    dur = pj.duration(pj.get(res, "testAttemptDuration"))
    if dur is None:
        dur = (pj.int64(pj.get(res, "testAttemptDurationMillis")) or 0) / 1000.0
    dur = max(0.0, dur)
    st.test_cases.append(test_case(label, run, shard, attempt, len(st.shards.get(label, ())) > 1,
                                   res if "testResult" in ev else {}, dur))
    if (attempt, line) < test.best:  # an earlier attempt reported late: the later one stands
        return
    info = pj.obj(pj.get(res, "executionInfo", {}))
    start_ms = pj.epoch_ms(res, "testAttemptStart", "testAttemptStartMillisEpoch")
    status = str(res.get("status", "NO_STATUS")) if "testResult" in ev else "NO_STATUS"
    cache = "local_hit" if pj.get(res, "cachedLocally") else "remote_hit" if pj.get(info, "cachedRemotely") else "miss"
    breakdown = pj.obj(pj.get(info, "timingBreakdown", {}))
    phases = [Phase(str(c.get("name", "")), d) for c in pj.arr(breakdown.get("child", []))
              if isinstance(c, dict) and (d := pj.duration(c.get("time"))) is not None and d > 0]
    start = (start_ms or 0.0) / 1000.0
    test.metrics = TargetMetrics(
        name=label, start=start, end=start + dur, duration_s=dur,
        status=TEST_STATUS.get(status, "cancelled"), cache=cache,  # type: ignore[arg-type]
        worker=str(info.get("hostname", "")), agent_id=AGENT, exit_code=pj.int64(pj.get(info, "exitCode")),
        kind="test", mnemonic="TestRunner", phases=phases,
    )
    test.best, test.timed = (attempt, line), start_ms is not None
    runs = st.runs.setdefault(label, set())
    runs.add((run, shard))
    m = test.metrics
    m.attempts = test.attempts
    m.name = f"{label} (test run {run} shard {shard})" if len(runs) > 1 else f"{label} (test)"
    if not test.timed:  # placed at the build's start
        m.start = build_start(st)
        m.end = m.start + m.duration_s


def _on_action(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    act = pj.obj(ev.get("action", {}))
    start_ms = pj.epoch_ms(act, "startTime", "startTimeMillis")
    end_ms = pj.epoch_ms(act, "endTime", "endTimeMillis")
    has_times = start_ms is not None and end_ms is not None and end_ms >= start_ms
    start, end = ((start_ms or 0) / 1000.0, (end_ms or 0) / 1000.0) if has_times else (0.0, 0.0)
    name = str(pj.get(idv, "primaryOutput", "") or pj.get(act, "label", "") or idv.get("label", "") or f"action@{line}")
    ok = bool(act.get("success")) if "action" in ev else False
    st.actions.append((TargetMetrics(
        name=name, start=start, end=end, duration_s=end - start,
        status="success" if ok else "failed" if "action" in ev else "cancelled",
        agent_id=AGENT, exit_code=pj.int64(pj.get(act, "exitCode")), kind="action",
        mnemonic=str(act["type"]) if "type" in act else None,
    ), has_times))
    st.actions_seen += 1
    if has_times:
        st.last_action_end = max(st.last_action_end, end)
    if "action" in ev and not ok:
        st.failures.on_action(str(pj.get(act, "label", "") or idv.get("label", "") or name), act, name)


def _on_finished(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.finished = pj.obj(ev["finished"])


def _on_metrics(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.metrics = pj.obj(ev["buildMetrics"])


def _on_workspace(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.failures.on_workspace(ev)


def _on_tool_logs(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.tool_labels = critical_path(pj.obj(ev["buildToolLogs"]))


def _on_metadata(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    meta = pj.obj(pj.obj(ev["buildMetadata"]).get("metadata", {}))
    st.metadata.update({str(k): str(v) for k, v in meta.items()})


def _on_test_summary(st: _State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    label = str(idv["label"])
    key = (label, str(pj.obj(idv.get("configuration", {})).get("id", "")))
    st.summaries.add(st.names.get(key, label), pj.obj(ev["testSummary"]))


def note_abort(st: _State, kind: str, ev: dict[str, Any], line: int) -> str | None:
    """The reason of an ``aborted`` event (None: not aborted, or a kind aborted without meaning);
    the first USER_INTERRUPTED one is remembered: without ``buildFinished`` it says the build was
    cancelled (bep_session.ending)."""
    if "aborted" not in ev or kind in _QUIET_ABORTS:
        return None
    ab = ev["aborted"] if isinstance(ev["aborted"], dict) else {}
    reason = f"{ab.get('reason', 'no reason given')} {ab.get('description', '')}"
    if st.interrupted is None and reason.startswith("USER_INTERRUPTED"):
        st.interrupted = (line, reason.strip())
    return reason


HANDLERS = {
    "started": _on_started, "structuredCommandLine": _on_command_line, "pattern": _on_pattern,
    "workspaceStatus": _on_workspace_status, "configuration": _on_configuration,
    "targetConfigured": _on_configured, "targetCompleted": _on_completed, "testResult": _on_test_result,
    "actionCompleted": _on_action, "buildFinished": _on_finished, "buildMetrics": _on_metrics,
    "workspace": _on_workspace, "buildToolLogs": _on_tool_logs, "buildMetadata": _on_metadata,
    "testSummary": _on_test_summary,
}
# Events that carry no payload of their own when a stream is cut short; not worth a warning.
_QUIET_ABORTS = frozenset({"progress", "namedSet", "buildToolLogs"})


def _read(data: bytes, st: _State) -> None:
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


def _session_id(st: _State, data: bytes) -> str:
    uuid = str(st.started.get("uuid", "")).replace("-", "").lower()
    if re.fullmatch(r"[0-9a-f]{32}", uuid) and uuid != "0" * 32:
        return uuid
    return content_id("bep", data)


def parse_bep(data: bytes, *, source: str = "") -> ImportResult:
    """Parse a BEP JSON stream into one BuildSession (warnings list what was tolerated)."""
    data = maybe_gunzip(data)
    st = _State()
    _read(data, st)
    if st.events == 0:
        first = st.warnings[0] if st.warnings else ParseWarning(1, "empty input")
        raise ImportFormatError(f"no Build Event Protocol events found ({first.message})", first.line)
    if not st.last_message_line:
        st.warn(data.count(b"\n") + 1, "stream ended without lastMessage: truncated or still being written")
    return _assemble(st, data, source)


def detail_code(detail: dict[str, Any]) -> str:
    """``category.CODE`` of a ``failureDetail`` (``{"spawn": {"code": "TIMEOUT"}}`` → ``spawn.TIMEOUT``;
    ``remoteExecution`` → ``remote_execution``): the first sub-message with a code; empty when none."""
    for key, value in detail.items():
        if key != "message" and isinstance(value, dict) and isinstance(value.get("code"), str):
            snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in key)
            return f"{snake}.{value['code']}"
    return ""


def finished_outcome(finished: dict[str, Any]) -> tuple[int, Outcome]:
    """(exit code, outcome) of a ``buildFinished`` payload: the one rule of ``buildtel import bep``
    and the live BES endpoint (``bep_stream.py``).  Bazel's exit code 8 (``INTERRUPTED``: Ctrl-C or
    a cancelled remote build) is cancelled."""
    code = pj.obj(pj.get(finished, "exitCode", {}))
    exit_code = pj.int64(code.get("code")) or 0  # proto3 omits code 0 (SUCCESS)
    ok = exit_code == 0 and finished.get("overallSuccess", True) is not False
    interrupted = exit_code == 8 or code.get("name") == "INTERRUPTED"
    return exit_code, "success" if ok else "cancelled" if interrupted else "failed"


def one_record_each(st: _State) -> list[TargetFailure]:
    """One failure record per failed target: its failed action's output when Bazel sent it (with
    the target's failure code), else the message of its ``targetCompleted`` (the live mapping,
    bep_stream.py, has only the former: its targets carry no message)."""
    codes = {label: code for (label, _cfg), code in st.codes.items() if code}
    found = [msgspec.structs.replace(f, tool_code=codes[f.target]) if not f.tool_code and f.target in codes else f
             for f in st.failures.found]
    have = {f.target for f in found}
    return found + [f for f in st.target_failures if f.target not in have]


def build_start(st: _State) -> float:
    """The build's start (s) from ``started``; 0 (the epoch) when it is missing or unusable."""
    try:
        ms = pj.epoch_ms(st.started, "startTime", "startTimeMillis")
    except (TypeError, ValueError, OverflowError):
        ms = None
    return (ms or 0.0) / 1000.0


def completed_target(st: _State, key: tuple[str, str], start: float) -> TargetMetrics:
    """The target of a ``targetCompleted``: at the build's start, no duration, and no cache result
    (``uncacheable``: BEP says nothing of it, so it is neither a hit nor a miss)."""
    return TargetMetrics(name=st.names[key], start=start, end=start, duration_s=0.0,
                         status=st.completed[key], cache="uncacheable", agent_id=AGENT,  # type: ignore[arg-type]
                         kind=st.kinds.get(key[0]) or None)


def _targets(st: _State, start: float) -> list[TargetMetrics]:
    """Completed targets, tests and actions; events without times are placed at the build's start."""
    targets = [completed_target(st, key, start) for key in st.completed]
    targets += [test.metrics for test in st.tests.values() if test.metrics is not None]
    for m, has_times in st.actions:
        if not has_times:
            m.start = m.end = start
        targets.append(m)
    unique_names(targets)
    return targets


def _assemble(st: _State, data: bytes, source: str) -> ImportResult:
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
