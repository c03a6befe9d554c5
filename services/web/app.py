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
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from aiohttp import web

from buildtel.services.web.base import (
    BACKEND,
    CALLER,
    COOKIE,
    CSRF_HEADER,
    LOG,
    TENANT,
    BadGateway,
    Conflict,
    Forbidden,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
    json_response,
    problem,
)
from buildtel.services.web.query import (
    AlertsQuery,
    BadInput,
    ReportQuery,
    SessionsQuery,
    StreamQuery,
    TargetHistoryQuery,
    TrendsQuery,
    parse_alert_id,
    parse_body,
    parse_query,
    parse_session_id,
    parse_time,
)
from buildtel.services.web.schema import AcknowledgeBody, Caller, MuteBody, openapi
from buildtel.shared.apikeys import Scope

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Backend(Protocol):
    """What the routes need of the stack (``service.py`` implements it over NATS)."""

    async def authorize(self, header: str | None, need: Scope = "read") -> Caller:
        """Who sends this ``Authorization`` header and which tenant it acts on, when its key has scope
        ``need``; else an exception above."""
        ...

    async def sessions(self, tenant: str, q: SessionsQuery, since: float | None, until: float | None) -> Any: ...
    async def session(self, tenant: str, id_or_prefix: str) -> Any: ...
    async def build_log(self, tenant: str, id_or_prefix: str) -> bytes: ...
    async def report(self, tenant: str, q: ReportQuery, since: float | None, until: float | None) -> Any: ...
    async def alerts(self, tenant: str, q: AlertsQuery) -> Any: ...
    async def alert(self, tenant: str, alert_id: str) -> Any: ...
    async def change_alert(self, caller: Caller, alert_id: str, action: str, body: Any) -> Any: ...
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
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})  # need the write scope
PUBLIC = frozenset({"/healthz", "/api/v1/openapi.json", "/login"})  # answered without a key


def _is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith("/static/")


def _is_page(request: web.Request) -> bool:
    """A dashboard page (HTML errors, a login redirect) rather than the API (problem+json): not
    under ``/api/``, and not asked for as JSON (``curl -H 'Accept: application/json'`` of a link)."""
    path, accept = request.path, request.headers.get("Accept", "")
    if path.startswith("/api/") or path in ("/healthz", "/metrics"):
        return False
    return not ("application/json" in accept and "text/html" not in accept)


async def _authorize(request: web.Request) -> None:
    """The caller from ``Authorization``, else from the dashboard's cookie.  A change sent with the
    cookie must also carry the dashboard's header: a form of another site cannot set it."""

    header = request.headers.get("Authorization")
    from_cookie = header is None and COOKIE in request.cookies
    if from_cookie:
        header = "Bearer " + request.cookies[COOKIE]
    admin = request.path.startswith("/api/v1/keys") or (request.path.startswith("/api/v1/subscriptions")
                                                          and request.method in WRITES)
    need: Scope = "admin" if admin else "write" if request.method in WRITES else "read"
    caller = await _backend(request).authorize(header, need)
    if from_cookie and need == "write" and request.headers.get(CSRF_HEADER) != "1":
        raise Forbidden(f"a change made with the dashboard's cookie needs the {CSRF_HEADER} header")
    request[CALLER], request[TENANT] = caller, caller.tenant


@web.middleware
async def _problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    t0 = time.perf_counter()
    try:
        if not _is_public(request.path):
            await _authorize(request)
        resp = await handler(request)
    except Exception as exc:  # noqa: BLE001 - each kind answered below, as a page or a problem
        if request.method == "GET" and _is_page(request):
            resp = await _page_error(request, exc)
        else:
            resp = _problem_of(request, exc)
    if not resp.prepared:  # a stream's headers are gone already
        # How long the answer took inside this service (browsers' devtools and the benchmarks read it).
        resp.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - t0) * 1e3:.1f}"
    return resp


