"""The API's response types and its OpenAPI 3.1 document, generated from them.

Every JSON body the API sends is one of the types here (or a :func:`~buildtel.shared.keyed.keyed_type`
of a wire struct: a session, a report, an alert), and :func:`openapi` builds the document from
those same types with ``msgspec.json.schema_components``, so the schema cannot drift from what
is sent.  Errors are RFC 9457 problem details (:class:`Problem`, ``application/problem+json``).
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal

import msgspec

from buildtel.services.analyzer.alerts import Alert
from buildtel.services.analyzer.analytics import AnalyticsReport
from buildtel.services.notifier.config import Subscription
from buildtel.services.storage.api import SessionSummary
from buildtel.services.storage.history import MAX_RUNS, TargetRun, TrendReply
from buildtel.services.web import artifacts_schema, failures_schema, tests_schema
from buildtel.shared import apikeys
from buildtel.shared.alertstate import MAX_NOTE, AlertState
from buildtel.shared.keyed import keyed_type
from buildtel.shared.protocol import OUTCOMES, BuildSession, SessionStarted

API_VERSION = "1.0.0"
PROBLEM = "application/problem+json"
MAX_LIMIT = 1000  # sessions or alerts per page
DEFAULT_LIMIT = 50


class Problem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem details: what every error answer carries."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str


class SessionPage(msgspec.Struct, kw_only=True):
    """One page of session summaries; ``next_cursor`` set means more follow (pass it as ``cursor``)."""

    sessions: list[SessionSummary]
    next_cursor: str | None
    # Partitioned storage with partitions away: "partial: partition k did not answer" each; their
    # sessions are missing from this page (docs/scaling.md, Partitions).  Empty when whole.
    partial: list[str] = []


class AlertWithState(Alert, kw_only=True):
    """An alert as the analyzer published it, and what people decided about it (``state``)."""

    state: AlertState


class AlertPage(msgspec.Struct, kw_only=True):
    """Alerts, newest first."""

    alerts: list[AlertWithState]


class Caller(msgspec.Struct, kw_only=True, frozen=True):
    """Who made a request: the tenant it acts on and the key id (``token`` or ``open`` without keys)."""

    tenant: str
    who: str


class AcknowledgeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/alerts/{id}/acknowledge`` (the body may be empty)."""

    note: Annotated[str, msgspec.Meta(max_length=MAX_NOTE)] = ""


class MuteBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/alerts/{id}/mute``: mute the alert's series (kind, branch, target) for a while."""

    duration: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,7}(\.[0-9]+)?[smhd]?$",
                                          description="seconds, or a number with s, m, h or d (e.g. 24h, 7d); "
                                                      "at most 90 days")]
    note: Annotated[str, msgspec.Meta(max_length=MAX_NOTE)] = ""


class TargetHistory(msgspec.Struct, kw_only=True):
    """One target's runs across sessions, newest first (``next_cursor``: older runs follow), and the
    change points the analyzer reported for it (its alerts naming the target, newest first)."""

    target: str
    runs: list[TargetRun]
    next_cursor: str | None
    change_points: list[AlertWithState]
    # As SessionPage.partial: partitions that did not answer, their runs missing.  Empty when whole.
    partial: list[str] = []


class KeyList(msgspec.Struct, kw_only=True):
    """The tenant's keys, oldest first (ids, scopes, names: never a key)."""

    keys: list[apikeys.ApiKey]


class NewKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/keys``: the tenant is the caller's (``tenant``, when given, must name it)."""

    scope: apikeys.Scope = "read"
    name: Annotated[str, msgspec.Meta(max_length=200)] = ""
    tenant: str | None = None


class CreatedKey(msgspec.Struct, kw_only=True):
    """The new key, shown this once, and its record."""

    key: str
    record: apikeys.ApiKey


class SubscriptionInfo(msgspec.Struct, kw_only=True):
    """An alert subscription as the API shows it: its rules and destination, never its secret (a webhook
    shows its scheme and host, a Slack URL is ``(hidden)``: its path is the credential)."""

    id: str
    kind: Literal["webhook", "slack", "nats"]
    url: str | None
    subject: str | None
    tenants: list[str]
    branches: list[str]
    targets: list[str]
    kinds: list[Literal["build", "target", "host"]]
    direction: Literal["regression", "improvement", "any"]
    min_change_pct: float
    min_confidence: float
    digest: Literal["none", "daily"]
    digest_hour: int | None
    source: Literal["file", "api"]  # the subscriptions file, or made over this API
    secret_hint: str | None = None  # an API webhook's secret: its last four characters
    created_at: float | None = None  # api only
    created_by: str | None = None  # api only: the key id that made it
    shadowed: bool = False  # api only: the file has the same id, and the file's is used


