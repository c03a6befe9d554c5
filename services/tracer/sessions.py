"""A completed :class:`BuildSession` as spans: session -> targets -> phases.

This is how every build becomes a trace, including builds whose agents never
used the tracing API.  The trace id is ``BuildSession.trace_id`` (the session
id, unless the agent was handed a ``traceparent``).  Span ids are derived from
(trace id, session id, target name, phase index), never random, so processing
the same session twice (a redelivery, a replayed stream) produces the very
same spans, and the tracing API can parent an agent's own spans under the
session span before that span exists (``model.session_span_id``).

A build started under an incoming ``traceparent`` (a traced CI job running
``buildtel run``) keeps that trace id, and its session span is a child of the
caller's span (``BuildSession.parent_span_id``).
"""

from __future__ import annotations

from typing import Any

from buildtel.shared.logs import get_logger
from buildtel.shared.phases import breakdown
from buildtel.shared.protocol import BuildSession, TargetMetrics
from buildtel.shared.tracemodel import (
    KIND_INTERNAL,
    SESSION_ATTR,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_UNSET,
    SpanRecord,
    derive_span_id,
    is_hex_id,
    session_span_id,
)
from buildtel.shared.validate import clean_session

log = get_logger("tracer")

SCOPE = "builder_telemetry.sessions"
SERVICE_NAME = "build"
MAX_DEPS = 64  # deps can run into thousands; a trace viewer needs a hint, not the graph
# Span times are int64 nanoseconds: a time beyond ~2262 (or a millisecond timestamp stored as
# seconds, "year 58901") cannot be a span time and is read as missing.
_MAX_S = (2**63 - 1) / 1e9


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def trace_id_of(session: BuildSession) -> str:
    tid = (session.trace_id or "").lower()
    return tid if is_hex_id(tid, 32) else session.id


def _resource(session: BuildSession) -> dict[str, Any]:
    res: dict[str, Any] = {"service.name": SERVICE_NAME}
    env = session.environment
    if env is not None:
        for key, value in (("host.name", env.hostname), ("os.type", env.os), ("host.arch", env.arch)):
            if value:
                res[key] = value
    return res


# OpenTelemetry CI/CD semantic conventions (development status), beside the build.* attributes:
# https://opentelemetry.io/docs/specs/semconv/registry/attributes/cicd/ .  "abandoned" (the build
# stopped reporting) is the convention's "error": a failure of the CI/CD system, not of the code.
# An "unknown" outcome has no result: the attribute is left out rather than guessed.
_PIPELINE_RESULT = {"success": "success", "failed": "failure", "abandoned": "error", "cancelled": "cancellation"}
_TASK_RESULT = {"success": "success", "failed": "failure", "skipped": "skip", "cancelled": "cancellation"}


def _session_attrs(s: BuildSession) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        SESSION_ATTR: s.id,
        "cicd.pipeline.name": s.name or "build",
        "cicd.pipeline.run.id": s.id,
        "cicd.pipeline.action.name": "BUILD",
        "build.name": s.name,
        "build.outcome": s.outcome,
        **({"cicd.pipeline.result": _PIPELINE_RESULT[s.outcome]} if s.outcome in _PIPELINE_RESULT else {}),
        "build.targets": len(s.targets),
        "build.cache_hits": s.cache_hits,
        "build.cache_misses": s.cache_misses,
        "build.cache_hit_rate": float(s.cache_hit_rate),
        "build.failed": s.totals.failed,
    }
    if s.exit_code is not None:
        attrs["build.exit_code"] = s.exit_code
    if s.command:
        attrs["build.command"] = list(s.command)
    if s.agents:
        attrs["build.agents"] = list(s.agents)
    if s.cpu_s is not None:
        attrs["build.cpu_s"] = float(s.cpu_s)
    if s.peak_rss_bytes is not None:
        attrs["build.peak_rss_bytes"] = s.peak_rss_bytes
    vcs = s.environment.vcs if s.environment else None
    if vcs is not None:
        if vcs.commit:
            attrs["vcs.commit"] = vcs.commit
        if vcs.branch:
            attrs["vcs.branch"] = vcs.branch
        attrs["vcs.dirty"] = vcs.dirty
    for key, value in s.labels.items():
        attrs[f"build.label.{key}"] = value
    return attrs


