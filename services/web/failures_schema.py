"""The OpenAPI part of ``GET /api/v1/failures`` (``failures_api.py``), merged into the document
by ``schema.openapi``; like ``tests_schema.py`` it imports nothing of the web service."""

from __future__ import annotations

from typing import Any

from buildtel.services.storage.failures import MAX_GROUPS, MAX_SESSIONS, FailuresReply
from buildtel.services.web.tests_schema import _errors, _json, _param
from buildtel.shared.protocol import FAILURE_CLASSES

TYPES: list[Any] = [FailuresReply]


def paths() -> dict[str, Any]:
    return {"/api/v1/failures": {"get": {
        "summary": "Failed targets across stored sessions, grouped by signature and class (code, infra, flaky, "
                   "unknown), with counts, first and last seen and example sessions (docs/failures.md)",
        "parameters": [
            _param("class", "only groups of this class", {"enum": list(FAILURE_CLASSES)}),
            _param("match", "groups whose signature or a target contains this text"),
            _param("since", "sessions since: Unix seconds or ISO 8601"),
            _param("until", "sessions before: Unix seconds or ISO 8601"),
            _param("branch", "VCS branch"), _param("name", "build name"), _param("label", "build label, key=value"),
            _param("sessions", f"read the newest N matching sessions, at most {MAX_SESSIONS}",
                   {"type": "integer", "minimum": 1, "maximum": MAX_SESSIONS, "default": 1000}),
            _param("limit", f"groups listed, at most {MAX_GROUPS}",
                   {"type": "integer", "minimum": 1, "maximum": MAX_GROUPS, "default": 100})],
        "responses": {"200": _json("#/components/schemas/FailuresReply", "the groups"), **_errors()}}}}