class SubscriptionList(msgspec.Struct, kw_only=True):
    """The tenant's subscriptions: the file's first, then those made over the API (oldest id first);
    ``notes`` say what could not be read."""

    subscriptions: list[SubscriptionInfo]
    notes: list[str] = []


class CreatedSubscription(msgspec.Struct, kw_only=True):
    """The new subscription; ``secret`` is the webhook secret the service made up (shown this once), null
    when the request gave one or the kind is not signed."""

    subscription: SubscriptionInfo
    secret: str | None


class Health(msgspec.Struct, kw_only=True):
    status: str  # "ok", or "degraded" while NATS is away
    nats: bool
    version: str = API_VERSION


Session = keyed_type(BuildSession)
Report = keyed_type(AnalyticsReport)

_FILTERS: list[tuple[str, str]] = [
    ("outcome", ", ".join(OUTCOMES)),
    ("branch", "VCS branch"),
    ("agent", "an agent id, or a machine (its agents too)"),
    ("name", "session name"),
    ("label", "key=value"),
    ("target", "sessions that built this target"),
    ("since", "finished at or after: Unix seconds or ISO 8601"),
    ("until", "finished before: Unix seconds or ISO 8601"),
]


def _param(name: str, text: str, schema: dict[str, Any] | None = None, where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "description": text,
            "schema": schema or {"type": "string"}}


def _json(ref: str, text: str) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _body(ref: str, *, required: bool) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _object(text: str) -> dict[str, Any]:
    """A JSON document whose format another specification defines (OTLP, Chrome trace events)."""
    return {"description": text, "content": {"application/json": {"schema": {"type": "object"}}}}


# Every data endpoint can answer these (bad input, keys, rate, a backend's failure or absence).
_COMMON = (400, 401, 403, 429, 502, 503)


def _errors(*codes: int) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Problem"}
    return {str(c): {"description": "problem details", "content": {PROBLEM: {"schema": ref}}} for c in codes}