def _target_attrs(t: TargetMetrics, session_id: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        SESSION_ATTR: session_id,
        "cicd.pipeline.task.name": t.name,
        "cicd.pipeline.task.run.id": f"{session_id}/{t.name}",
        "cicd.pipeline.task.run.result": _TASK_RESULT.get(t.status, "error"),
        "build.target": t.name,
        "build.status": t.status,
        "build.cache": t.cache,
        "build.cache_hit": t.cache in ("local_hit", "remote_hit"),
        "build.attempts": t.attempts,
    }
    optional = (("build.worker", t.worker or None), ("build.agent_id", t.agent_id or None),
                ("build.exit_code", t.exit_code), ("build.kind", t.kind), ("build.mnemonic", t.mnemonic),
                ("build.cpu_s", t.cpu_s), ("build.peak_rss_bytes", t.peak_rss_bytes))
    for key, value in optional:
        if value is not None:
            attrs[key] = value
    if t.kind:  # a Bazel rule kind such as cc_test / go_test names a test
        attrs["cicd.pipeline.task.type"] = "test" if t.kind.endswith("test") else "build"
    if t.deps:
        attrs["build.deps"] = list(t.deps[:MAX_DEPS])
        if len(t.deps) > MAX_DEPS:
            attrs["build.deps_total"] = len(t.deps)
    return attrs


def _session_status(s: BuildSession) -> tuple[int, str]:
    if s.outcome == "success":
        return STATUS_OK, ""
    if s.outcome == "abandoned":
        return STATUS_ERROR, "abandoned: the build stopped reporting before it finished"
    if s.outcome == "cancelled":
        return STATUS_ERROR, "cancelled: stopped by a user or a signal before it finished"
    if s.outcome == "unknown":
        return STATUS_UNSET, ""  # nothing said how the build ended
    code = f" (exit code {s.exit_code})" if s.exit_code is not None else ""
    return STATUS_ERROR, f"build failed{code}"


def _target_status(t: TargetMetrics) -> tuple[int, str]:
    if t.status == "success":
        return STATUS_OK, ""
    if t.status == "failed":
        return STATUS_ERROR, f"failed (exit code {t.exit_code})" if t.exit_code is not None else "failed"
    # skipped / cancelled are not errors of this target; build.status says which.
    return STATUS_UNSET, ""


def _representable(*seconds: float) -> bool:
    return all(0.0 <= s < _MAX_S for s in seconds)


def readable_session(session: BuildSession) -> tuple[BuildSession, int]:
    """``session`` with the values a trace cannot hold read as missing: non-finite or negative
    numbers (:func:`buildtel.shared.validate.clean_session`) and times outside int64 nanoseconds (such a
    target is left out; such a session time becomes 0, "unknown").  Returns how many values."""
    import msgspec

    session, missing = clean_session(session)
    fields: dict[str, Any] = {}
    targets = [t for t in session.targets if _representable(t.start, t.end)]
    if len(targets) != len(session.targets):
        missing += len(session.targets) - len(targets)
        fields["targets"] = targets
    for name in ("start", "finish"):
        if not _representable(getattr(session, name)):
            fields[name] = 0.0
            missing += 1
    return (msgspec.structs.replace(session, **fields) if fields else session), missing


def session_spans(session: BuildSession) -> list[SpanRecord]:
    """The spans of one completed build, root first; deterministic for a given session."""
    session, missing = readable_session(session)
    if missing:
        log.warning("tracer.session_values_missing", session_id=session.id, values=missing,
                    reason="non-finite, negative or out-of-range times and durations read as missing")
    trace_id = trace_id_of(session)
    sid = session.id
    resource = _resource(session)
    root_id = session_span_id(sid, trace_id)
    code, message = _session_status(session)
    start = session.start or min((t.start for t in session.targets), default=0.0)
    finish = session.finish or max((t.end for t in session.targets), default=start)
    spans = [SpanRecord(trace_id=trace_id, span_id=root_id, parent_span_id=session.parent_span_id or "",
                        name=session.name or "build", kind=KIND_INTERNAL,
                        start_ns=_ns(start), end_ns=_ns(max(finish, start)), attributes=_session_attrs(session),
                        status_code=code, status_message=message, resource=resource, scope_name=SCOPE)]
    for t in session.targets:
        tid = derive_span_id(trace_id, sid, "target", t.name)
        code, message = _target_status(t)
        spans.append(SpanRecord(trace_id=trace_id, span_id=tid, parent_span_id=root_id, name=t.name,
                                kind=KIND_INTERNAL, start_ns=_ns(t.start), end_ns=_ns(max(t.end, t.start)),
                                attributes=_target_attrs(t, sid), status_code=code, status_message=message,
                                resource=resource, scope_name=SCOPE))
        # Phases carry only durations; they ran back to back from the target's start.
        offset = t.start
        for i, phase in enumerate(t.phases):
            if breakdown(phase.name):
                continue  # header:/template: costs overlap Frontend: not a slice of the target's time
            duration = max(0.0, phase.duration_s)
            if not _representable(offset + duration):
                break  # phases running past what a span can hold: the rest are left out
            spans.append(SpanRecord(
                trace_id=trace_id, span_id=derive_span_id(trace_id, sid, "phase", t.name, str(i), phase.name),
                parent_span_id=tid, name=phase.name, kind=KIND_INTERNAL, start_ns=_ns(offset),
                end_ns=_ns(offset + duration), attributes={"build.phase": phase.name, "build.target": t.name},
                resource=resource, scope_name=SCOPE))
            offset += duration
    return spans