async def _page_error(request: web.Request, exc: Exception) -> web.StreamResponse:
    """A page's failure for people: the login page when a key is needed, else the error as HTML."""
    from urllib.parse import quote

    from buildtel.services.web.pages import render

    if isinstance(exc, Unauthorized):
        raise web.HTTPSeeOther("/login?next=" + quote(request.path_qs, safe="/"))
    if isinstance(exc, web.HTTPException) and exc.status < 400:
        raise exc
    answer = _problem_of(request, exc)
    detail = msgspec.json.decode(answer.body) if isinstance(answer.body, bytes) else {}
    return render(request, "error.html", status=answer.status, title=detail.get("title", "Error"),
                  detail=detail.get("detail", ""))


def _problem_of(request: web.Request, exc: Exception) -> web.Response:
    try:
        raise exc
    except BadInput as exc:
        return problem(400, "Bad Request", str(exc))
    except NotFound as exc:
        return problem(404, "Not Found", str(exc))
    except Conflict as exc:
        return problem(409, "Conflict", str(exc))
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
            raise exc
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


async def get_session_log(request: web.Request) -> web.Response:
    """The build's console log as ``buildtel run`` kept it (redacted; cut with a marker when over
    ``BUILDER_TELEMETRY_LOG_LIMIT``); 404 when it has none."""
    word = parse_session_id(request.match_info["id"])
    data = await _backend(request).build_log(request[TENANT], word)
    return web.Response(body=data, content_type="text/plain", charset="utf-8")


async def get_report(request: web.Request) -> web.Response:
    q = parse_query(request.query, ReportQuery)
    since, until = parse_time("since", q.since), parse_time("until", q.until)
    return json_response(await _backend(request).report(request[TENANT], q, since, until))


async def list_alerts(request: web.Request) -> web.Response:
    q = parse_query(request.query, AlertsQuery)
    return json_response(await _backend(request).alerts(request[TENANT], q))


async def get_alert(request: web.Request) -> web.Response:
    alert_id = parse_alert_id(request.match_info["id"])
    return json_response(await _backend(request).alert(request[TENANT], alert_id))


_ALERT_ACTIONS = {("POST", "acknowledge"): ("acknowledge", AcknowledgeBody),
                  ("DELETE", "acknowledge"): ("unacknowledge", None),
                  ("POST", "mute"): ("mute", MuteBody),
                  ("DELETE", "mute"): ("unmute", None)}


async def change_alert(request: web.Request) -> web.Response:
    """Acknowledge or mute an alert (POST), or take it back (DELETE): needs the write scope."""
    alert_id = parse_alert_id(request.match_info["id"])
    action, body_type = _ALERT_ACTIONS[(request.method, request.match_info["action"])]
    body = parse_body(await request.read(), body_type) if body_type is not None else None
    return json_response(await _backend(request).change_alert(request[CALLER], alert_id, action, body))


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

    try:
        await backend.serve_stream(stream, resp.write, closed, abort)
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError too: the client went away
        pass  # a reader closing its stream is how streams end; nothing failed
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


def create_app(backend: Backend, *, log: Any, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[_problems], client_max_size=max_body_bytes)
    app[BACKEND], app[LOG] = backend, log
    app.router.add_get("/api/v1/sessions", list_sessions)
    app.router.add_get("/api/v1/sessions/{id}", get_session)
    app.router.add_get("/api/v1/sessions/{id}/log", get_session_log)
    app.router.add_get("/api/v1/sessions/{id}/trace", get_trace)
    app.router.add_get("/api/v1/sessions/{id}/chrome-trace", get_chrome_trace)
    app.router.add_get("/api/v1/report", get_report)
    app.router.add_get("/api/v1/alerts", list_alerts)
    app.router.add_get("/api/v1/alerts/{id}", get_alert)
    for action in ("acknowledge", "mute"):
        app.router.add_post(f"/api/v1/alerts/{{id}}/{{action:{action}}}", change_alert)
        app.router.add_delete(f"/api/v1/alerts/{{id}}/{{action:{action}}}", change_alert)
    app.router.add_get("/api/v1/trends", get_trends)
    app.router.add_get("/api/v1/targets/history", get_target_history)
    app.router.add_get("/api/v1/stream", live_stream)
    app.router.add_get("/api/v1/openapi.json", get_openapi)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    from buildtel.services.web import keys_api, subscriptions_api
    from buildtel.services.web.pages import add_routes

    keys_api.register(app)
    subscriptions_api.register(app)
    add_routes(app)
    return app
