"""Test results over HTTP (docs/tests.md): ``GET /api/v1/tests`` and ``GET /api/v1/tests/history``.

Both ask the storage service's ``tests`` / ``test_history`` endpoints
(services/storage/tests_history.py) for the request's tenant and return the reply as JSON;
their part of the OpenAPI document is ``tests_schema.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from buildtel.services.storage.api import StorageError
from buildtel.services.storage.tests_history import (
    MAX_SESSIONS,
    MAX_TESTS,
    TestHistoryRequest,
    TestsRequest,
    test_history,
    tests,
)
from buildtel.services.web.base import BACKEND, TENANT, BadGateway, Unavailable, json_response
from buildtel.services.web.query import BadInput, parse_query, parse_time
from buildtel.shared.subjects import Subjects

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class TestsQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    __test__ = False

    flaky: bool = False
    sort: Literal["flaky", "slowest", "failing", "name"] = "flaky"
    test: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    target: Text | None = None
    since: str | None = None
    until: str | None = None
    branch: Text | None = None
    name: Text | None = None
    label: Text | None = None
    sessions: Annotated[int, msgspec.Meta(ge=1, le=MAX_SESSIONS)] = 1000
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_TESTS)] = 100


class TestHistoryQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    __test__ = False

    name: Text  # the test's id, suite::name
    since: str | None = None
    until: str | None = None
    branch: Text | None = None
    sessions: Annotated[int, msgspec.Meta(ge=1, le=MAX_SESSIONS)] = 1000
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_TESTS)] = 200


def _nc(request: web.Request) -> Any:
    backend: Any = request.app[BACKEND]  # the web service (service.py): its NATS connection
    return backend.nc


def storage_failure(exc: StorageError) -> Exception:
    """The API error a storage failure is answered with (also the test pages', tests_pages.py)."""
    if exc.code == 400:
        return BadInput(exc.description)
    if exc.code in (503, 504):
        return Unavailable(f"the storage service did not answer: {exc.description}")
    return BadGateway(f"the storage service failed the request: {exc.description}")


async def list_tests(request: web.Request) -> web.Response:
    q = parse_query(request.query, TestsQuery)
    req = TestsRequest(since=parse_time("since", q.since), until=parse_time("until", q.until), branch=q.branch,
                       name=q.name, label=q.label, test=q.test, target=q.target, flaky=q.flaky, sort=q.sort,
                       sessions=q.sessions, limit=q.limit)
    try:
        reply = await tests(_nc(request), Subjects(request[TENANT]), req)
    except StorageError as exc:
        raise storage_failure(exc) from None
    return json_response(reply)


async def get_test_history(request: web.Request) -> web.Response:
    q = parse_query(request.query, TestHistoryQuery)
    req = TestHistoryRequest(test=q.name, since=parse_time("since", q.since), until=parse_time("until", q.until),
                             branch=q.branch, sessions=q.sessions, limit=q.limit)
    try:
        reply = await test_history(_nc(request), Subjects(request[TENANT]), req)
    except StorageError as exc:
        raise storage_failure(exc) from None
    return json_response(reply)


def register(app: web.Application) -> None:
    """Add these routes to the API's application (``service.py``, next to ``create_app``)."""
    app.router.add_get("/api/v1/tests", list_tests)
    app.router.add_get("/api/v1/tests/history", get_test_history)
