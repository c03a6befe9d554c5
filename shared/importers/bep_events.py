"""The per-event readers of a Bazel Build Event Protocol stream and the state they fold into.

One fold for both paths: ``buildtel import bep`` (:mod:`.bep`) reads a JSON file line by line
and the live BES endpoint (:mod:`.bep_stream`) a gRPC stream event by event, and both hand each
event to :data:`HANDLERS`, which fill one :class:`State`; :mod:`.bep_session` reads the
session's head and end from it.  The mapping itself (which event gives what) is described in
:mod:`.bep` and docs/bazel.md.  Pure: no I/O but the bounded read of a failed action's output
files (:mod:`.bep_details`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from buildtel.shared.capture.failures import MAX_FAILURES
from buildtel.shared.failrecord import from_error
from buildtel.shared.importers import proto_json as pj
from buildtel.shared.importers.bep_details import Failures, TestSummaries, critical_path, test_case
from buildtel.shared.importers.common import ParseWarning
from buildtel.shared.protocol import (
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
class State:
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


def _on_started(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.started = pj.obj(ev["started"])


def _on_command_line(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
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


def _on_pattern(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.patterns += [str(p) for p in pj.arr(idv.get("pattern", [])) if str(p) not in st.patterns]


def _on_workspace_status(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    for item in pj.arr(pj.obj(ev["workspaceStatus"]).get("item", [])):
        item = pj.obj(item)
        st.workspace[str(item.get("key", ""))] = str(item.get("value", ""))


def _on_configuration(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    if "configuration" in ev:
        st.configs[str(idv.get("id", ""))] = str(pj.obj(ev["configuration"]).get("mnemonic", ""))


def _on_configured(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    if "configured" in ev:
        kind = str(pj.get(pj.obj(ev["configured"]), "targetKind", ""))
        st.kinds[str(idv.get("label", ""))] = kind.removesuffix(" rule")


def _on_completed(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
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


def target_name(st: State, label: str, config: str) -> str:
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


def _on_test_result(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
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


def _on_action(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
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


def _on_finished(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.finished = pj.obj(ev["finished"])


def _on_metrics(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.metrics = pj.obj(ev["buildMetrics"])


def _on_workspace(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.failures.on_workspace(ev)


def _on_tool_logs(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    st.tool_labels = critical_path(pj.obj(ev["buildToolLogs"]))


def _on_metadata(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    meta = pj.obj(pj.obj(ev["buildMetadata"]).get("metadata", {}))
    st.metadata.update({str(k): str(v) for k, v in meta.items()})


def _on_test_summary(st: State, idv: dict[str, Any], ev: dict[str, Any], line: int) -> None:
    label = str(idv["label"])
    key = (label, str(pj.obj(idv.get("configuration", {})).get("id", "")))
    st.summaries.add(st.names.get(key, label), pj.obj(ev["testSummary"]))


def note_abort(st: State, kind: str, ev: dict[str, Any], line: int) -> str | None:
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


def one_record_each(st: State) -> list[TargetFailure]:
    """One failure record per failed target: its failed action's output when Bazel sent it (with
    the target's failure code), else the message of its ``targetCompleted`` (the live mapping,
    bep_stream.py, has only the former: its targets carry no message)."""
    codes = {label: code for (label, _cfg), code in st.codes.items() if code}
    found = [msgspec.structs.replace(f, tool_code=codes[f.target]) if not f.tool_code and f.target in codes else f
             for f in st.failures.found]
    have = {f.target for f in found}
    return found + [f for f in st.target_failures if f.target not in have]


def build_start(st: State) -> float:
    """The build's start (s) from ``started``; 0 (the epoch) when it is missing or unusable."""
    try:
        ms = pj.epoch_ms(st.started, "startTime", "startTimeMillis")
    except (TypeError, ValueError, OverflowError):
        ms = None
    return (ms or 0.0) / 1000.0


def completed_target(st: State, key: tuple[str, str], start: float) -> TargetMetrics:
    """The target of a ``targetCompleted``: at the build's start, no duration, and no cache result
    (``uncacheable``: BEP says nothing of it, so it is neither a hit nor a miss)."""
    return TargetMetrics(name=st.names[key], start=start, end=start, duration_s=0.0,
                         status=st.completed[key], cache="uncacheable", agent_id=AGENT,  # type: ignore[arg-type]
                         kind=st.kinds.get(key[0]) or None)
