"""``GET /api/v1/failures`` (docs/failures.md): the storage service's ``failures`` query
(services/storage/failures.py) for the request's tenant, as JSON; its OpenAPI part is
``failures_schema.py``."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from buildtel.services.storage.api import StorageError
from buildtel.services.storage.failures import MAX_GROUPS, MAX_SESSIONS, FailuresRequest, failures
from buildtel.services.web.base import TENANT, json_response
from buildtel.services.web.query import parse_query, parse_time
from buildtel.services.web.tests_api import Text, _nc, storage_failure
from buildtel.shared.protocol import FailureClass
from buildtel.shared.subjects import Subjects


class FailuresQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, rename={"failure_class": "class"}):
    failure_class: FailureClass | None = None
    match: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    since: str | None = None
    until: str | None = None
    branch: Text | None = None
    name: Text | None = None
    label: Text | None = None
    sessions: Annotated[int, msgspec.Meta(ge=1, le=MAX_SESSIONS)] = 1000
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_GROUPS)] = 100


async def list_failures(request: web.Request) -> web.Response:
    q = parse_query(request.query, FailuresQuery)
    req = FailuresRequest(since=parse_time("since", q.since), until=parse_time("until", q.until), branch=q.branch,
                          name=q.name, label=q.label, failure_class=q.failure_class, match=q.match,
                          sessions=q.sessions, limit=q.limit)
    try:
        reply: Any = await failures(_nc(request), Subjects(request[TENANT]), req)
    except StorageError as exc:
        raise storage_failure(exc) from None
    return json_response(reply)


def register(app: web.Application) -> None:
    """Add the route to the API's application (``service.py``, next to ``create_app``)."""
    app.router.add_get("/api/v1/failures", list_failures)
