"""The HTTP side of the web service: routes, problem-details errors and the key check.

Handlers ask the :class:`Backend` (storage and the analyzer over NATS) and answer JSON; the
backend also says which tenant (namespace) a request's key may read, or refuses it (401 no or
bad key, 403 scope, 429 rate, with ``Retry-After``).  Every
error, ours or aiohttp's (unknown path, wrong method, oversized headers), leaves as an RFC 9457
``application/problem+json`` body through :func:`_problems`; a backend that does not answer is
a 503 naming it, bad input a 4xx saying what to change.  An unexpected exception is logged and
answered 500 without its text (it may hold data of another request).
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from aiohttp import web

from buildtel.services.web.query import (
    AlertsQuery,
    BadInput,
    ReportQuery,
    SessionsQuery,
    StreamQuery,
    TargetHistoryQuery,
    TrendsQuery,
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


class BadGateway(Exception):
    """A backend service answered with a failure of its own (502, its message passed on)."""


class Unauthorized(Exception):
    """No key, or one that is not (or no longer) a key: 401."""


class Forbidden(Exception):
    """A live key whose scope does not cover the request: 403."""


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Backend(Protocol):
    """What the routes need of the stack (``service.py`` implements it over NATS)."""

    async def authorize(self, header: str | None) -> str:
        """The tenant a request with this ``Authorization`` header may read, or an exception above."""
        ...

    async def sessions(self, tenant: str, q: SessionsQuery, since: float | None, until: float | None) -> Any: ...
    async def session(self, tenant: str, id_or_prefix: str) -> Any: ...
    async def report(self, tenant: str, q: ReportQuery, since: float | None, until: float | None) -> Any: ...
    async def alerts(self, tenant: str, q: AlertsQuery) -> Any: ...
    async def trace_spans(self, tenant: str, id_or_prefix: str) -> list[Any]: ...
    async def trends(self, tenant: str, q: TrendsQuery, since: float | None, until: float | None) -> Any: ...
    async def target_history(self, tenant: str, q: TargetHistoryQuery, since: float | None,
                             until: float | None) -> Any: ...
    def health(self) -> Any: ...
    async def open_stream(self, tenant: str, start: tuple[int, int] | None) -> Any: ...
    async def serve_stream(self, stream: Any, write: Callable[[bytes], Awaitable[None]],
                           closed: Callable[[], bool], abort: Callable[[], None]) -> None: ...
    async def metrics_text(self, tenant: str) -> bytes: ...


SSE_SEND_BUFFER = 256 * 1024  # socket send buffer of a live stream (the kernel may double it)
BACKEND = web.AppKey("backend", object)
LOG = web.AppKey("log", object)
TENANT = web.RequestKey("tenant", str)  # the namespace the request's key may read
PUBLIC = frozenset({"/healthz", "/api/v1/openapi.json"})  # answered without a key


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(body), status=status, content_type="application/json")


def problem(status: int, title: str, detail: str) -> web.Response:
    body = _enc.encode(Problem(title=title, status=status, detail=detail))
    return web.Response(body=body, status=status, content_type=PROBLEM)


@web.middleware
async def _problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.path not in PUBLIC:
            request[TENANT] = await _backend(request).authorize(request.headers.get("Authorization"))
        return await handler(request)
    except BadInput as exc:
        return problem(400, "Bad Request", str(exc))
    except NotFound as exc:
        return problem(404, "Not Found", str(exc))
    except Unauthorized as exc:
        resp = problem(401, "Unauthorized", str(exc))
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
    except Forbidden as exc:
        return problem(403, "Forbidden", str(exc))
    except RateLimited as exc:
        resp = problem(429, "Too Many Requests", str(exc))
        resp.headers["Retry-After"] = str(math.ceil(exc.retry_after))
        return resp
    except Unavailable as exc:
        return problem(503, "Service Unavailable", str(exc))
    except BadGateway as exc:
        return problem(502, "Bad Gateway", str(exc))
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
    return json_response(await _backend(request).sessions(request[TENANT], q, since, until))


async def get_session(request: web.Request) -> web.Response:
    word = parse_session_id(request.match_info["id"])
    return json_response(await _backend(request).session(request[TENANT], word))


async def get_report(request: web.Request) -> web.Response:
    q = parse_query(request.query, ReportQuery)
    since, until = parse_time("since", q.since), parse_time("until", q.until)
    return json_response(await _backend(request).report(request[TENANT], q, since, until))


async def list_alerts(request: web.Request) -> web.Response:
    q = parse_query(request.query, AlertsQuery)
    return json_response(await _backend(request).alerts(request[TENANT], q))


async def get_trace(request: web.Request) -> web.Response:
    """The session's trace as OTLP/JSON (an ExportTraceServiceRequest: what OTLP/HTTP JSON carries)."""
    from buildtel.services.tracer.otlp_json import request_dict

    word = parse_session_id(request.match_info["id"])
    return json_response(request_dict(await _backend(request).trace_spans(request[TENANT], word)))


