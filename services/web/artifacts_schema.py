"""The OpenAPI part of the flame graph, diff and recording endpoints (``artifacts.py``): their
response types and path items, merged into the document by ``schema.openapi``.

Kept apart from ``schema.py`` so that module stays small; it imports nothing of the web service
(``schema.py`` imports it), so its few helpers repeat the shape of ``schema.py``'s.
"""

from __future__ import annotations

from typing import Any

import msgspec

from buildtel.services.recorder.api import MAX_EVENTS, MAX_PAGE, RecordingEvents, RecordingInfo, RecordingSummary
from buildtel.shared.keyed import keyed_type
from buildtel.shared.protocol import OUTCOMES
from buildtel.shared.recording.diffview import BuildDiff

SVG = "image/svg+xml"
PROBLEM = "application/problem+json"
DEFAULT_RECORDINGS = 50
DEFAULT_EVENTS = 500
MAX_FLAME_LAST = 1000  # sessions a summed flame graph may cover (each is read whole by the analyzer)
DEFAULT_FLAME_LAST = 20


class RecordingPage(msgspec.Struct, kw_only=True):
    """One page of recordings, newest first; ``next_cursor`` set means more follow."""

    recordings: list[RecordingSummary]
    next_cursor: str | None


RecordingView = keyed_type(RecordingInfo)
RecordingEventsView = keyed_type(RecordingEvents)
TYPES: list[Any] = [RecordingPage, RecordingView, RecordingEventsView, BuildDiff]

_COMMON = (400, 401, 403, 429, 502, 503)


def _param(name: str, text: str, schema: dict[str, Any] | None = None, where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "description": text,
            "schema": schema or {"type": "string"}}


def _errors(*codes: int) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Problem"}
    return {str(c): {"description": "problem details", "content": {PROBLEM: {"schema": ref}}} for c in codes}


def _json(name: str, text: str) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _svg(text: str) -> dict[str, Any]:
    return {"description": text, "content": {SVG: {"schema": {"type": "string"}}}}


def _get(summary: str, params: list[dict[str, Any]], ok: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "parameters": params, "responses": {"200": ok, **_errors(*_COMMON, 404)}}}


def paths() -> dict[str, Any]:
    sid = "a full session id (32 hex digits) or a unique prefix of at least 6"
    rid = "a recording id (32 hex digits) or a unique prefix of at least 6"
    look = [_param("title", "title text (at most 200 characters)"),
            _param("width", "image width in pixels", {"type": "integer", "minimum": 100, "maximum": 20000,
                                                      "default": 1200}),
            _param("minwidth", "omit frames narrower than this: pixels (0.5) or a percentage of the total (0.5%)",
                   {"type": "string", "default": "0.1"})]
    window = [_param("last", f"the last N sessions, at most {MAX_FLAME_LAST} (default: {DEFAULT_FLAME_LAST}, or "
                             f"{MAX_FLAME_LAST} when since or until is given)",
                     {"type": "integer", "minimum": 1, "maximum": MAX_FLAME_LAST}),
              _param("branch", "VCS branch"),
              _param("outcome", ", ".join(OUTCOMES), {"enum": list(OUTCOMES)}),
              _param("target", "sessions that built this target"),
              _param("since", "finished at or after: Unix seconds or ISO 8601"),
              _param("until", "finished before: Unix seconds or ISO 8601")]
    ab = [_param("a", "the base: " + sid, where="path"), _param("b", "the session compared with it: " + sid,
                                                                where="path")]
    thresholds = [_param("min_delta", "smallest timing change reported, seconds",
                         {"type": "number", "minimum": 0, "default": 0.05}),
                  _param("min_ratio", "smallest timing change reported, a fraction of the slower run",
                         {"type": "number", "minimum": 0, "default": 0.1})]
    one = [_param("id", sid, where="path")]
    return {
        "/api/v1/sessions/{id}/flamegraph.svg": _get(
            "The session's flame graph (targets by package path, phases under them): the SVG `buildtel flamegraph "
            "--session ID` writes", [*one, *look], _svg("interactive SVG")),
        "/api/v1/sessions/{id}/flamechart.svg": _get(
            "The session's timeline, one lane per worker: the SVG `buildtel flamegraph --session ID --chart` writes",
            [*one, *look], _svg("interactive SVG")),
        "/api/v1/flamegraph.svg": _get(
            "A flame graph summed over a window of sessions: the SVG `buildtel flamegraph --last N` writes",
            [*window, *look], _svg("interactive SVG")),
        "/api/v1/diff/{a}/{b}/flamegraph.svg": _get(
            "A differential flame graph of session b against the base a (red slower, blue faster): the SVG "
            "`buildtel flamegraph --session B --diff session:A` writes", [*ab, *look], _svg("interactive SVG")),
        "/api/v1/diff/{a}/{b}": _get(
            "What changed from stored session a to stored session b (as `buildtel diff A B --json`): targets added "
            "and removed, timing changes largest first, cache and status changes, environment and tool versions",
            [*ab, *thresholds], _json("BuildDiff", "the diff")),
        "/api/v1/recordings": _get(
            "Recordings on the recorder's machine, newest first",
            [_param("limit", f"page size, at most {MAX_PAGE}", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE,
                                                                "default": DEFAULT_RECORDINGS}),
             _param("cursor", "next_cursor of the previous page")], _json("RecordingPage", "a page of recordings")),
        "/api/v1/recordings/{id}": _get(
            "One recording: its manifest (command, directory, redacted environment, file paths and hashes, never "
            "content) and counts of its events", [_param("id", rid, where="path")],
            _json("RecordingInfo", "the recording")),
        "/api/v1/recordings/{id}/events": _get(
            "A page of the recording's events in time order",
            [_param("id", rid, where="path"),
             _param("from", "index of the first event", {"type": "integer", "minimum": 0, "default": 0}),
             _param("limit", f"events per page, at most {MAX_EVENTS}",
                    {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS, "default": DEFAULT_EVENTS})],
            _json("RecordingEvents", "the events")),
        "/api/v1/recordings/{a}/diff/{b}": _get(
            "What changed from recording a to recording b (as `buildtel diff A B --json` of two recordings): also "
            "inputs, outputs and where the event streams first diverge",
            [_param("a", "the base: " + rid, where="path"), _param("b", "the other: " + rid, where="path"),
             *thresholds], _json("BuildDiff", "the diff")),
    }
