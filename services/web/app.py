"""The HTTP side of the web service: routes, problem-details errors and the bearer check.

Handlers ask the :class:`Backend` (storage and the analyzer over NATS) and answer JSON.  Every
error, ours or aiohttp's (unknown path, wrong method, oversized headers), leaves as an RFC 9457
``application/problem+json`` body through :func:`_problems`; a backend that does not answer is
a 503 naming it, bad input a 4xx saying what to change.  An unexpected exception is logged and
answered 500 without its text (it may hold data of another request).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from aiohttp import web

from buildtel.services.web.query import (
    AlertsQuery,
    BadInput,
    ReportQuery,
    SessionsQuery,
    parse_query,
    parse_session_id,
    parse_time,
)
from buildtel.services.web.schema import PROBLEM, Problem, openapi

_enc = msgspec.json.Encoder()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Unavailable(Exception):
    """A backend service did not answer (503) or timed out (504 from NATS, 503 to the client)."""


class NotFound(Exception):
    pass


class Backend(Protocol):
    """What the routes need of the stack (``service.py`` implements it over NATS)."""

    async def sessions(self, q: SessionsQuery, since: float | None, until: float | None) -> Any: ...
    async def session(self, id_or_prefix: str) -> Any: ...
    async def report(self, q: ReportQuery, since: float | None, until: float | None) -> Any: ...
    async def alerts(self, q: AlertsQuery) -> Any: ...
    def health(self) -> Any: ...


BACKEND = web.AppKey("backend", object)
TOKEN = web.AppKey("token", object)
LOG = web.AppKey("log", object)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(body), status=status, content_type="application/json")


def problem(status: int, title: str, detail: str) -> web.Response:
    body = _enc.encode(Problem(title=title, status=status, detail=detail))
    return web.Response(body=body, status=status, content_type=PROBLEM)


@web.middleware
async def _problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[TOKEN]
    if token and request.path != "/healthz":
        given = request.headers.get("Authorization", "")
        # Constant-time: the comparison's duration says nothing about the token.
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            resp = problem(401, "Unauthorized", "missing or wrong bearer token (Authorization: Bearer …)")
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
    try:
        return await handler(request)
    except BadInput as exc:
        return problem(400, "Bad Request", str(exc))
    except NotFound as exc:
        return problem(404, "Not Found", str(exc))
    except Unavailable as exc:
        return problem(503, "Service Unavailable", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = f"no such endpoint: {request.method} {request.path[:200]} (see /api/v1/openapi.json)" \
            if exc.status in (404, 405) else exc.text or exc.reason
        resp = problem(exc.status, exc.reason, detail)
        if exc.status == 405:
            resp.headers["Allow"] = exc.headers.get("Allow", "GET")
        return resp
    except Exception as exc:  # noqa: BLE001 - a bug of ours: logged, answered without its text
        request.app[LOG].error("web.request_failed", path=request.path[:200], error=repr(exc))  # type: ignore[attr-defined]
        return problem(500, "Internal Server Error", "the request failed inside the web service (logged)")


def _backend(request: web.Request) -> Backend:
    return request.app[BACKEND]  # type: ignore[return-value]


async def list_sessions(request: web.Request) -> web.Response:
    q = parse_query(request.query, SessionsQuery)
    since, until = parse_time("since", q.since), parse_time("until", q.until)
    return json_response(await _backend(request).sessions(q, since, until))


async def get_session(request: web.Request) -> web.Response:
    word = parse_session_id(request.match_info["id"])
    return json_response(await _backend(request).session(word))


async def get_report(request: web.Request) -> web.Response:
    q = parse_query(request.query, ReportQuery)
    since, until = parse_time("since", q.since), parse_time("until", q.until)
    return json_response(await _backend(request).report(q, since, until))


async def list_alerts(request: web.Request) -> web.Response:
    return json_response(await _backend(request).alerts(parse_query(request.query, AlertsQuery)))


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(openapi())


async def healthz(request: web.Request) -> web.Response:
    return json_response(_backend(request).health())


async def session_page(request: web.Request) -> web.Response:
    """``/sessions/<id>``, the link ``buildtel run`` prints: the session's JSON until the dashboard
    adds its page (docs/api.md)."""
    return await get_session(request)


def create_app(backend: Backend, *, token: str | None, log: Any, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[_problems], client_max_size=max_body_bytes)
    app[BACKEND], app[TOKEN], app[LOG] = backend, token, log
    app.router.add_get("/api/v1/sessions", list_sessions)
    app.router.add_get("/api/v1/sessions/{id}", get_session)
    app.router.add_get("/api/v1/report", get_report)
    app.router.add_get("/api/v1/alerts", list_alerts)
    app.router.add_get("/api/v1/openapi.json", get_openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/sessions/{id}", session_page)
    return app
