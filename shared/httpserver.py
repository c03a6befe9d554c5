"""One way to run our HTTP endpoints (OTLP/HTTP ingest, the W3C testpoint, /metrics) with limits.

Every server goes through :func:`start_site`, so the timeouts and size limits are the
same everywhere and documented once (``docs/tracing.md``, ``docs/metrics.md``):

* **idle / request-head timeout** (``HttpLimits.idle_timeout``, default 15 s): aiohttp's
  ``keepalive_timeout`` starts when a connection opens and again after each response, and
  is *not* reset by incoming bytes, so a connection that has not delivered a complete
  request line and headers within that time is closed.  That is what stops a slow-loris
  client that sends its headers a byte at a time.
* **body timeout** (``HttpLimits.body_timeout``, default 30 s): :func:`read_body` must get
  the whole body in that time, else the request is answered 408 and the connection closed
  (after at most 10 s of aiohttp discarding the rest of the body).
* **body size** (``HttpLimits.max_body_bytes``): larger bodies are 413.
* **header size**: request line and each header at most 8 KiB, at most 100 headers
  (aiohttp answers 400 beyond that).
* **JSON nesting depth** (``HttpLimits.max_json_depth``, default 64): :func:`decode_json`
  answers 400 for deeper documents instead of letting a ``RecursionError`` become a 500.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

__all__ = ["DEFAULT_LIMITS", "BodyError", "HttpLimits", "RunningSite", "decode_json", "json_depth", "read_body",
           "start_site"]


@dataclass(frozen=True)
class HttpLimits:
    idle_timeout: float = 15.0
    body_timeout: float = 30.0
    max_body_bytes: int = 1024 * 1024
    max_json_depth: int = 64
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 100


DEFAULT_LIMITS = HttpLimits()


class BodyError(ValueError):
    """A request body we refuse: ``status`` is the HTTP status to answer with, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class RunningSite:
    """A started HTTP endpoint: where it listens, the path it serves, ``await close()`` to stop it."""

    runner: web.AppRunner
    host: str
    port: int
    path: str = "/"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_site(app: web.Application, host: str, port: int, limits: HttpLimits = DEFAULT_LIMITS,
                     **runner_options: Any) -> web.AppRunner:
    """Set up ``app`` and listen on ``host:port`` with ``limits``; the bound port is
    ``runner.addresses[0][1]`` (``port=0`` picks a free one).  Clean up with ``runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.idle_timeout,
                           max_line_size=limits.max_line_size, max_field_size=limits.max_field_size,
                           max_headers=limits.max_headers, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def read_body(request: web.Request, limits: HttpLimits = DEFAULT_LIMITS) -> bytes:
    """The whole body, within ``limits.body_timeout`` and ``limits.max_body_bytes``.

    Raises :class:`BodyError` 408 (too slow) or 413 (too large).  After the answer aiohttp
    reads and discards what is left of the body for at most ``lingering_time`` (10 s),
    then closes the connection."""
    declared = request.content_length
    if declared is not None and declared > limits.max_body_bytes:
        raise BodyError(413, f"body of {declared} bytes is larger than the limit of {limits.max_body_bytes} bytes")
    try:
        async with asyncio.timeout(limits.body_timeout):
            return await request.read()
    except TimeoutError:
        raise BodyError(408, f"body not received within {limits.body_timeout:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyError(413, f"body larger than the limit of {limits.max_body_bytes} bytes") from None


def json_depth(doc: Any, limit: int) -> int:
    """Nesting depth of decoded JSON (a scalar is 0, ``[]`` is 1), counted without
    recursion; stops early and returns ``limit + 1`` once the depth passes ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        depth += 1
        if depth > limit:
            return limit + 1
        deepest = max(deepest, depth)
        stack.extend((v, depth) for v in value if isinstance(v, dict | list))
    return deepest


def decode_json(body: bytes, max_depth: int = DEFAULT_LIMITS.max_json_depth) -> Any:
    """Decode JSON, refusing (``BodyError`` 400) bodies that are not JSON or nest deeper
    than ``max_depth`` arrays/objects.  msgspec's own recursion guard raises
    ``RecursionError`` near the interpreter's limit; that is a 400 here as well."""
    too_deep = f"JSON nested deeper than {max_depth} levels"
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise BodyError(400, f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BodyError(400, too_deep) from None
    if json_depth(doc, max_depth) > max_depth:
        raise BodyError(400, too_deep)
    return doc
