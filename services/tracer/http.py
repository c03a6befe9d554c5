"""The OTLP/HTTP trace receiver: ``POST /v1/traces`` (https://opentelemetry.io/docs/specs/otlp/#otlphttp).

* ``Content-Type: application/x-protobuf`` or ``application/json``; anything
  else is 415.  ``Content-Encoding: gzip`` (or deflate) is decompressed here,
  not by aiohttp (whose error path for a corrupt stream closes the connection
  under the client), with the size limit applied to the *decompressed* body so
  a small gzip bomb cannot exhaust memory; other encodings are 415.
* 200 answers carry an ``ExportTraceServiceResponse`` in the request's
  encoding, with ``partial_success`` when some spans were rejected (invalid
  ids); the others are stored.  A body that does not decode is 400 with a
  ``google.rpc.Status``.  OTLP clients do not retry 400, which is right:
  the same bytes would fail again.
* ``Authorization: Bearer <token>`` is required when ``settings.http_token``
  is set (compared in constant time).
* Limits come from :mod:`buildtel.shared.httpserver` (``docs/tracing.md``): a connection
  whose request head is incomplete after ``idle_timeout`` (15 s) is closed, a
  body not received within ``body_timeout`` (30 s) is 408, JSON nested deeper
  than ``max_json_depth`` (64) is 400.

The handler hands decoded spans to ``sink`` (the service stores and forwards
them) before answering, so a 200 means the spans are in the store.
"""

from __future__ import annotations

import hmac
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from buildtel.services.tracer import otlp, otlp_json
from buildtel.shared.httpserver import BodyError, HttpLimits, RunningSite, decode_json, read_body, start_site
from buildtel.shared.logs import get_logger
from buildtel.shared.tracemodel import SpanRecord

log = get_logger("tracer.http")

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
MAX_BODY_BYTES = 32 * 1024 * 1024
LIMITS = HttpLimits(max_body_bytes=MAX_BODY_BYTES)
_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})
# google.rpc.Code values used in Status bodies.
RPC_INVALID_ARGUMENT = 3
RPC_UNAUTHENTICATED = 16
RPC_INTERNAL = 13

Sink = Callable[[list[SpanRecord]], Awaitable[None]]


@dataclass
class ReceiverStats:
    requests: int = 0
    spans: int = 0
    rejected_spans: int = 0
    bad_requests: int = 0
    unsupported: int = 0
    unauthorized: int = 0
    timeouts: int = 0
    last_errors: list[str] = field(default_factory=list)


_SINK = web.AppKey("sink", object)
_TOKEN = web.AppKey("token", object)
_STATS = web.AppKey("stats", ReceiverStats)
_LIMITS = web.AppKey("limits", HttpLimits)


def _status(code: int, rpc_code: int, message: str, ctype: str) -> web.Response:
    if ctype == JSON:
        return web.Response(status=code, body=otlp_json.encode_status(rpc_code, message), content_type=JSON)
    return web.Response(status=code, body=otlp.encode_status(rpc_code, message), content_type=PROTOBUF)


