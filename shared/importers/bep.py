"""Import a Bazel Build Event Protocol JSON stream (``--build_event_json_file``) as one BuildSession.

The file holds one JSON ``BuildEvent`` per line: ``{"id": {<kind>: {...}},
"children": [...], <payload>: {...}}`` (proto3 JSON: camelCase names, int64 as
strings, zero values omitted).  Mapped:

* ``started`` → session id (the invocation uuid, dashes removed: already 128 bits),
  start time, command, Bazel version, working directory;
* ``structuredCommandLine`` (label ``original``) → ``command``, minus the options the
  Bazel client injects (``--client_env`` would leak the user's environment);
* ``pattern`` → session name; ``workspaceStatus`` → host and user;
* ``buildFinished`` → finish time, exit code, outcome (``INTERRUPTED``, code 8: cancelled);
  without it the outcome is ``unknown`` and the session incomplete, or ``cancelled`` when an
  event was aborted ``USER_INTERRUPTED``; ``buildMetrics`` → action
  cache hits/misses (these count *actions*; they become the session's cache
  figures), actions executed, remote cache hits, CPU time;
* ``targetConfigured`` → the target's kind; ``targetCompleted`` → one target per
  label and configuration (success/failed with ``failureDetail.message`` as its error;
  aborted → skipped/cancelled).  BEP has
  no per-target timing, so these targets have duration 0 at the build's start;
* ``testResult`` → one target per test label, run and shard (attempts folded, the
  last attempt wins) with status, start, duration, local/remote cache hit,
  exit code and the timing breakdown as phases;
* ``actionCompleted`` (only failed actions unless ``--build_event_publish_all_actions``)
  → a target per action: mnemonic, exit code, times when present; a failed action's
  stdout/stderr → the failure record of its target (read only under the invocation's
  output base, ``workspace`` event: :mod:`.bep_details`);
* ``testResult`` → also a test case per attempt (flaky: failed, then passed);
  ``buildToolLogs`` → the critical path as labels.

Everything else (progress, namedSet, configuration details, testSummary, …) is
ignored.  The importer never crashes on a stream: malformed lines, unknown event
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

from buildtel.shared.failrecord import from_error
from buildtel.shared.importers import proto_json as pj
from buildtel.shared.importers.bep_details import Failures, critical_path, metrics_labels, test_case
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
    CACHE_HITS,
    BuildEnvironment,
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
    errors: dict[tuple[str, str], str] = field(default_factory=dict)  # (label, config) → failure message
    codes: dict[tuple[str, str], str] = field(default_factory=dict)  # (label, config) → failureDetail code
    target_failures: list[TargetFailure] = field(default_factory=list)  # failed targets' messages (targetCompleted)
    aborts: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) of aborted events
    completed_events: int = 0
    tests: dict[tuple[str, str, int, int], _Test] = field(default_factory=dict)
    actions: list[tuple[TargetMetrics, bool]] = field(default_factory=list)  # (metrics, has_times)
    last_message_line: int = 0
    failures: Failures = field(default_factory=Failures)  # failed actions' output
    test_cases: list[TestCase] = field(default_factory=list)  # one per testResult attempt
    shards: dict[str, set[int]] = field(default_factory=dict)  # test label -> shards its targetCompleted announced
    tool_labels: dict[str, str] = field(default_factory=dict)  # from buildToolLogs (critical path)

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
    key = (str(idv["label"]), str(pj.obj(idv.get("configuration", {})).get("id", "")))
    if "completed" in ev:
        done = pj.obj(ev["completed"])
        status = "success" if done.get("success") else "failed"
        detail = pj.obj(pj.get(done, "failureDetail", {}))
        if status == "failed" and (msg := pj.get(detail, "message")):
            st.errors[key] = str(msg)
        if status == "failed" and (code := detail_code(detail)):
            st.codes[key] = code
    else:
        reason = pj.obj(ev.get("aborted", {})).get("reason", "")
        status = "skipped" if reason == "SKIPPED" else "cancelled"
    st.completed[key] = status
    st.completed_events += 1
    for child in pj.arr(ev.get("children", [])):  # a test's targetCompleted announces its testResults
        if isinstance(child, dict) and isinstance(tr := child.get("testResult"), dict):
            st.shards.setdefault(str(tr.get("label", "")), set()).add(pj.int64(tr.get("shard")) or 0)


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


HANDLERS = {
    "started": _on_started, "structuredCommandLine": _on_command_line, "pattern": _on_pattern,
    "workspaceStatus": _on_workspace_status, "configuration": _on_configuration,
    "targetConfigured": _on_configured, "targetCompleted": _on_completed, "testResult": _on_test_result,
    "actionCompleted": _on_action, "buildFinished": _on_finished, "buildMetrics": _on_metrics,
    "workspace": _on_workspace, "buildToolLogs": _on_tool_logs,
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
        if "aborted" in ev and kind not in _QUIET_ABORTS:
            ab = ev["aborted"] if isinstance(ev["aborted"], dict) else {}
            what = str(body.get("label", "")) or kind
            reason = f"{ab.get('reason', 'no reason given')} {ab.get('description', '')}"
            st.aborts.append((n, reason.strip()))
            st.warn(n, f"{kind} {what} aborted: {reason}".rstrip())
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


def _targets(st: _State, start: float) -> list[TargetMetrics]:
    """Completed targets, tests and actions; events without times are placed at the build's start."""
    targets: list[TargetMetrics] = []
    configs_per_label: dict[str, int] = {}
    for label, _cfg in st.completed:
        configs_per_label[label] = configs_per_label.get(label, 0) + 1
    for (label, cfg), status in st.completed.items():
        name = label if configs_per_label[label] == 1 else f"{label} ({st.configs.get(cfg) or cfg[:12]})"
        tm = TargetMetrics(name=name, start=start, end=start, duration_s=0.0, status=status,  # type: ignore[arg-type]
                           agent_id=AGENT, kind=st.kinds.get(label) or None, error=st.errors.get((label, cfg)))
        targets.append(tm)
        if tm.error or (label, cfg) in st.codes:  # the one failure record, with Bazel's own failure code
            st.target_failures.append(msgspec.structs.replace(from_error(tm), tool_code=st.codes.get((label, cfg), "")))
    runs: dict[str, set[tuple[int, int]]] = {}
    for label, _cfg, run, shard in st.tests:
        runs.setdefault(label, set()).add((run, shard))
    for test in st.tests.values():
        if (m := test.metrics) is None:
            continue
        m.attempts = test.attempts
        many = len(runs[test.label]) > 1
        m.name = f"{test.label} (test run {test.run} shard {test.shard})" if many else f"{test.label} (test)"
        if not test.timed:
            m.start, m.end = start, start + m.duration_s
        targets.append(m)
    for m, has_times in st.actions:
        if not has_times:
            m.start = m.end = start
        targets.append(m)
    unique_names(targets)
    return targets


