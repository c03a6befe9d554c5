"""Sending spans elsewhere: OTLP/HTTP (JSON or protobuf), Zipkin v2, and a Jaeger UI file.

``OtlpHttpExporter`` is how Jaeger (>= 1.35, port 4318), Tempo or an
OpenTelemetry Collector ingest today; ``ZipkinExporter`` posts v2 JSON to
``/api/v2/spans``; :func:`write_jaeger_file` writes what the Jaeger UI opens
offline.  HTTP exporters retry 429/502/503/504 and connection errors with
exponential backoff and jitter, honouring ``Retry-After`` (seconds or an
HTTP date) because a backend that says when to come back knows better than
our backoff; other 4xx are permanent (retrying a rejected body cannot help).

:class:`Forwarder` feeds an exporter continuously from the tracer: a bounded
queue (spans beyond it are dropped and counted rather than growing memory
while a backend is down), batches of ``batch_spans``, one batch in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gzip
import os
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from yarl import URL

from buildtel.services.tracer import otlp, otlp_json
from buildtel.services.tracer.formats import jaeger_document, to_zipkin
from buildtel.shared.files import open_private
from buildtel.shared.logs import get_logger
from buildtel.shared.tracemodel import SpanRecord

log = get_logger("tracer.exporters")

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


class ExportError(Exception):
    """Delivery failed for good (permanent status, or retries exhausted)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0  # a longer Retry-After is capped rather than obeyed blindly


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date), else ``None``."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class HttpSpanExporter:
    """Base: POST encoded spans to ``url`` with retries.  Subclasses define :meth:`encode`."""

    kind = "http"

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, timeout_s: float = 10.0,
                 retry: RetryPolicy | None = None, batch_spans: int = 1000) -> None:
        self.url = url
        self.headers = dict(headers or {})
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retry = retry or RetryPolicy()
        self.batch_spans = batch_spans
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0
        self.retries = 0

    def encode(self, spans: Sequence[SpanRecord]) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    async def export(self, spans: Sequence[SpanRecord]) -> None:
        """Deliver ``spans`` in batches of ``batch_spans``; raises :class:`ExportError`."""
        for i in range(0, len(spans), self.batch_spans):
            body, headers = self.encode(spans[i:i + self.batch_spans])
            await self._post(body, headers)

    async def _post(self, body: bytes, headers: dict[str, str]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        backoff = self.retry.initial_backoff_s
        for attempt in range(1, self.retry.max_attempts + 1):
            wait: float | None = None
            try:
                self.requests += 1
                async with self._session.post(self.url, data=body, headers={**self.headers, **headers}) as resp:
                    text = await resp.read()
                    if 200 <= resp.status < 300:
                        self.check_response(resp.headers.get("Content-Type", ""), text)
                        return
                    if resp.status not in RETRYABLE_STATUS:
                        raise ExportError(f"{self.kind} {self.url} answered {resp.status}: {text[:200]!r}",
                                          resp.status)
                    wait = parse_retry_after(resp.headers.get("Retry-After"))
                    problem = f"status {resp.status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt == self.retry.max_attempts:
                raise ExportError(f"{self.kind} {self.url}: gave up after {attempt} attempts ({problem})")
            if wait is None:
                # Full jitter: many tracers retrying the same backend must not move in lockstep.
                wait = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, self.retry.max_backoff_s)
            wait = min(wait, self.retry.max_retry_after_s)
            self.retries += 1
            log.info("tracer.export.retry", exporter=self.kind, url=self.url, problem=problem, wait_s=round(wait, 3))
            await asyncio.sleep(wait)

    def check_response(self, content_type: str, body: bytes) -> None:
        """Hook for protocol-level results in a 2xx answer (OTLP partial success)."""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _with_default_path(url: str, path: str) -> str:
    u = URL(url)
    return str(u.with_path(path)) if u.path in ("", "/") else url


