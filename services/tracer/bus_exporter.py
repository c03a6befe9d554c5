"""An OpenTelemetry ``SpanExporter`` that publishes finished spans on the bus (JetStream).

Used through the SDK's ``BatchSpanProcessor`` (see ``api.configure_tracing``):
the processor batches and calls :meth:`BusSpanExporter.export` from its worker
thread.  SDK exporters are synchronous while nats-py is asyncio, so the
exporter owns a private event loop in a daemon thread and blocks on it; this
also works when the application itself runs an event loop, because the two
loops never meet.

Each batch becomes one or more MessagePack :class:`~buildtel.shared.tracemodel.SpanBatch`
messages under ``max_message_bytes`` on ``<ns>.spans``, published with a
``Nats-Msg-Id`` derived from the payload so a retried publish is dropped by
JetStream's duplicate window.  JetStream acknowledges each message, so
``SUCCESS`` means the spans are persisted in the stream even if the tracer
service is down at that moment.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from buildtel.services.tracer.subjects import TracerSubjects, ensure_spans_stream
from buildtel.shared.bus import close_nats, connect_nats, has_credentials
from buildtel.shared.logs import get_logger
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from buildtel.shared.tracemodel import (
    SpanBatch,
    SpanEvent,
    SpanLink,
    SpanRecord,
    span_batch_encoder,
)

log = get_logger("tracer.bus_exporter")
T = TypeVar("T")

DEFAULT_MAX_MESSAGE_BYTES = 768 * 1024  # under the spans stream's 1 MiB message limit


def _attrs(attributes: Any) -> dict[str, Any]:
    # SDK attribute arrays are tuples; msgpack writes them as arrays either way.
    return dict(attributes) if attributes else {}


def record_from_readable(span: ReadableSpan) -> SpanRecord:
    """The SDK's finished span as a :class:`SpanRecord` (OTLP numbering for kind and status)."""
    ctx = span.get_span_context()
    if ctx is None:  # the SDK gives every span it started a context; a hand-made ReadableSpan may lack one
        raise ValueError(f"span {span.name!r} has no span context: its trace and span ids are unknown")
    parent = span.parent
    status = span.status
    scope = span.instrumentation_scope
    return SpanRecord(
        trace_id=format(ctx.trace_id, "032x"),
        span_id=format(ctx.span_id, "016x"),
        parent_span_id=format(parent.span_id, "016x") if parent is not None and parent.span_id else "",
        name=span.name,
        kind=span.kind.value + 1,  # SDK INTERNAL=0 .. CONSUMER=4; OTLP INTERNAL=1 .. CONSUMER=5
        start_ns=span.start_time or 0,
        end_ns=span.end_time or span.start_time or 0,
        attributes=_attrs(span.attributes),
        events=[SpanEvent(name=e.name, time_ns=e.timestamp, attributes=_attrs(e.attributes),
                          dropped_attributes=getattr(e, "dropped_attributes", 0) or 0) for e in span.events],
        links=[SpanLink(trace_id=format(ln.context.trace_id, "032x"), span_id=format(ln.context.span_id, "016x"),
                        trace_state=ln.context.trace_state.to_header(), attributes=_attrs(ln.attributes),
                        dropped_attributes=getattr(ln, "dropped_attributes", 0) or 0,
                        flags=int(ln.context.trace_flags)) for ln in span.links],
        status_code=status.status_code.value,
        status_message=status.description or "",
        trace_state=ctx.trace_state.to_header(),
        flags=int(ctx.trace_flags),
        resource=_attrs(span.resource.attributes),
        scope_name=scope.name if scope else "",
        scope_version=(scope.version or "") if scope else "",
        dropped_attributes=span.dropped_attributes,
        dropped_events=span.dropped_events,
        dropped_links=span.dropped_links,
    )


def encode_batches(records: Sequence[SpanRecord], max_bytes: int) -> list[bytes]:
    """MessagePack ``SpanBatch`` payloads, each under ``max_bytes`` (halving until they fit)."""
    payload = span_batch_encoder.encode(SpanBatch(spans=list(records)))
    if len(payload) <= max_bytes or len(records) <= 1:
        return [payload]  # a single span over the limit is sent anyway: JetStream will say no
    mid = len(records) // 2
    return encode_batches(records[:mid], max_bytes) + encode_batches(records[mid:], max_bytes)


class _LoopThread:
    """A private asyncio loop in a daemon thread (daemon: it must not keep the process alive)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="buildtel-bus-exporter", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class BusSpanExporter(SpanExporter):
    """Publish span batches to ``<ns>.spans``; the tracer service stores them."""

    def __init__(self, settings: Settings, nats_url: str | None = None, *, timeout_s: float = 10.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        url = nats_url or settings.nats_url
        if not url:
            raise ValueError("BusSpanExporter needs a NATS URL (argument or BUILDER_TELEMETRY_NATS_URL)")
        self.settings = settings
        self.nats_url = url
        self.tsubjects = TracerSubjects(Subjects(settings.namespace))
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._lock = threading.Lock()  # export() and shutdown() may come from different threads
        self._thread: _LoopThread | None = None
        self._nc: Any = None
        self._js: Any = None
        self._shutdown = False
        self.published_spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        records = [record_from_readable(s) for s in spans]
        with self._lock:
            if self._thread is None:
                self._thread = _LoopThread()
            try:
                self._thread.run(self._publish(records), self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - the SDK wants a result, not an exception
                log.warning("tracer.bus_export_failed", spans=len(records), error=f"{type(exc).__name__}: {exc}")
                return SpanExportResult.FAILURE
        self.published_spans += len(records)
        return SpanExportResult.SUCCESS

    async def _publish(self, records: list[SpanRecord]) -> None:
        if self._js is None:
            # Connect lazily: a process that never finishes a span never opens a connection.
            self._nc = await connect_nats(self.settings, self.nats_url, name="buildtel-spans", role="agent",
                                          max_reconnect_attempts=10)
            self._js = self._nc.jetstream()
            if not has_credentials(self.settings):  # an agent's role may not: the tracer declares it
                try:
                    await ensure_spans_stream(self._js, self.tsubjects, replicas=self.settings.replicas)
                except Exception as exc:  # noqa: BLE001 - publish anyway
                    log.debug("tracer.bus_stream_not_declared", error=repr(exc))
        for payload in encode_batches(records, self.max_message_bytes):
            msg_id = hashlib.blake2b(payload, digest_size=16).hexdigest()
            await self._js.publish(self.tsubjects.spans, payload, headers={"Nats-Msg-Id": msg_id},
                                   timeout=self.timeout_s)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered here: export() returns after JetStream acknowledged

    def shutdown(self) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            thread, self._thread = self._thread, None
            if thread is not None:
                try:
                    thread.run(close_nats(self._nc), 5.0)
                except Exception as exc:  # noqa: BLE001 - closing at exit: nothing more to do
                    log.debug("tracer.bus_exporter_close_failed", error=repr(exc))
                thread.stop()
            self._nc = self._js = None
