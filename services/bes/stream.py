"""One ``PublishBuildToolEventStream`` call: map, publish durably, acknowledge in order.

Each request's ``OrderedBuildEvent`` carries a ``build_event_stream.BuildEvent`` (a protobuf
``Any``), turned into proto3 JSON by protobuf's own ``json_format`` and mapped by
:class:`~buildtel.shared.importers.bep_stream.StreamMapper`.  The project's events it gives are
published to ``<ns>.events.<session>`` (JetStream, ``Nats-Msg-Id`` = session:agent:first seq,
so a re-published batch is dropped as a duplicate) and a request is acknowledged only once
JetStream has acknowledged the publish that carries its information.  Acknowledgements go out
in request order (Bazel requires it).

Back-pressure: at most ``window`` requests wait to be mapped and ``window`` to be acknowledged
per stream; when the queues are full, this stops reading the call, so gRPC's flow control makes Bazel wait
(Bazel keeps un-acknowledged events in its own memory and retries them on a new stream).
Memory per stream is therefore bounded by the window (times the message size cap) plus the
mapper's per-target state (one small entry per target and test run, as the session itself;
nothing per action or test attempt; failure records and test summaries capped, docs/bazel.md).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from buildtel.services.bes.gen import build_event_stream_pb2, publish_build_event_pb2
from buildtel.shared.importers import bep_details, bep_events
from buildtel.shared.importers.bep_stream import StreamMapper
from buildtel.shared.importers.common import content_id
from buildtel.shared.protocol import Event

# The BuildEventId kinds the mapping reads (bep_events.HANDLERS, buildMetadata), by protobuf field name.
_JSON_NAMES = {f.name: f.json_name for f in build_event_stream_pb2.BuildEventId.DESCRIPTOR.oneofs_by_name["id"].fields}
_CONVERTED = frozenset(n for n, j in _JSON_NAMES.items() if j in bep_events.HANDLERS or j == "buildMetadata")
Publish = Callable[[str, str, list[Event]], Awaitable[None]]  # (session id, agent id, events)
WINDOW = 1000  # requests between receipt and acknowledgement, per stream (each queue)
MAX_BATCH = 500  # events per published batch (the SDK's batch size)


def session_id_for(invocation_id: str, build_id: str = "") -> str:
    """The session id of a Bazel invocation: its UUID without dashes (what the results link shows)."""
    hexid = invocation_id.replace("-", "").lower()
    if re.fullmatch(r"[0-9a-f]{32}", hexid) and hexid != "0" * 32:
        return hexid
    return content_id("bes", build_id, invocation_id)


@dataclass
class Invocation:
    """What outlives one stream of an invocation: Bazel retries a broken stream from its first
    un-acknowledged event, and events already mapped (and published) must not be mapped twice."""

    mapper: StreamMapper
    mapped_up_to: int = 0  # highest sequence number whose events are published
    streams: int = 0
    unpublished: bool = False  # a stream broke with mapped events unpublished: start afresh


@dataclass
class _Pending:
    request: Any  # the OrderedBuildEvent
    done: asyncio.Future[None] | None  # None: acknowledgeable once every earlier one is


class StreamHandler:
    """Serves one call; ``run`` is the response iterator grpc.aio sends back.

    Three steps joined by bounded queues: a pump reads the call, the mapper maps and publishes
    (coalescing the events of requests that arrived together into one batch, flushed as soon as
    no further request is waiting or ``MAX_BATCH`` events are pending), the writer acknowledges
    in order once each request's publish is acknowledged.
    """

    def __init__(self, invocations: dict[str, Invocation], publish: Publish, new_agent: Callable[[], str],
                 window: int = WINDOW, *, tenant: str = "", output_kib: int = bep_details.OUTPUT_KIB) -> None:
        self.invocations, self.publish, self.new_agent = invocations, publish, new_agent
        self.window, self.tenant, self.output_kib = window, tenant, output_kib
        self.events = 0

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        inbox: asyncio.Queue[Any] = asyncio.Queue(self.window)
        acks: asyncio.Queue[_Pending | None] = asyncio.Queue(self.window)
        loop = asyncio.get_running_loop()
        pump = loop.create_task(self._pump(requests, inbox))
        mapper = loop.create_task(self._map(inbox, acks))
        try:
            while (item := await acks.get()) is not None:
                if item.done is not None:
                    await item.done  # raises if its publish failed: the call ends with an error
                obe = item.request
                yield publish_build_event_pb2.PublishBuildToolEventStreamResponse(
                    stream_id=obe.stream_id, sequence_number=obe.sequence_number)
            await mapper  # re-raises a failure of the mapper
            await pump
        finally:
            pump.cancel()
            mapper.cancel()

    async def _pump(self, requests: AsyncIterator[Any], inbox: asyncio.Queue[Any]) -> None:
        try:
            async for req in requests:
                await inbox.put(req.ordered_build_event)  # blocks when the mapper is a window behind
        finally:
            await inbox.put(None)

    async def _map(self, inbox: asyncio.Queue[Any], acks: asyncio.Queue[_Pending | None]) -> None:
        inv: Invocation | None = None
        waiting: list[Any] = []  # requests whose acknowledgement waits for the next publish
        batch: list[Event] = []
        try:
            while (obe := await inbox.get()) is not None:
                if inv is None:
                    inv = self._invocation(obe.stream_id, obe.sequence_number)
                    inv.streams += 1
                events = self._events(inv, obe)
                if events or waiting or inv.mapper.holding:
                    batch += events
                    waiting.append(obe)
                else:
                    await acks.put(_Pending(obe, None))
                if batch and (inbox.empty() or len(batch) >= MAX_BATCH):
                    done = asyncio.ensure_future(self._publish(inv, batch, obe.sequence_number))
                    for w in waiting:
                        await acks.put(_Pending(w, done))
                    waiting, batch = [], []
                elif waiting and not batch and not inv.mapper.holding:  # released with nothing to say
                    for w in waiting:
                        await acks.put(_Pending(w, None))
                    waiting = []
        finally:
            if inv is not None and (waiting or batch):
                inv.unpublished = True  # the stream broke with information unpublished: not acknowledged
            if inv is not None and inv.mapper.finished:
                self.invocations.pop(self._key(inv.mapper.session_id), None)
            await acks.put(None)

    def _events(self, inv: Invocation, obe: Any) -> list[Event]:
        if obe.sequence_number <= inv.mapped_up_to:  # resent after a broken stream: already published
            return []
        if obe.event.WhichOneof("event") == "bazel_event":
            msg = build_event_stream_pb2.BuildEvent()
            if obe.event.bazel_event.Unpack(msg):
                self.events += 1
                kind = msg.id.WhichOneof("id")
                if kind in _CONVERTED:
                    return inv.mapper.feed(json_format.MessageToDict(msg))
                # Kinds the mapping only counts (progress, namedSet…: half of a stream): their id is
                # enough, and converting the whole message is most of an event's cost.
                return inv.mapper.feed({"id": {_JSON_NAMES.get(kind or "", "unknown"): {}},
                                        "lastMessage": msg.last_message})
        elif obe.event.HasField("component_stream_finished"):
            return inv.mapper.close()
        return []

    def _invocation(self, stream_id: Any, first_seq: int) -> Invocation:
        sid = session_id_for(stream_id.invocation_id, stream_id.build_id)
        inv = self.invocations.get(self._key(sid))
        if inv is None or inv.unpublished:
            # A stream that starts past 1: Bazel retrying from its first un-acknowledged event; the
            # header was published by an earlier mapper (or an earlier process, when unknown here).
            resumed = first_seq > 1 and (inv is None or inv.mapper.header_sent)
            inv = Invocation(StreamMapper(sid, self.new_agent(), output_kib=self.output_kib, resumed=resumed))
            self.invocations[self._key(sid)] = inv
        return inv

    def _key(self, session_id: str) -> str:
        return f"{self.tenant}/{session_id}"  # one tenant's invocation is never continued by another's stream

    async def _publish(self, inv: Invocation, events: list[Event], seq: int) -> None:
        # Batches of a call are published concurrently (one connection keeps them in order on the
        # wire); a failure marks the invocation so a retried stream starts afresh.
        try:
            await self.publish(inv.mapper.session_id, inv.mapper.agent_id, events)
        except BaseException:
            inv.unpublished = True
            raise
        inv.mapped_up_to = max(inv.mapped_up_to, seq)