@cache
def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``/api/v1`` (cached: the types do not change at run time)."""
    types_ = [Problem, SessionPage, AlertPage, AlertWithState, AcknowledgeBody, MuteBody, Health, Session, Report,
              TrendReply, TargetHistory, *artifacts_schema.TYPES, *tests_schema.TYPES, *failures_schema.TYPES,
              KeyList, NewKey, CreatedKey, SessionStarted, SessionSummary, Alert, Subscription, SubscriptionList,
              CreatedSubscription]
    _, comps = msgspec.json.schema_components(types_, ref_template="#/components/schemas/{name}")
    c = "#/components/schemas/"
    limit = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}
    filters = [_param(n, t, {"enum": list(OUTCOMES)} if n == "outcome" else None) for n, t in _FILTERS]
    alert_id = _param("id", "the alert's id (32 hex digits)", where="path")
    get = "get"
    paths: dict[str, Any] = {
        "/api/v1/sessions": {get: {
            "summary": "Stored sessions matching every given filter, newest first (or oldest with order=oldest)",
            "parameters": [*filters, _param("order", "newest or oldest", {"enum": ["newest", "oldest"]}),
                           _param("limit", f"page size, at most {MAX_LIMIT}", limit),
                           _param("cursor", "next_cursor of the previous page")],
            "responses": {"200": _json(c + "SessionPage", "a page of sessions"), **_errors(*_COMMON)}}},
        "/api/v1/sessions/{id}": {get: {
            "summary": "One stored session: targets as keyed objects, environment, agents, health, completeness",
            "parameters": [_param("id", "a full id (32 hex digits) or a unique prefix of at least 6",
                                  where="path")],
            "responses": {"200": _json(c + "BuildSession", "the session"), **_errors(*_COMMON, 404)}}},
        "/api/v1/sessions/{id}/trace": {get: {
            "summary": "The session's trace as OTLP/JSON (an ExportTraceServiceRequest, as OTLP/HTTP JSON carries it)",
            "parameters": [_param("id", "a full id or a unique prefix of at least 6", where="path")],
            "responses": {"200": _object("resourceSpans: resources, scopes and spans"), **_errors(*_COMMON, 404)}}},
        "/api/v1/sessions/{id}/log": {get: {
            "summary": "The build's console log as `buildtel run` kept it: stdout and stderr as printed, redacted, "
                       "its head and tail with a marker line where it was cut (docs/failures.md); 404 when none",
            "parameters": [_param("id", "a full id or a unique prefix of at least 6", where="path")],
            "responses": {"200": {"description": "the log, UTF-8 text (bytes that were not UTF-8 kept as they were)",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors(*_COMMON, 404)}}},
        "/api/v1/sessions/{id}/chrome-trace": {get: {
            "summary": "The session's trace as Chrome Trace Event JSON for ui.perfetto.dev or chrome://tracing: "
                       "a track per worker",
            "parameters": [_param("id", "a full id or a unique prefix of at least 6", where="path")],
            "responses": {"200": _object("traceEvents, displayTimeUnit, otherData"), **_errors(*_COMMON, 404)}}},
        "/api/v1/report": {get: {
            "summary": "The `buildtel report` figures over a window of sessions",
            "parameters": [_param("last", "the last N sessions", {"type": "integer", "minimum": 1}),
                           *[p for p in filters if p["name"] in ("branch", "outcome", "name", "target", "since",
                                                                 "until")]],
            "responses": {"200": _json(c + "AnalyticsReport", "the report"), **_errors(*_COMMON)}}},
        "/api/v1/trends": {get: {
            "summary": "Builds per hour, day or week (UTC buckets, empty ones listed): outcomes, success rate, "
                       "p50/p95 build time, cache hit rate",
            "parameters": [_param("bucket", "hour, day (default) or week", {"enum": ["hour", "day", "week"]}),
                           *[p for p in filters if p["name"] in ("branch", "agent", "name", "label", "target")],
                           _param("since", "first bucket from here: Unix seconds or ISO 8601 (default: 30 days "
                                           "before until)"),
                           _param("until", "finished before: Unix seconds or ISO 8601 (default: now)")],
            "responses": {"200": _json(c + "TrendReply", "the buckets"), **_errors(*_COMMON)}}},
        "/api/v1/targets/history": {get: {
            "summary": "One target's runs across sessions, newest first, and its change points",
            "parameters": [{**_param("target", "the target's name"), "required": True},
                           *[p for p in filters if p["name"] in ("branch", "outcome", "agent", "label", "since",
                                                                 "until")],
                           _param("limit", f"runs per page, at most {MAX_RUNS}",
                                  {"type": "integer", "minimum": 1, "maximum": MAX_RUNS, "default": 1000}),
                           _param("cursor", "next_cursor of the previous page")],
            "responses": {"200": _json(c + "TargetHistory", "the runs"), **_errors(*_COMMON)}}},
        "/api/v1/alerts": {get: {
            "summary": "Regression and improvement alerts, newest first, each with its state (open, acknowledged, "
                       "muted)",
            "parameters": [_param("branch", "VCS branch"), _param("target", "target name"),
                           _param("kind", "alert kind"),
                           _param("status", "open, acknowledged or muted",
                                  {"enum": ["open", "acknowledged", "muted"]}),
                           _param("limit", f"at most {MAX_LIMIT}", limit)],
            "responses": {"200": _json(c + "AlertPage", "alerts"), **_errors(*_COMMON)}}},
        "/api/v1/alerts/{id}": {get: {
            "summary": "One alert and its state",
            "parameters": [alert_id],
            "responses": {"200": _json(c + "AlertWithState", "the alert"), **_errors(*_COMMON, 404)}}},
        "/api/v1/alerts/{id}/acknowledge": {
            "post": {"summary": "Acknowledge the alert (write scope); again replaces the note",
                     "parameters": [alert_id], "requestBody": _body(c + "AcknowledgeBody", required=False),
                     "responses": {"200": _json(c + "AlertWithState", "the alert, acknowledged"),
                                   **_errors(*_COMMON, 404)}},
            "delete": {"summary": "Take the acknowledgement back (write scope)", "parameters": [alert_id],
                       "responses": {"200": _json(c + "AlertWithState", "the alert"), **_errors(*_COMMON, 404)}}},
        "/api/v1/alerts/{id}/mute": {
            "post": {"summary": "Mute the alert's series (kind, branch, target) for a duration (write scope): its "
                                "alerts detected until then show as muted",
                     "parameters": [alert_id], "requestBody": _body(c + "MuteBody", required=True),
                     "responses": {"200": _json(c + "AlertWithState", "the alert, muted"),
                                   **_errors(*_COMMON, 404)}},
            "delete": {"summary": "End the mute of the alert's series now (write scope)", "parameters": [alert_id],
                       "responses": {"200": _json(c + "AlertWithState", "the alert"), **_errors(*_COMMON, 404)}}},
        "/api/v1/keys": {
            get: {"summary": "The tenant's API keys: ids, scopes, names, never a key (admin scope)",
                  "responses": {"200": _json(c + "KeyList", "the keys"), **_errors(*_COMMON)}},
            "post": {"summary": "A new key of the tenant (admin scope), shown in this answer only",
                     "requestBody": _body(c + "NewKey", required=True),
                     "responses": {"201": _json(c + "CreatedKey", "the key and its record"), **_errors(*_COMMON)}}},
        "/api/v1/keys/{id}": {"delete": {
            "summary": "Revoke one of the tenant's keys (admin scope): it stops working at once",
            "parameters": [_param("id", "the key's id (12 hex digits)", where="path")],
            "responses": {"204": {"description": "revoked"}, **_errors(*_COMMON, 404)}}},
        "/api/v1/subscriptions": {
            get: {"summary": "The tenant's alert subscriptions: the subscriptions file's and those made over the API, "
                             "never a secret (read scope)",
                  "responses": {"200": _json(c + "SubscriptionList", "the subscriptions"), **_errors(*_COMMON)}},
            "post": {"summary": "A new subscription of the tenant (admin scope): a webhook (signed; without `secret` "
                                "one is made up and shown in this answer only), a Slack/Mattermost incoming webhook "
                                "or a NATS subject, with routing rules as in the subscriptions file (docs/alerts.md); "
                                "the notifier uses it within its poll_s",
                     "requestBody": _body(c + "Subscription", required=True),
                     "responses": {"201": _json(c + "CreatedSubscription", "the subscription"),
                                   **_errors(*_COMMON, 409)}}},
        "/api/v1/subscriptions/{id}": {"delete": {
            "summary": "Delete a subscription made over the API (admin scope): no delivery is started for it after",
            "parameters": [_param("id", "the subscription's id", where="path")],
            "responses": {"204": {"description": "deleted"}, **_errors(*_COMMON, 404)}}},
        "/api/v1/stream": {get: {
            "summary": "Live server-sent events of the tenant's builds and alerts, resumable (docs/api.md)",
            "description": "Events: `session.started` (data: SessionStarted), `session.finished` (data: "
                           "SessionSummary), `alert` (data: Alert); each `data:` is one JSON line. Every event's "
                           "`id` is `<sessions seq>-<alerts seq>`; reconnecting with it as `Last-Event-ID` (or "
                           "`last_event_id`) gives exactly the events after it. Without one the stream starts "
                           "now. The first block is `retry:` and an `id:` without data (the start position); "
                           "comment lines keep an idle stream open and say why the server ends one.",
            "parameters": [_param("last_event_id", "resume after this event id (for clients that cannot set "
                                                   "the Last-Event-ID header, which wins)"),
                           _param("Last-Event-ID", "resume after this event id", where="header")],
            "responses": {"200": {"description": "an endless text/event-stream",
                                  "content": {"text/event-stream": {
                                      "schema": {"type": "string"},
                                      "x-events": {"session.started": {"$ref": c + "SessionStarted"},
                                                   "session.finished": {"$ref": c + "SessionSummary"},
                                                   "alert": {"$ref": c + "Alert"}}}}},
                          **_errors(*_COMMON)}}},
        "/metrics": {get: {
            "summary": "The tenant's build figures, Prometheus text format (docs/metrics.md)",
            "responses": {"200": {"description": "Prometheus text exposition 0.0.4",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors(401, 403, 429, 503)}}},
        "/api/v1/openapi.json": {get: {
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}},
        "/healthz": {get: {
            "summary": "Liveness: the service runs and whether it reaches NATS",
            "responses": {"200": _json(c + "Health", "running")}}},
        **artifacts_schema.paths(),  # flame graphs, diffs, recordings (artifacts.py)
        **tests_schema.paths(),  # test results, flaky tests (tests_api.py)
        **failures_schema.paths(),  # failures by signature and class (failures_api.py)
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Builder Telemetry API", "version": API_VERSION,
                 "description": "Build sessions, reports and alerts of one tenant (namespace). Errors are "
                                "RFC 9457 problem details (application/problem+json)."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": comps,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],
    }