class OtlpHttpExporter(HttpSpanExporter):
    """OTLP/HTTP to ``url`` (``/v1/traces`` is appended to a bare host:port)."""

    kind = "otlp"

    def __init__(self, url: str, *, protocol: str = "protobuf", compression: str | None = None,
                 **kw: Any) -> None:
        if protocol not in ("protobuf", "json"):
            raise ValueError(f"OTLP protocol must be 'protobuf' or 'json', not {protocol!r}")
        if compression not in (None, "none", "gzip"):
            raise ValueError(f"OTLP compression must be 'gzip' or 'none', not {compression!r}")
        super().__init__(_with_default_path(url, "/v1/traces"), **kw)
        self.protocol = protocol
        self.gzip = compression == "gzip"
        self.rejected = 0

    def encode(self, spans: Sequence[SpanRecord]) -> tuple[bytes, dict[str, str]]:
        if self.protocol == "protobuf":
            body, ctype = otlp.encode_request(spans), "application/x-protobuf"
        else:
            body, ctype = otlp_json.encode_request(spans), "application/json"
        headers = {"Content-Type": ctype}
        if self.gzip:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        return body, headers

    def check_response(self, content_type: str, body: bytes) -> None:
        rejected, message = 0, ""
        try:
            if content_type.startswith("application/x-protobuf") and body:
                rejected, message = otlp.decode_response(body)
            elif content_type.startswith("application/json") and body:
                partial = (msgspec.json.decode(body) or {}).get("partialSuccess") or {}
                rejected, message = int(partial.get("rejectedSpans") or 0), partial.get("errorMessage", "")
        except Exception:  # noqa: BLE001 - an unreadable success body is still a success
            return
        if rejected:
            # Partial success is final per the OTLP spec: resending the same spans would not help.
            self.rejected += rejected
            log.warning("tracer.export.partial_success", url=self.url, rejected=rejected, message=message[:300])


class ZipkinExporter(HttpSpanExporter):
    """Zipkin v2 JSON to ``url`` (``/api/v2/spans`` is appended to a bare host:port)."""

    kind = "zipkin"

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(_with_default_path(url, "/api/v2/spans"), **kw)

    def encode(self, spans: Sequence[SpanRecord]) -> tuple[bytes, dict[str, str]]:
        return msgspec.json.encode(to_zipkin(spans)), {"Content-Type": "application/json"}


def write_jaeger_file(path: str | Path, traces: dict[str, Sequence[SpanRecord]]) -> Path:
    """Write traces as a Jaeger UI JSON file, atomically (a viewer never sees half a file)."""
    return _write_json(path, jaeger_document(traces))


def write_chrome_trace(path: str | Path, spans: Sequence[SpanRecord]) -> Path:
    """Write spans as a Chrome Trace Event Format file (Perfetto, chrome://tracing), atomically."""
    from buildtel.services.tracer.chrometrace import chrome_trace

    return _write_json(path, chrome_trace(spans))


def _write_json(path: str | Path, document: Any) -> Path:
    # 0600: a trace carries command lines and host names (redacted, but still the farm's own).
    # The folder is the user's: it is not tightened.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open_private(tmp, "wb") as f:
        f.write(msgspec.json.encode(document))
    os.replace(tmp, path)
    return path


class Forwarder:
    """Continuously deliver spans to one exporter from a bounded queue."""

    def __init__(self, exporter: HttpSpanExporter, *, max_queue_spans: int = 100_000,
                 batch_spans: int = 1000, flush_interval_s: float = 1.0) -> None:
        self.exporter = exporter
        self.max_queue_spans = max_queue_spans
        self.batch_spans = batch_spans
        self.flush_interval_s = flush_interval_s
        self._queue: deque[SpanRecord] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0
        self.failed = 0

    def offer(self, spans: Sequence[SpanRecord]) -> int:
        """Queue what fits; returns how many were accepted (the rest are counted as dropped)."""
        room = self.max_queue_spans - len(self._queue)
        accepted = max(0, min(room, len(spans)))
        if accepted:
            self._queue.extend(spans[:accepted])
        if accepted < len(spans):
            self.dropped += len(spans) - accepted
        if len(self._queue) >= self.batch_spans:
            self._wake.set()
        return accepted

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"tracer.forward.{self.exporter.kind}")

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                self._wake.clear()
                continue
            batch = [self._queue.popleft() for _ in range(min(self.batch_spans, len(self._queue)))]
            try:
                await self.exporter.export(batch)
                self.sent += len(batch)
            except ExportError as exc:
                self.failed += len(batch)
                log.warning("tracer.forward.failed", exporter=self.exporter.kind, spans=len(batch), error=str(exc))

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued within ``timeout_s``, then give up on the rest. Idempotent."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                pass
            self._task = None
        self.dropped += len(self._queue)
        self._queue.clear()
        await self.exporter.close()
