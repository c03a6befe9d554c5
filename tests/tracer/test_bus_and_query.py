"""Spans over the bus, traces larger than a NATS message, and traces surviving a tracer restart."""

from __future__ import annotations

import asyncio
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from buildtel.services.tracer.bus_exporter import BusSpanExporter
from buildtel.services.tracer.service import TracerService
from buildtel.services.tracer.subjects import TracerSubjects
from buildtel.shared.bus import dead_letter_decoder
from buildtel.shared.subjects import Subjects
from buildtel.shared.tracemodel import SpanBatch, SpanRecord, span_batch_encoder
from tests.tracer.helpers import eventually


def _big_trace(n: int) -> list[Any]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "big"}), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests.big")
    with tracer.start_as_current_span("root"):
        for i in range(n):
            with tracer.start_as_current_span(f"step-{i}", attributes={"payload": "x" * 400, "i": i}):
                pass
    provider.shutdown()
    return list(memory.get_finished_spans())


async def test_a_trace_bigger_than_a_nats_message_travels_and_is_queried_whole(tracer, client, tracer_settings) -> None:
    spans = _big_trace(3000)  # ~1.5 MB: several bus messages, several query pages
    exporter = BusSpanExporter(tracer_settings)
    try:
        assert await asyncio.to_thread(exporter.export, spans) == SpanExportResult.SUCCESS
    finally:
        await asyncio.to_thread(exporter.shutdown)
    trace_id = f"{spans[0].context.trace_id:032x}"
    trace = await eventually(lambda: client.get(trace_id), ok=lambda t: len(t.spans) == 3001, timeout=30)
    root = next(s for s in trace.spans if s.name == "root")
    assert all(s.parent_span_id == root.span_id for s in trace.spans if s is not root)
    assert sorted(s.attributes["i"] for s in trace.spans if s is not root) == list(range(3000))
    assert (await client.stats()).bus_batches >= 2


async def test_bad_bus_input_is_dead_lettered_and_bad_ids_dropped(tracer, client, nc, settings) -> None:
    tsubjects = TracerSubjects(Subjects(settings.namespace))
    dead = await nc.subscribe(Subjects(settings.namespace).dead_letter("tracer"))
    js = nc.jetstream()
    await js.publish(tsubjects.spans, b"\xc1garbage", headers={"Nats-Msg-Id": "g"})
    letter = dead_letter_decoder.decode((await dead.next_msg(timeout=10)).data)
    assert "undecodable span batch" in letter.reason
    good = SpanRecord(trace_id="12" * 16, span_id="34" * 8, name="good")
    bad = SpanRecord(trace_id="12" * 16, span_id="0" * 16, name="zero-id")
    await js.publish(tsubjects.spans, span_batch_encoder.encode(SpanBatch(spans=[good, bad])),
                     headers={"Nats-Msg-Id": "mixed"})
    trace = await eventually(lambda: client.get("12" * 16))
    assert [s.name for s in trace.spans] == ["good"]


async def test_traces_survive_a_tracer_restart(tracer_settings, nc, redis_client, client) -> None:
    s = tracer_settings
    first = TracerService(s, s.nats_url or "", s.redis_url or "", otlp_port=0)
    await first.start()
    spans = _big_trace(5)
    exporter = BusSpanExporter(s)
    await asyncio.to_thread(exporter.export, spans)
    await asyncio.to_thread(exporter.shutdown)
    trace_id = f"{spans[0].context.trace_id:032x}"
    before = await eventually(lambda: client.get(trace_id), ok=lambda t: len(t.spans) == 6)
    await first.stop()
    await first.stop()  # idempotent
    second = TracerService(s, s.nats_url or "", s.redis_url or "", otlp_port=0)
    await second.start()
    try:
        after = await client.get(trace_id)
        assert after.spans == before.spans
        assert (await client.stats()).spans_stored == 0  # read from disk, not re-ingested
    finally:
        await second.stop()


def test_pages_of_a_growing_trace_neither_repeat_nor_skip_what_was_there(tmp_path, monkeypatch) -> None:
    import msgspec

    from buildtel.services.tracer import query
    from buildtel.services.tracer.store import TraceStore

    monkeypatch.setattr(query, "REPLY_BUDGET", 2000)  # a few spans per page
    store = TraceStore(tmp_path, retention_s=3600, fsync=False)
    store.open()
    tid = "ab" * 16
    def mk(i):
        return SpanRecord(trace_id=tid, span_id=f"{i + 1:016x}", name=f"s{i}", start_ns=i * 10,
                          end_ns=i * 10 + 5, attributes={"pad": "x" * 200})
    store.append([mk(i) for i in range(0, 40, 2)], source="bus")  # even starts first
    dec = msgspec.msgpack.Decoder(query.TraceReply)
    first = dec.decode(query.answer(store, "get", msgspec.msgpack.encode({"id": tid})))
    assert 0 < len(first.spans) < 20 and first.next_cursor is not None
    store.append([mk(i) for i in range(1, 40, 2)], source="bus")  # odd ones arrive between pages
    seen = [s.span_id for s in first.spans]
    cursor = first.next_cursor
    while cursor is not None:
        page = dec.decode(query.answer(store, "get", msgspec.msgpack.encode({"id": tid, "cursor": cursor})))
        seen += [s.span_id for s in page.spans]
        cursor = page.next_cursor
    assert len(seen) == len(set(seen))  # no repeats
    evens = {f"{i + 1:016x}" for i in range(0, 40, 2)}
    assert evens <= set(seen)  # nothing that was there when the read began is skipped
    store.close()


async def test_a_taken_default_port_leaves_the_tracer_running_without_otlp(tracer_settings, nc, redis_client,
                                                                           client) -> None:
    import socket

    import pytest

    s = tracer_settings
    with socket.socket() as squatter:  # e.g. a local Jaeger on 4318
        squatter.bind((s.http_host, 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        explicit = TracerService(s, s.nats_url or "", s.redis_url or "", otlp_port=busy)
        with pytest.raises(OSError):
            await explicit.start()  # asked for that port: failing loudly is right
        lenient = TracerService(s, s.nats_url or "", s.redis_url or "")  # the default port...
        lenient.otlp_port = busy  # ...stands in for 4318, which this test cannot own
        await lenient.start()
        try:
            stats = await client.stats()
            assert stats.otlp_url == "" and stats.traces == 0
            spans = _big_trace(2)
            exporter = BusSpanExporter(s)
            await asyncio.to_thread(exporter.export, spans)
            await asyncio.to_thread(exporter.shutdown)
            trace = await eventually(lambda: client.get(f"{spans[0].context.trace_id:032x}"),
                                     ok=lambda t: len(t.spans) == 3)
            assert {sp.name for sp in trace.spans} == {"root", "step-0", "step-1"}
        finally:
            await lenient.stop()
