"""The ``bes`` service: Bazel's Build Event Service (``google.devtools.build.v1.PublishBuildEvent``)
on grpcio, publishing the mapped events to the bus like an agent (docs/bazel.md).

Bazel connects with ``--bes_backend=grpc://HOST:PORT`` and prints ``--bes_results_url`` +
invocation id; the session id is that id without dashes, so ``<web_url>/sessions/`` is the
results URL.  The port is ``BUILDER_TELEMETRY_BES_PORT`` (unset: any free port, in stack.json),
on ``BUILDER_TELEMETRY_HTTP_HOST`` (loopback by default).  ``PublishLifecycleEvent`` is
accepted and not mapped: the BEP stream says everything the session needs.  Every call is
authorised first (``auth.py``: API keys from the call's metadata; the key's tenant is where its
events go).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import grpc
from google.protobuf import empty_pb2

from buildtel.services.bes.auth import Gate, Refused
from buildtel.services.bes.gen import publish_build_event_pb2_grpc
from buildtel.services.bes.stream import WINDOW, Invocation, StreamHandler
from buildtel.shared.codec import encode
from buildtel.shared.protocol import Event, EventBatch
from buildtel.shared.service import BusService
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

PUBLISH_TIMEOUT_S = 5.0
PUBLISH_ATTEMPTS = 6  # then the stream fails (Bazel retries it on a new call)


def _pause(attempt: int) -> float:
    """Seconds between failed publish attempt ``attempt`` (from 0) and the next."""
    return min(5.0, 0.2 * 2.0 ** attempt)


# The longest a batch is retried before its stream fails: every attempt timing out, and the pauses
# between them (36.2 s; docs/bazel.md says it, tests/bes/test_bounded.py checks it says it right).
PUBLISH_MAX_S = PUBLISH_ATTEMPTS * PUBLISH_TIMEOUT_S + sum(_pause(a) for a in range(PUBLISH_ATTEMPTS - 1))
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a BEP event can be large (a long command line, many outputs)
MAX_INVOCATIONS = 10_000  # invocations remembered for stream retries (oldest dropped)


class _Servicer(publish_build_event_pb2_grpc.PublishBuildEventServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, service: BesService) -> None:
        self.service = service

    async def _tenant(self, context: Any) -> str:
        try:
            return await self.service.gate.tenant(context.invocation_metadata())
        except Refused as exc:
            self.service.refused += 1
            self.service.log.warning("bes.refused", code=exc.code.name, reason=exc.message)
            await context.abort(exc.code, exc.message)
            raise  # not reached: abort raises

    async def PublishLifecycleEvent(self, request: Any, context: Any) -> Any:
        await self._tenant(context)
        self.service.lifecycle_events += 1
        return empty_pb2.Empty()

    async def PublishBuildToolEventStream(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        # An async generator: what grpc.aio takes as a bidirectional streaming handler.
        svc = self.service
        tenant = await self._tenant(context)
        svc.stream_calls += 1
        while len(svc.invocations) > MAX_INVOCATIONS:  # unfinished ones Bazel gave up on
            svc.invocations.pop(next(iter(svc.invocations)))

        async def publish(session_id: str, agent_id: str, events: list[Event]) -> None:
            await svc.publish(session_id, agent_id, events, tenant=tenant)

        handler = StreamHandler(svc.invocations, publish, svc.new_agent, window=svc.window, tenant=tenant,
                                output_kib=svc.settings.failure_output_kib)
        async for response in handler.run(request_iterator):
            yield response


class BesService(BusService):
    name = "bes"
    description = "Builder Telemetry Build Event Service endpoint"

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *, port: int | None = None,
                 window: int = WINDOW, metrics_port: int | None = None) -> None:
        super().__init__(settings, nats_url, redis_url, metrics_port=metrics_port)
        self.port = settings.bes_port if port is None else port
        self.window = window
        self.invocations: dict[str, Invocation] = {}
        self.server: Any = None
        self.bound_port = 0
        self.stream_calls = self.lifecycle_events = self.batches = self.refused = 0
        self.gate: Gate = None  # type: ignore[assignment]  # set in prepare (needs Redis)

    @property
    def url(self) -> str:
        """``grpc://host:port`` once started: what ``--bes_backend`` takes."""
        if not self.bound_port:
            raise RuntimeError("the BES endpoint is not listening (service not started)")
        return f"grpc://{self.settings.http_host}:{self.bound_port}"

    def counters(self) -> dict[str, float]:
        return {"bes_streams_total": self.stream_calls, "bes_lifecycle_events_total": self.lifecycle_events,
                "bes_batches_total": self.batches, "bes_invocations": len(self.invocations),
                "bes_refused_calls_total": self.refused}

    def new_agent(self) -> str:
        # One agent per mapper: its seqs start at 0, apart from any earlier mapper of the invocation.
        return f"bes.{secrets.token_hex(4)}"

    async def publish(self, session_id: str, agent_id: str, events: list[Event], *, tenant: str | None = None) -> None:
        """Publish one batch durably (JetStream ack) to ``tenant``'s namespace (default: the
        service's), retrying with the same Msg-Id."""
        subjects = self.subjects if tenant in (None, self.settings.namespace) else Subjects(tenant or "")
        data = encode(EventBatch(session_id=session_id, agent_id=agent_id, events=events))
        headers = {"Nats-Msg-Id": f"{session_id}:{agent_id}:{events[0].seq}"}
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                await self.js.publish(subjects.events(session_id), data, timeout=PUBLISH_TIMEOUT_S,
                                      headers=headers)
                self.batches += 1
                return
            except Exception as exc:  # noqa: BLE001 - any bus failure: retry, then fail the stream
                self.log.warning("bes.publish_retry", session=session_id, attempt=attempt + 1, error=repr(exc))
                if attempt + 1 < PUBLISH_ATTEMPTS:  # no pause after the last: fail the stream at once
                    await asyncio.sleep(_pause(attempt))
        raise RuntimeError(f"could not publish the events of session {session_id} to the bus")

    async def prepare(self, stack: AsyncExitStack) -> None:
        self.gate = Gate(self.redis, self.keys, namespace=self.settings.namespace, tenants=self.settings.tenant_list,
                         host=self.settings.http_host, token=self.settings.http_token or "")
        await self.gate.check_bind()  # before listening: beyond loopback only with keys or a token
        # No SO_REUSEPORT (grpc's default): a second endpoint on a taken port must fail, not silently
        # share it and split the builds between two stacks.
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(options=opts)
        publish_build_event_pb2_grpc.add_PublishBuildEventServicer_to_server(_Servicer(self), server)
        try:
            self.bound_port = server.add_insecure_port(f"{self.settings.http_host}:{self.port}")
        except RuntimeError:  # grpcio's way of saying the bind failed (taken port, bad address)
            self.bound_port = 0
        if not self.bound_port:
            raise OSError(f"cannot listen on {self.settings.http_host}:{self.port} for the BES endpoint "
                          "(BUILDER_TELEMETRY_BES_PORT): the port is taken or the address is not this machine's")
        await server.start()
        self.server = server
        stack.push_async_callback(server.stop, 5.0)  # streams in flight get 5 s to finish

    async def started_fields(self) -> dict[str, Any]:
        return {"bes": self.url}