async def get_chrome_trace(request: web.Request) -> web.Response:
    """The session's trace as Chrome Trace Event JSON (Perfetto, chrome://tracing)."""
    from buildtel.services.tracer.chrometrace import chrome_trace

    word = parse_session_id(request.match_info["id"])
    return json_response(chrome_trace(await _backend(request).trace_spans(request[TENANT], word)))


async def get_trends(request: web.Request) -> web.Response:
    return await _windowed(request, TrendsQuery, _backend(request).trends)


async def get_target_history(request: web.Request) -> web.Response:
    return await _windowed(request, TargetHistoryQuery, _backend(request).target_history)


async def _windowed(request: web.Request, typ: Any, ask: Callable[..., Awaitable[Any]]) -> web.Response:
    """A query with a ``since``/``until`` window, asked of the backend for the request's tenant."""
    q = parse_query(request.query, typ)
    since, until = parse_time("since", q.since), parse_time("until", q.until)
    return json_response(await ask(request[TENANT], q, since, until))


async def live_stream(request: web.Request) -> web.StreamResponse:
    """``/api/v1/stream``: server-sent events of the tenant's builds and alerts (``stream.py``)."""
    from buildtel.services.web.stream import parse_position

    q = parse_query(request.query, StreamQuery)
    given = request.headers.get("Last-Event-ID") or q.last_event_id
    start = None
    if given:
        start = parse_position(given)
        if start is None:
            raise BadInput(f"Last-Event-ID {given[:64]!r} is not an id this stream sent ('<sessions>-<alerts>', "
                           "two sequence numbers)")
    backend = _backend(request)
    stream = await backend.open_stream(request[TENANT], start)  # limits and NATS: a problem answer
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    resp.force_close()  # a stream's end is the connection's (no keep-alive wait for a next request)
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:  # bound what the kernel holds for a client that stops reading (stream.py)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SSE_SEND_BUFFER)
    await resp.prepare(request)

    def closed() -> bool:
        return transport is None or transport.is_closing()

    def abort() -> None:
        if transport is not None:
            transport.abort()

    await backend.serve_stream(stream, resp.write, closed, abort)
    return resp


async def get_metrics(request: web.Request) -> web.Response:
    """The tenant's build figures, Prometheus text (docs/metrics.md)."""
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

    body = await _backend(request).metrics_text(request[TENANT])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(openapi())


async def healthz(request: web.Request) -> web.Response:
    return json_response(_backend(request).health())


async def session_page(request: web.Request) -> web.Response:
    """``/sessions/<id>``, the link ``buildtel run`` prints: the session's JSON until the dashboard
    adds its page (docs/api.md)."""
    return await get_session(request)


def create_app(backend: Backend, *, log: Any, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[_problems], client_max_size=max_body_bytes)
    app[BACKEND], app[LOG] = backend, log
    app.router.add_get("/api/v1/sessions", list_sessions)
    app.router.add_get("/api/v1/sessions/{id}", get_session)
    app.router.add_get("/api/v1/sessions/{id}/trace", get_trace)
    app.router.add_get("/api/v1/sessions/{id}/chrome-trace", get_chrome_trace)
    app.router.add_get("/api/v1/report", get_report)
    app.router.add_get("/api/v1/alerts", list_alerts)
    app.router.add_get("/api/v1/trends", get_trends)
    app.router.add_get("/api/v1/targets/history", get_target_history)
    app.router.add_get("/api/v1/stream", live_stream)
    app.router.add_get("/api/v1/openapi.json", get_openapi)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/sessions/{id}", session_page)
    return app