async def _handle(request: web.Request) -> web.Response:
    stats = request.app[_STATS]
    stats.requests += 1
    ctype = request.content_type.lower()
    token = request.app[_TOKEN]
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            stats.unauthorized += 1
            resp = _status(401, RPC_UNAUTHENTICATED, "missing or wrong bearer token", ctype)
            resp.headers["WWW-Authenticate"] = 'Bearer realm="buildtel-otlp"'
            return resp
    if ctype not in (PROTOBUF, JSON):
        stats.unsupported += 1
        return web.Response(status=415, text=f"unsupported content type {ctype!r}: use {PROTOBUF} or {JSON}",
                            headers={"Accept-Post": f"{PROTOBUF}, {JSON}"})
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _ENCODINGS:
        stats.unsupported += 1
        return web.Response(status=415, text=f"unsupported content encoding {encoding!r}: use gzip or none")
    limits = request.app[_LIMITS]
    try:
        body = _decompress(await read_body(request, limits), encoding, limits.max_body_bytes)
    except _TooLarge:
        stats.bad_requests += 1
        return _status(413, RPC_INVALID_ARGUMENT, f"body larger than {limits.max_body_bytes} bytes", ctype)
    except BodyError as exc:
        if exc.status == 408:
            stats.timeouts += 1
            log.warning("tracer.http.body_timeout", reason=str(exc))
        else:
            stats.bad_requests += 1
        return _status(exc.status, RPC_INVALID_ARGUMENT, str(exc), ctype)
    except zlib.error as exc:
        return _bad(stats, ctype, f"cannot decompress {encoding} body: {exc}")
    try:
        if ctype == PROTOBUF:
            result = otlp.decode_request(body)
        else:
            result = otlp_json.decode_document(decode_json(body, limits.max_json_depth))
    except (otlp.OtlpDecodeError, BodyError) as exc:
        return _bad(stats, ctype, str(exc))
    if result.spans:
        try:
            await request.app[_SINK](result.spans)  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - tell the client to retry rather than drop silently
            log.error("tracer.http.store_failed", error=f"{type(exc).__name__}: {exc}")
            resp = _status(503, RPC_INTERNAL, "the trace store is unavailable, retry later", ctype)
            resp.headers["Retry-After"] = "1"
            return resp
    stats.spans += len(result.spans)
    stats.rejected_spans += result.rejected
    if result.rejected:
        log.warning("tracer.http.spans_rejected", rejected=result.rejected, reason=result.error_message[:300])
    enc = otlp.encode_response if ctype == PROTOBUF else otlp_json.encode_response
    return web.Response(status=200, body=enc(result.rejected, result.error_message), content_type=ctype)


class _TooLarge(ValueError):
    pass


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    # gzip: wbits 31; deflate: zlib-wrapped per RFC 9110, though some clients send raw deflate.
    attempts = (31,) if encoding in ("gzip", "x-gzip") else (15, -15)
    for i, wbits in enumerate(attempts):
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(body, limit + 1)
        except zlib.error:
            if i == len(attempts) - 1:
                raise
            continue
        if len(out) > limit or d.unconsumed_tail:
            raise _TooLarge
        if not d.eof:
            raise zlib.error("compressed stream is truncated")
        return out
    raise zlib.error("unreachable")


def _bad(stats: ReceiverStats, ctype: str, reason: str) -> web.Response:
    stats.bad_requests += 1
    stats.last_errors = ([*stats.last_errors, reason[:300]])[-5:]
    log.warning("tracer.http.bad_request", reason=reason[:300])
    return _status(400, RPC_INVALID_ARGUMENT, reason[:1000], ctype)


def create_app(sink: Sink, *, token: str | None = None, stats: ReceiverStats | None = None,
               limits: HttpLimits = LIMITS) -> web.Application:
    app = web.Application(client_max_size=limits.max_body_bytes)
    app[_LIMITS] = limits
    app[_SINK] = sink
    app[_TOKEN] = token
    app[_STATS] = stats or ReceiverStats()
    app.router.add_post("/v1/traces", _handle)
    return app


@dataclass
class RunningReceiver(RunningSite):
    """The started OTLP/HTTP receiver (``url`` ends in ``/v1/traces``) and its counters."""

    stats: ReceiverStats = field(default_factory=lambda: ReceiverStats())


async def start_receiver(sink: Sink, *, host: str, port: int, token: str | None = None,
                         limits: HttpLimits = LIMITS) -> RunningReceiver:
    """Listen on ``host:port`` (``port=0`` picks a free port; see ``.port``)."""
    stats = ReceiverStats()
    runner = await start_site(create_app(sink, token=token, stats=stats, limits=limits), host, port, limits,
                              auto_decompress=False)
    return RunningReceiver(runner, host, runner.addresses[0][1], "/v1/traces", stats)
