"""What every part of the web service shares: the errors a handler raises (each answered with its
status by ``app.py``'s middleware), the keys it finds the backend and the caller under, JSON and
problem answers, and the dashboard's cookie and change header.  Imports nothing of the service's
other modules, so each of them can import it."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from buildtel.services.web.schema import PROBLEM, Caller, Problem

_enc = msgspec.json.Encoder()
COOKIE = "buildtel_key"  # the dashboard's login: the key, HttpOnly, SameSite=Strict
CSRF_HEADER = "X-Buildtel-Request"  # a change sent with the cookie must carry it (a form cannot)


class Unavailable(Exception):
    """A backend service did not answer (503) or timed out (504 from NATS, 503 to the client)."""


class NotFound(Exception):
    pass


class BadGateway(Exception):
    """A backend service answered with a failure of its own (502, its message passed on)."""


class Conflict(Exception):
    """The request clashes with what exists (an id taken): 409."""


class Unauthorized(Exception):
    """No key, or one that is not (or no longer) a key: 401."""


class Forbidden(Exception):
    """A live key whose scope does not cover the request: 403."""


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


BACKEND = web.AppKey("backend", object)
LOG = web.AppKey("log", object)
TENANT = web.RequestKey("tenant", str)  # the namespace the request's key may read
CALLER = web.RequestKey("caller", Caller)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(body), status=status, content_type="application/json")


def problem(status: int, title: str, detail: str) -> web.Response:
    body = _enc.encode(Problem(title=title, status=status, detail=detail))
    return web.Response(body=body, status=status, content_type=PROBLEM)


