"""The OpenAPI part of the test result endpoints (``tests_api.py``): their response types and
path items, merged into the document by ``schema.openapi``.

Kept apart from ``tests_api.py`` because ``schema.py`` imports it and ``tests_api.py`` imports
the web app (which imports ``schema.py``): this module imports nothing of the web service.
"""

from __future__ import annotations

from typing import Any

from buildtel.services.storage.tests_history import MAX_SESSIONS, MAX_TESTS, TestHistoryReply, TestsReply

_COMMON = (400, 401, 403, 429, 502, 503)


TYPES: list[Any] = [TestsReply, TestHistoryReply]


def _param(name: str, text: str, schema: dict[str, Any] | None = None, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": text,
            "schema": schema or {"type": "string"}}


def _json(ref: str, text: str) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _errors() -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Problem"}
    return {str(c): {"description": "problem details", "content": {"application/problem+json": {"schema": ref}}}
            for c in _COMMON}


def paths() -> dict[str, Any]:
    c = "#/components/schemas/"
    window = [_param("since", "sessions since: Unix seconds or ISO 8601"),
              _param("until", "sessions before: Unix seconds or ISO 8601"),
              _param("branch", "VCS branch"),
              _param("sessions", f"read the newest N matching sessions with test results, at most {MAX_SESSIONS}",
                     {"type": "integer", "minimum": 1, "maximum": MAX_SESSIONS, "default": 1000})]
    return {
        "/api/v1/tests": {"get": {
            "summary": "Test cases across stored sessions, one entry per test (suite::name): runs by outcome, "
                       "durations, and flakiness (passed and failed on the same commit; docs/tests.md)",
            "parameters": [_param("flaky", "true: only flaky tests", {"type": "boolean", "default": False}),
                           _param("sort", "flaky (flake rate), slowest (mean duration), failing or name",
                                  {"enum": ["flaky", "slowest", "failing", "name"], "default": "flaky"}),
                           _param("test", "tests whose id contains this text"),
                           _param("target", "only runs of this build target (exact name: a Bazel label, a make "
                                  "target or ninja output; docs/tests.md#which-target-ran-a-test)"), *window,
                           _param("name", "build name"), _param("label", "build label, key=value"),
                           _param("limit", f"tests listed, at most {MAX_TESTS}",
                                  {"type": "integer", "minimum": 1, "maximum": MAX_TESTS, "default": 100})],
            "responses": {"200": _json(c + "TestsReply", "the tests"), **_errors()}}},
        "/api/v1/tests/history": {"get": {
            "summary": "One test's runs across stored sessions, newest first, with their failure messages",
            "parameters": [_param("name", "the test's id: suite::name", required=True), *window,
                           _param("limit", f"runs, at most {MAX_TESTS}",
                                  {"type": "integer", "minimum": 1, "maximum": MAX_TESTS, "default": 200})],
            "responses": {"200": _json(c + "TestHistoryReply", "the runs"), **_errors()}}},
    }