def _metrics(st: _State, labels: dict[str, str], warn_line: int) -> tuple[tuple[int, int], float | None]:
    """Cache (hits, misses) and CPU seconds from buildMetrics; extra figures go to ``labels``."""
    # Without Bazel's action cache figures only tests say anything about caching; the
    # targetCompleted targets carry no cache information and must not count as misses.
    tests = [t.metrics for t in st.tests.values() if t.metrics is not None]
    cache = (sum(t.cache in CACHE_HITS for t in tests), sum(t.cache == "miss" for t in tests))
    cpu_s: float | None = None
    try:
        extra, tool_cache = metrics_labels(st.metrics)
        labels.update(extra)
        cache = tool_cache or cache
        if (cpu_ms := pj.int64(pj.get(pj.obj(pj.get(st.metrics, "timingMetrics", {})), "cpuTimeInMs"))) is not None:
            cpu_s = cpu_ms / 1000.0
    except (TypeError, ValueError, OverflowError) as exc:
        st.warn(warn_line, f"unusable buildMetrics payload ({exc})")
    return cache, cpu_s


def _assemble(st: _State, data: bytes, source: str) -> ImportResult:
    warn_line = data.count(b"\n") + 1  # problems of the stream as a whole are reported at its end
    try:
        start_ms = pj.epoch_ms(st.started, "startTime", "startTimeMillis")
    except (TypeError, ValueError, OverflowError):
        start_ms = None
    if start_ms is None:
        st.warn(1, "no usable started event: build start unknown, times fall back to the epoch")
    start = (start_ms or 0.0) / 1000.0
    targets = _targets(st, start)

    exit_code: int | None = None
    exit_name = None
    # Without buildFinished nothing says how the build ended (cut short, or still running): unknown,
    # unless an event was aborted because the user interrupted it.
    interrupted = next((line for line, why in st.aborts if why.startswith("USER_INTERRUPTED")), None)
    outcome = "unknown" if interrupted is None else "cancelled"
    completeness = None
    finish = max([start] + [t.end for t in targets])
    duration_s: float | None = None
    if st.finished is not None:
        try:
            exit_code, outcome = finished_outcome(st.finished)
            exit_name = pj.obj(pj.get(st.finished, "exitCode", {})).get("name")
            finish_ms = pj.epoch_ms(st.finished, "finishTime", "finishTimeMillis")
            if finish_ms is not None:
                finish = finish_ms / 1000.0
                if start_ms is not None:  # exact, not a difference of rounded floats
                    duration_s = max(0.0, (finish_ms - start_ms) / 1000.0)
        except (TypeError, ValueError, OverflowError) as exc:
            st.warn(warn_line, f"unusable buildFinished payload ({exc})")
    else:
        why = "no buildFinished event: the stream was cut before the build ended"
        st.warn(warn_line, f"{why}; outcome {outcome}" + (f" (line {interrupted}: aborted USER_INTERRUPTED)"
                                                           if interrupted else "") + ", session incomplete")
        completeness = Completeness(complete=False, reasons=[why])

    labels = {"importer": "bep", **st.tool_labels}
    cache, cpu_s = _metrics(st, labels, warn_line)
    bazel_cmd = str(st.started.get("command", ""))
    version = pj.get(st.started, "buildToolVersion")
    for key, value in (("invocation_id", st.started.get("uuid")), ("bazel_command", bazel_cmd),
                       ("bazel_version", version), ("exit_name", exit_name), ("source", source),
                       ("aborted", next((why for line, why in st.aborts if line == interrupted), None))):
        if value:
            labels[key] = str(value)
    env = BuildEnvironment(
        cwd=str(pj.get(st.started, "workingDirectory", "")), hostname=st.workspace.get("BUILD_HOST", ""),
        user=st.workspace.get("BUILD_USER", ""), tool_versions={"bazel": str(version)} if version else {},
    )
    patterns = st.requested or st.patterns
    session = make_session(
        session_id=_session_id(st, data),
        name=" ".join(["bazel", bazel_cmd, *patterns]).strip() or "bazel",
        start=start, finish=max(finish, start), targets=targets, events=st.events,
        outcome=outcome, exit_code=exit_code,
        command=st.command or (["bazel", bazel_cmd, *patterns] if bazel_cmd else []),
        labels=labels, agent=AGENT, cache=cache, duration_s=duration_s, environment=env, cpu_s=cpu_s,
        completeness=completeness, failures=one_record_each(st), tests=st.test_cases,
    )
    details = {
        "events": st.events, "target_completed": st.completed_events,
        "test_results": sum(t.attempts for t in st.tests.values()), "tests": len(st.tests),
        "actions": len(st.actions), "warnings": len(st.warnings),
    }
    return ImportResult("bep", [session], st.warnings, details)
