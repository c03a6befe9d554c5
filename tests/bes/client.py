"""A Build Event Service client in Bazel's framing, for replaying recorded BEP streams over gRPC.

Bazel (BuildEventServiceUploader) sends lifecycle events ``BuildEnqueued`` and
``InvocationAttemptStarted``, then one ``PublishBuildToolEventStream`` call: each BEP event as an
``OrderedBuildEvent`` (stream id = build id, invocation id, component TOOL; sequence numbers from
1; the ``build_event_stream.BuildEvent`` packed in ``bazel_event``), closed by a
``component_stream_finished`` event, waiting for every acknowledgement in order; then
``InvocationAttemptFinished`` and ``BuildFinished``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format, timestamp_pb2

from buildtel.services.bes.gen import (
    build_event_stream_pb2,
    build_events_pb2,
    build_status_pb2,
    publish_build_event_pb2,
    publish_build_event_pb2_grpc,
)

DATA = Path(__file__).parent.parent / "data" / "bep"


def read_bep_json(path: Path) -> list[Any]:
    """The file's BEP events as protobuf messages (fields newer than our protos are ignored)."""
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        raw = json.loads(line)
        # Hand-redacted payloads (a string instead of an object) cannot be protobuf: drop them, as
        # Bazel could never have sent them.
        raw = {k: v for k, v in raw.items() if k in ("id", "children", "lastMessage") or isinstance(v, dict)}
        out.append(json_format.ParseDict(raw, build_event_stream_pb2.BuildEvent(), ignore_unknown_fields=True))
    return out


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


@dataclass
class Replay:
    acks: list[int] = field(default_factory=list)
    ack_ms: list[float] = field(default_factory=list)


def _stream_id(build_id: str, invocation_id: str) -> Any:
    return build_events_pb2.StreamId(build_id=build_id, invocation_id=invocation_id,
                                     component=build_events_pb2.StreamId.TOOL)


async def _lifecycle(stub: Any, build_id: str, invocation_id: str, metadata: Any = None, **event: Any) -> None:
    obe = publish_build_event_pb2.OrderedBuildEvent(
        stream_id=build_events_pb2.StreamId(build_id=build_id, invocation_id=invocation_id,
                                            component=build_events_pb2.StreamId.CONTROLLER),
        sequence_number=1, event=build_events_pb2.BuildEvent(event_time=_now(), **event))
    await stub.PublishLifecycleEvent(publish_build_event_pb2.PublishLifecycleEventRequest(
        service_level=publish_build_event_pb2.PublishLifecycleEventRequest.INTERACTIVE, build_event=obe),
        metadata=metadata)


async def replay(target: str, events: list[Any], invocation_id: str, build_id: str = "b" * 8,
                 finish_stream: bool = True, stop_after: int | None = None,
                 metadata: tuple[tuple[str, str], ...] | None = None) -> Replay:
    """Send ``events`` as Bazel does; returns the acknowledged sequence numbers in arrival order.
    ``stop_after``: send that many events, then break the call once the last is acknowledged (it
    must be an event the endpoint publishes at once, such as a targetCompleted).  ``metadata``: sent
    with every call (an API key)."""
    result = Replay()
    sent_at: dict[int, float] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = publish_build_event_pb2_grpc.PublishBuildEventStub(channel)
        await _lifecycle(stub, build_id, invocation_id, metadata,
                         build_enqueued=build_events_pb2.BuildEvent.BuildEnqueued())
        await _lifecycle(stub, build_id, invocation_id, metadata,
                         invocation_attempt_started=build_events_pb2.BuildEvent.InvocationAttemptStarted(
                             attempt_number=1))
        sid = _stream_id(build_id, invocation_id)
        n = len(events) if stop_after is None else stop_after

        async def requests() -> AsyncIterator[Any]:
            for i, ev in enumerate(events[:n], start=1):
                packed = any_pb2.Any()
                packed.Pack(ev)
                sent_at[i] = time.perf_counter()
                yield publish_build_event_pb2.PublishBuildToolEventStreamRequest(
                    ordered_build_event=publish_build_event_pb2.OrderedBuildEvent(
                        stream_id=sid, sequence_number=i,
                        event=build_events_pb2.BuildEvent(event_time=_now(), bazel_event=packed)))
            if finish_stream and stop_after is None:
                sent_at[n + 1] = time.perf_counter()
                yield publish_build_event_pb2.PublishBuildToolEventStreamRequest(
                    ordered_build_event=publish_build_event_pb2.OrderedBuildEvent(
                        stream_id=sid, sequence_number=n + 1, event=build_events_pb2.BuildEvent(
                            event_time=_now(), component_stream_finished=build_events_pb2.BuildEvent.
                            BuildComponentStreamFinished(type=build_events_pb2.BuildEvent.
                                                         BuildComponentStreamFinished.FINISHED))))
            else:
                await asyncio.Event().wait()  # hold the call open until it is cancelled

        call = stub.PublishBuildToolEventStream(requests(), metadata=metadata)
        expected = n + (1 if finish_stream and stop_after is None else 0)
        async for resp in call:
            result.acks.append(resp.sequence_number)
            result.ack_ms.append((time.perf_counter() - sent_at[resp.sequence_number]) * 1000.0)
            if stop_after is not None and resp.sequence_number >= n:
                break
            if len(result.acks) >= expected:
                break
        call.cancel()
        if stop_after is None:
            await _lifecycle(stub, build_id, invocation_id, metadata,
                             invocation_attempt_finished=build_events_pb2.BuildEvent.InvocationAttemptFinished(
                                 invocation_status=build_status_pb2.BuildStatus(
                                     result=build_status_pb2.BuildStatus.COMMAND_SUCCEEDED)))
    return result


def as_imported(data: bytes) -> Any:
    """The session ``buildtel import bep`` stores of a BEP JSON file: the importer's mapping, then
    the one classified failure record per failed target the collector gives a live build too."""
    from buildtel.shared.failrecord import unify
    from buildtel.shared.importers.bep import parse_bep

    return unify(parse_bep(data).sessions[0])
