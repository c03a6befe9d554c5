"""HTTP endpoint driven by the official W3C Trace Context conformance suite.

The suite (github.com/w3c/trace-context, folder ``test/``) POSTs to ``/test`` a
JSON list of ``{"url": ..., "arguments": [...]}`` actions, with the
``traceparent``/``tracestate`` fields under test on that request.  For each
action this service POSTs ``arguments`` as JSON to ``url`` from a new client
span whose parent is the incoming context, so the suite can check what we
propagate.  ``buildtel w3c-testpoint --port PORT`` calls :func:`run_testpoint`.

Because the endpoint makes requests to URLs it is given, it binds loopback and
only calls loopback targets unless told otherwise.  Timeouts and body limits are
:mod:`buildtel.shared.httpserver`'s (``docs/tracing.md``); a /test body may be 64 KiB.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from yarl import URL

from buildtel.shared.httpserver import BodyError, HttpLimits, RunningSite, decode_json, read_body, start_site

from .propagation import W3CTraceContextPropagator, extract_headers, inject_headers

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_ACTIONS",
    "RunningTestpoint",
    "create_app",
    "run_testpoint",
    "serve_testpoint",
    "start_testpoint",
]

_log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000  # the port the suite's README uses in its examples
MAX_ACTIONS = 64  # the suite sends at most 3; the cap bounds fan-out per request
_CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)
_TRACER_NAME = "builder_telemetry.tracer.testpoint"
LIMITS = HttpLimits(max_body_bytes=64 * 1024)  # the suite's bodies are a few hundred bytes

# AppKey rather than str keys: aiohttp warns on str keys and tests turn warnings into errors.
_TRACER = web.AppKey("tracer", trace.Tracer)
_PROPAGATOR = web.AppKey("propagator", W3CTraceContextPropagator)
_SESSION = web.AppKey("session", aiohttp.ClientSession)
_ALLOW_REMOTE = web.AppKey("allow_remote_targets", bool)
_LIMITS = web.AppKey("limits", HttpLimits)


class _BadRequest(ValueError):
    """The /test body is not what the suite's protocol describes."""


def _resolve_tracer_provider(tracer_provider: trace.TracerProvider | None) -> trace.TracerProvider:
    if tracer_provider is not None:
        return tracer_provider
    global_provider = trace.get_tracer_provider()
    if isinstance(global_provider, SDKTracerProvider):
        return global_provider
    # The API's default provider returns the parent's span context unchanged
    # (same parent-id), which is not propagation; a private SDK provider
    # without exporters creates real span ids and honours the sampled flag.
    return SDKTracerProvider(shutdown_on_exit=False)


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a DNS name other than localhost could resolve anywhere


def _parse_actions(body: Any, allow_remote: bool) -> list[tuple[str, Any]]:
    # The suite's own harness accepts a single object as well as a list.
    actions = body if isinstance(body, list) else [body]
    if len(actions) > MAX_ACTIONS:
        raise _BadRequest(f"at most {MAX_ACTIONS} actions per request")
    parsed = []
    for action in actions:
        if not isinstance(action, dict) or not isinstance(action.get("url"), str):
            raise _BadRequest('each action must be an object with a string "url"')
        url = URL(action["url"])
        if url.scheme not in ("http", "https") or not url.host:
            raise _BadRequest(f"unsupported url: {action['url']!r}")
        if not allow_remote and not _is_loopback_host(url.host):
            raise _BadRequest(f"non-loopback target refused: {action['url']!r}")
        # Same defaulting as the suite's harness: missing or null -> [].
        parsed.append((action["url"], action.get("arguments") or []))
    return parsed


async def _call(request: web.Request, url: str, arguments: Any) -> dict[str, Any]:
    tracer = request.app[_TRACER]
    # One client span per outgoing call: each callee must see its own parent-id.
    with tracer.start_as_current_span(f"POST {url}", kind=SpanKind.CLIENT) as span:
        headers = inject_headers({}, propagator=request.app[_PROPAGATOR])
        try:
            async with request.app[_SESSION].post(url, json=arguments, headers=headers) as response:
                await response.read()
                return {"url": url, "status": response.status}
        except (TimeoutError, aiohttp.ClientError) as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            return {"url": url, "error": f"{type(exc).__name__}: {exc}"}


async def _handle_test(request: web.Request) -> web.Response:
    try:
        limits = request.app[_LIMITS]
        body = decode_json(await read_body(request, limits), limits.max_json_depth)
        actions = _parse_actions(body, request.app[_ALLOW_REMOTE])
    except BodyError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
    except _BadRequest as exc:
        return web.json_response({"error": str(exc)}, status=400)
    parent = extract_headers(request.headers, propagator=request.app[_PROPAGATOR])
    tracer = request.app[_TRACER]
    with tracer.start_as_current_span("POST /test", context=parent, kind=SpanKind.SERVER):
        # Sequential, as the suite expects callbacks in order of the list.
        results = [await _call(request, url, arguments) for url, arguments in actions]
    return web.json_response(results)


def create_app(
    *,
    tracer_provider: trace.TracerProvider | None = None,
    propagator: W3CTraceContextPropagator | None = None,
    allow_remote_targets: bool = False,
    limits: HttpLimits = LIMITS,
) -> web.Application:
    """Build the aiohttp application serving ``POST /test``.

    ``allow_remote_targets`` lets actions call non-loopback URLs; keep it off
    unless the suite's harness runs on another host.
    """
    app = web.Application(client_max_size=limits.max_body_bytes)
    app[_LIMITS] = limits
    app[_TRACER] = _resolve_tracer_provider(tracer_provider).get_tracer(_TRACER_NAME)
    app[_PROPAGATOR] = propagator or W3CTraceContextPropagator()
    app[_ALLOW_REMOTE] = allow_remote_targets

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=_CLIENT_TIMEOUT) as session:
            app[_SESSION] = session
            yield

    app.cleanup_ctx.append(client_session)
    app.router.add_post("/test", _handle_test)
    return app


RunningTestpoint = RunningSite  # a started testpoint (url ends in /test); ``await close()`` stops it


async def start_testpoint(
    host: str = DEFAULT_HOST, port: int = 0, **app_options: Any
) -> RunningTestpoint:
    """Start serving in the running loop; ``port=0`` picks a free port."""
    limits = app_options.get("limits", LIMITS)
    runner = await start_site(create_app(**app_options), host, port, limits)
    bound_port = runner.addresses[0][1]
    return RunningSite(runner=runner, host=host, port=bound_port, path="/test")


async def serve_testpoint(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    on_ready: Callable[[str], None] | None = None,
    **app_options: Any,
) -> None:
    """Serve ``POST /test`` until cancelled; ``on_ready`` receives the endpoint URL."""
    running = await start_testpoint(host, port, **app_options)
    _log.info("w3c testpoint listening on %s", running.url)
    try:
        if on_ready is not None:
            on_ready(running.url)
        await asyncio.Event().wait()
    finally:
        await running.close()


def run_testpoint(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, **app_options: Any) -> int:
    """Blocking entry point for ``buildtel w3c-testpoint``; returns an exit status."""

    def announce(url: str) -> None:
        print(f"w3c testpoint listening on {url}", flush=True)

    try:
        asyncio.run(serve_testpoint(host, port, on_ready=announce, **app_options))
    except KeyboardInterrupt:
        pass
    return 0
