"""The tracer service: takes spans in, keeps traces, answers queries, forwards to backends.

Inputs, all ending in :meth:`TracerService.ingest` (store, then forward):

* OTLP/HTTP ``POST /v1/traces`` on ``settings.http_host:otlp_port`` (``http.py``);
* span batches on the bus (``<ns>.spans``, JetStream, durable ``tracer``) from
  processes using the tracing API (``bus_exporter.py``);
* completed sessions (``Subjects.sessions_completed``, durable ``tracer``),
  turned into session -> target -> phase spans (``sessions.py``), so every
  build is a trace even when its agents never used the API.

Bus messages are acknowledged only after the store has them; a message that
cannot be decoded goes to the dead-letter subject instead of being retried
forever.  Re-delivered sessions are recognised and skipped (span ids are
deterministic anyway), re-delivered span batches collapse by span id on read.

One tracer per ``traces_dir``: queries are answered from the local store, so
run replicas only with separate namespaces.

Port 4318 is also where a local Jaeger or OpenTelemetry Collector listens.  When
the port was not chosen explicitly (``otlp_port=None``) and is taken, the tracer
logs ``tracer.otlp_unavailable`` and runs without the OTLP receiver (bus,
sessions and queries keep working) instead of taking ``buildtel up`` down with
it; an explicitly requested port that cannot be bound fails ``start()``.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import msgspec

from buildtel.services.tracer import query
from buildtel.services.tracer.exporters import Forwarder, OtlpHttpExporter, ZipkinExporter
from buildtel.services.tracer.http import RunningReceiver, start_receiver
from buildtel.services.tracer.options import DEFAULT_OTLP_PORT
from buildtel.services.tracer.redact import redact_spans
from buildtel.services.tracer.sessions import session_spans
from buildtel.services.tracer.store import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_TRACES,
    DEFAULT_SEGMENT_BYTES,
    TraceStore,
)
from buildtel.services.tracer.subjects import TracerSubjects
from buildtel.shared.bus import MAX_DELIVER
from buildtel.shared.codec import DecodeError, decode_session
from buildtel.shared.partitions import consumer_filters
from buildtel.shared.protocol import is_session_id
from buildtel.shared.service import BusService, Consumer, Endpoint, ServiceError, Worker
from buildtel.shared.settings import Settings
from buildtel.shared.tracemodel import SpanRecord, check_span, span_batch_decoder

DURABLE = "tracer"
FETCH_BATCH = 64
SYNC_INTERVAL_S = 1.0
RETENTION_INTERVAL_S = 60.0


class TracerService(BusService):
    name = "tracer"
    api_version = query.API_VERSION
    description = "Builder Telemetry traces"

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *, otlp_port: int | None = None,
                 forward_otlp: Sequence[str] = (), forward_otlp_protocol: str = "protobuf",
                 forward_zipkin: Sequence[str] = (), max_bytes: int = DEFAULT_MAX_BYTES,
                 max_traces: int = DEFAULT_MAX_TRACES, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 metrics_port: int | None = None) -> None:
        super().__init__(settings, nats_url, redis_url, metrics_port=metrics_port)
        self.otlp_port = DEFAULT_OTLP_PORT if otlp_port is None else otlp_port
        self._otlp_port_required = otlp_port is not None
        self.tsubjects = TracerSubjects(self.subjects)
        self.store = TraceStore(settings.traces_dir, retention_s=settings.retention_s, max_bytes=max_bytes,
                                max_traces=max_traces, segment_bytes=segment_bytes, fsync=settings.fsync)
        self.forwarders = [Forwarder(OtlpHttpExporter(u, protocol=forward_otlp_protocol)) for u in forward_otlp]
        self.forwarders += [Forwarder(ZipkinExporter(u)) for u in forward_zipkin]
        self.receiver: RunningReceiver | None = None
        self.sessions_synthesized = 0
        self.redacted_values = 0  # span attribute values redacted on receipt
        self.bus_batches = 0

    @property
    def otlp_url(self) -> str:
        """``http://host:port/v1/traces`` once started (the real port when ``otlp_port=0``)."""
        if self.receiver is None:
            raise RuntimeError("the OTLP receiver is not listening (service not started, or port taken)")
        return self.receiver.url

    # -- declarations (shared/service.py) -------------------------------------------------------
    def streams(self) -> list[Any]:
        return [self.tsubjects.spans_stream_config()]

    def consumers(self) -> list[Consumer]:
        # Input that fails ingest on every delivery is parked on the dead-letter subject (advisory).
        common = dict(durable=DURABLE, what="ingest", fetch=FETCH_BATCH, ack_wait_s=30.0, max_deliver=MAX_DELIVER,
                      max_ack_pending=10_000)
        return [Consumer(stream=self.subjects.sessions_stream, subject=self.subjects.sessions_completed,
                         handler=self._on_session,
                         filter_subjects=consumer_filters(self.subjects, self.settings.storage_partitions),
                         **common),  # type: ignore[arg-type]
                Consumer(stream=self.tsubjects.spans_stream, subject=self.tsubjects.spans, handler=self._on_spans,
                         lag_metric="spans_consumer_lag", **common)]  # type: ignore[arg-type]

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint(ep, self.tsubjects.endpoint(ep), partial(self._query, ep)) for ep in query.ENDPOINTS]

    def workers(self) -> list[Worker]:
        return [Worker("housekeeping", self._housekeeping)]

    def counters(self) -> dict[str, float]:
        return {"sessions_synthesized_total": self.sessions_synthesized, "bus_batches_total": self.bus_batches}

    async def open(self, stack: AsyncExitStack) -> None:
        report = self.store.open()
        stack.callback(self.store.close)  # closed last, after every writer has stopped
        if report.damaged_regions or report.truncated_bytes:
            self.log.warning("tracer.store.damage", damaged_regions=report.damaged_regions,
                             truncated_bytes=report.truncated_bytes)
        self.store.enforce_retention()

    async def prepare(self, stack: AsyncExitStack) -> None:
        for fwd in self.forwarders:
            fwd.start()
            stack.push_async_callback(fwd.stop)
        try:
            self.receiver = await start_receiver(self.ingest_otlp, host=self.settings.http_host,
                                                 port=self.otlp_port, token=self.settings.http_token)
        except OSError as exc:
            if self._otlp_port_required or exc.errno != errno.EADDRINUSE:
                raise
            self.log.error("tracer.otlp_unavailable", port=self.otlp_port, error=str(exc),
                           hint="another process (a local Jaeger?) has the port: pass --otlp-port")
        else:
            stack.push_async_callback(self.receiver.close)

    async def started_fields(self) -> dict[str, Any]:
        return {"otlp": self.receiver.url if self.receiver else None, "traces": len(self.store.traces),
                "forward": [f.exporter.url for f in self.forwarders]}

    def stopped_fields(self) -> dict[str, Any]:
        return {"spans": self.store.spans_written, "sessions": self.sessions_synthesized}

    # -- ingest --------------------------------------------------------------------------------
    async def ingest(self, spans: list[SpanRecord], *, source: str, session_id: str = "") -> None:
        """Store ``spans`` (valid ids already checked), then hand them to every forwarder."""
        redacted = redact_spans(spans)  # a tool that recorded a secret in an attribute: never stored
        if redacted:
            self.redacted_values += redacted
            self.log.warning("tracer.redacted", values=redacted, source=source)
        self.store.append(spans, source=source, session_id=session_id)
        for fwd in self.forwarders:
            fwd.offer(spans)

    async def ingest_otlp(self, spans: list[SpanRecord]) -> None:
        await self.ingest(spans, source="otlp")

    async def _on_session(self, msg: Any) -> None:
        try:
            session = decode_session(msg.data)
        except DecodeError as exc:
            return await self.dead_letter(msg, f"undecodable session: {exc}")
        if not is_session_id(session.id):
            return await self.dead_letter(msg, f"session id {session.id[:80]!r} is not 32 lowercase hex digits")
        if not self.store.has_synthesized(session.id):
            await self.ingest(session_spans(session), source="session", session_id=session.id)
            self.sessions_synthesized += 1
            self.log.info("tracer.session_traced", session_id=session.id, targets=len(session.targets))
        await msg.ack()

    async def _on_spans(self, msg: Any) -> None:
        try:
            batch = span_batch_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return await self.dead_letter(msg, f"undecodable span batch: {exc}")
        good = [s for s in batch.spans if check_span(s) is None]
        if len(good) < len(batch.spans):
            self.log.warning("tracer.bus_spans_rejected", rejected=len(batch.spans) - len(good))
        if good:
            await self.ingest(good, source="bus")
        self.bus_batches += 1
        await msg.ack()

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        next_retention = loop.time() + RETENTION_INTERVAL_S
        while True:
            stopping = await self.idle(SYNC_INTERVAL_S)
            try:
                self.store.sync()
                if loop.time() >= next_retention:
                    next_retention = loop.time() + RETENTION_INTERVAL_S
                    self.store.enforce_retention()
            except OSError as exc:
                self.log.error("tracer.store.housekeeping_failed", error=repr(exc))
            if stopping:
                return

    # -- queries -------------------------------------------------------------------------------
    async def _query(self, endpoint: str, data: bytes) -> bytes:
        try:
            return _encode_stats(self.stats()) if endpoint == "stats" else query.answer(self.store, endpoint, data)
        except query.QueryError as exc:
            raise ServiceError(exc.code, exc.description) from None

    def stats(self) -> query.StatsReply:
        rs = self.receiver.stats if self.receiver else None
        return query.StatsReply(
            traces=len(self.store.traces), sessions=len(self.store.sessions),
            segments=self.store.segment_count(), disk_bytes=self.store.disk_bytes(),
            spans_stored=self.store.spans_written,
            otlp_requests=rs.requests if rs else 0, otlp_rejected_spans=rs.rejected_spans if rs else 0,
            otlp_bad_requests=rs.bad_requests if rs else 0, sessions_synthesized=self.sessions_synthesized,
            bus_batches=self.bus_batches, dead_letters=self.dead_letters,
            forward_sent=sum(f.sent for f in self.forwarders),
            forward_dropped=sum(f.dropped for f in self.forwarders),
            otlp_url=self.receiver.url if self.receiver else "")


def _encode_stats(stats: query.StatsReply) -> bytes:
    return msgspec.msgpack.encode(stats)
