"""The one service skeleton: every process of the stack is a small :class:`BusService` subclass.

In the manner of nats.py's ``micro.Service`` and arq's ``Worker``, a service *declares*
what it needs and the skeleton does the plumbing, the same way for all:

* :meth:`BusService.consumers` -> :class:`Consumer` declarations: one durable pull consumer
  each (explicit ack, ``max_deliver``), its max-deliveries advisory turned into a dead letter
  (``shared/bus.py``), and one pull-consume loop (fetch / timeout / retry) calling the handler
  with a whole fetch (``batch=True``) or message by message; a completed session too large for
  one message arrives as an object reference, which the loop resolves first (``shared/bigmsg.py``),
  so handlers always see the whole session;
* :meth:`BusService.streams` -> stream configs declared beside the shared three;
* :meth:`BusService.endpoints` -> :class:`Endpoint` s of one NATS micro service; a handler
  takes the request body and returns the reply, or raises :class:`ServiceError` (a typed code,
  sent as the micro error headers that ``shared/micro.py`` clients turn into exceptions);
* :meth:`BusService.workers` -> background loops (sweepers) that end when the service stops;
* counters: :meth:`BusService.counters` plus dead letters and each consumer's lag, served on
  ``/metrics`` (``shared/metrics.py``).

Every resource is pushed on one ``AsyncExitStack`` as it is made, so a start that fails
half-way closes what it opened, and ``stop()`` (idempotent) closes in reverse: workers and
consume loops first (the batch in hand finishes, bounded), then the micro service, the
subscriptions, Redis, NATS, and last what :meth:`BusService.open` opened (a store).  A service
is also an async context manager: ``async with StorageService(...) as svc`` starts and stops it.  Logs are
bound to the service name and namespace; events are ``<service>.<what>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import nats.errors
import nats.js.errors
import nats.micro
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from buildtel.shared import bigmsg
from buildtel.shared import metrics as metrics_http
from buildtel.shared.bus import (
    close_nats,
    connect_nats,
    connect_redis,
    converge_consumer_replicas,
    ensure_streams,
    note_failure,
    publish_dead_letter,
    watch_max_deliveries,
)
from buildtel.shared.bus import (
    flush as flush_nats,
)
from buildtel.shared.keys import Keys
from buildtel.shared.logs import get_logger
from buildtel.shared.runner import finish_tasks

# The declarations (typed error codes, ServiceError, Consumer, Endpoint, Worker) live in
# servicedecl.py and are re-exported here (__all__): a service imports everything from this module.
from buildtel.shared.servicedecl import (
    BAD_GATEWAY,
    BAD_REQUEST,
    INTERNAL,
    NOT_FOUND,
    TOO_LARGE,
    Consumer,
    Endpoint,
    ServiceError,
    Worker,
)
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

__all__ = [
    "BAD_GATEWAY",
    "BAD_REQUEST",
    "INTERNAL",
    "NOT_FOUND",
    "TOO_LARGE",
    "BusService",
    "Consumer",
    "Endpoint",
    "ServiceError",
    "Worker",
]


@dataclass(slots=True)
class _Running:
    decl: Consumer
    task: asyncio.Task[None] | None = None
    fetching: bool = False
    sub: Any = None


@dataclass(slots=True)
class _State:
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    consumers: list[_Running] = field(default_factory=list)
    workers: list[tuple[Worker, asyncio.Task[None]]] = field(default_factory=list)


class BusService:
    """Base of every service: subclasses set ``name`` and declare; see the module docstring."""

    name: ClassVar[str] = "service"
    api_version: ClassVar[str] = "1.0.0"
    description: ClassVar[str] = ""

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *,
                 metrics_port: int | None = None) -> None:
        self.settings = settings
        self.metrics_port = metrics_port  # /metrics + /healthz (shared/metrics.py); None: none
        self.nats_url = nats_url
        self.redis_url = redis_url
        self.subjects = Subjects(settings.namespace)
        self.keys = Keys(settings.namespace)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.log = get_logger(self.name, service=self.name, namespace=settings.namespace)
        self.nc: Any = None
        self.js: Any = None
        self.redis: Any = None
        self.micro: Any = None
        self.stopping = asyncio.Event()
        self._state: _State | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.dead_letters = 0
        self.rejected: dict[str, int] = {}  # dead letters by cause (reason code)

    # -- declarations (override) ---------------------------------------------------------------
    def streams(self) -> list[StreamConfig]:
        """Streams this service declares beside the shared events/sessions/dead-letter ones."""
        return []

    def consumers(self) -> list[Consumer]:
        return []

    def endpoints(self) -> list[Endpoint]:
        return []

    def workers(self) -> list[Worker]:
        return []

    def counters(self) -> dict[str, float]:
        """The service's own counters for /metrics (``*_total`` counters, others gauges)."""
        return {}

    async def open(self, stack: AsyncExitStack) -> None:
        """Open what must exist before the bus (a store); push its close on ``stack``."""

    async def prepare(self, stack: AsyncExitStack) -> None:
        """Connected (``nc``, ``js``, ``redis`` set, streams declared), not consuming yet."""

    async def started_fields(self) -> dict[str, Any]:
        return {}

    def stopped_fields(self) -> dict[str, Any]:
        return {}

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, declare, subscribe, serve, run; ready when it returns.  Twice: no-op."""
        if self._state is not None:
            return
        self.stopping = asyncio.Event()
        state = _State()
        try:
            await self._start(state)
        except BaseException:
            await state.stack.aclose()
            raise
        self._state = state
        await metrics_http.attach(self, self.settings, port=self.metrics_port)
        self.log.info(f"{self.name}.started", owner=self.owner, **await self.started_fields())

    async def stop(self) -> None:
        """Stop taking work, let the work in hand finish (bounded), close everything. Idempotent."""
        state, self._state = self._state, None
        if state is None:
            return
        await metrics_http.detach(self)
        await state.stack.aclose()
        self.log.info(f"{self.name}.stopped", **self.stopped_fields())

    async def __aenter__(self) -> Self:
        """``async with Service(...) as svc``: started on entry, stopped on exit (however it exits)."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _start(self, state: _State) -> None:
        stack = state.stack
        await self.open(stack)
        self.redis = connect_redis(self.redis_url)
        stack.push_async_callback(self._close_redis)  # after NATS: advisories may use it until then
        self.nc = await connect_nats(self.settings, self.nats_url, name=f"{self.settings.namespace}-{self.name}-"
                                     f"{self.owner}", role=self.name)
        subs: list[Any] = []
        stack.push_async_callback(close_nats, self.nc, subs)  # unsubscribes what is in subs
        self.js = self.nc.jetstream()
        await ensure_streams(self.js, self.subjects, extra=self.streams(),
                             partitions=self.settings.storage_partitions, replicas=self.settings.replicas)
        await self.prepare(stack)
        for decl in self.consumers():
            run = _Running(decl)
            if decl.filter_subjects:
                await self._converge_filters(decl)
            run.sub = await self.js.pull_subscribe(
                decl.subject, durable=decl.durable, stream=decl.stream,
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                      ack_wait=decl.ack_wait_s, max_ack_pending=decl.max_ack_pending,
                                      max_deliver=decl.max_deliver,
                                      filter_subjects=list(decl.filter_subjects) or None,
                                      num_replicas=self.settings.replicas))  # None: the stream's
            subs.append(run.sub)
            problem = await converge_consumer_replicas(self.js, decl.stream, decl.durable, self.settings.replicas)
            if problem:  # it still works, with fewer copies than asked: said, not hidden
                self.log.warning(f"{self.name}.consumer_replicas", stream=decl.stream, consumer=decl.durable,
                                 error=problem)
            # What the server gives up on (max_deliver) is parked on NS.deadletter.<service>.
            subs.append(await watch_max_deliveries(
                self.nc, self.redis, self.subjects, self.keys, service=self.name, stream=decl.stream,
                consumer=decl.durable, counter=self._count_advisory, lost=decl.lost))
            state.consumers.append(run)
        endpoints = self.endpoints()
        if endpoints:
            self.micro = await nats.micro.add_service(
                self.nc, name=self.subjects.service_name(self.name), version=self.api_version,
                description=self.description, metadata={"namespace": self.settings.namespace})
            stack.push_async_callback(self._stop_micro)
            for ep in endpoints:
                await self.micro.add_endpoint(name=ep.name, subject=ep.subject,
                                              handler=lambda req, ep=ep: self._serve(ep, req))
        await flush_nats(self.nc)  # the server knows the endpoints before start() says we are ready
        for run in state.consumers:
            run.task = asyncio.create_task(self._consume(run), name=f"{self.name}.consume.{run.decl.stream}")
        state.workers = [(w, asyncio.create_task(w.run(), name=f"{self.name}.{w.name}")) for w in self.workers()]
        self._tasks = [r.task for r in state.consumers if r.task] + [t for _, t in state.workers]
        stack.push_async_callback(self._stop_tasks, state)  # runs first on stop: no new work

    async def _converge_filters(self, decl: Consumer) -> None:
        """A durable made before storage was partitioned filters on the bare subject only: give it
        the declared filters (its position is kept), so partitioned sessions reach it too."""
        try:
            info = await self.js.consumer_info(decl.stream, decl.durable)
        except nats.js.errors.NotFoundError:
            return  # pull_subscribe creates it with the filters
        have = tuple(info.config.filter_subjects or ([info.config.filter_subject] if info.config.filter_subject
                                                     else []))
        if set(have) == set(decl.filter_subjects):
            return
        cfg = info.config
        cfg.filter_subject = None
        cfg.filter_subjects = list(decl.filter_subjects)
        await self.js.add_consumer(decl.stream, config=cfg)
        self.log.info(f"{self.name}.consumer_filters_updated", consumer=decl.durable, before=list(have),
                      after=list(decl.filter_subjects))

    async def _stop_tasks(self, state: _State) -> None:
        self.stopping.set()
        for run in state.consumers:
            if run.decl.cancel_idle_fetch and run.fetching and run.task is not None:
                run.task.cancel()  # idle in a fetch: nothing in flight to lose
        for w, task in state.workers:
            if w.cancel_on_stop:
                task.cancel()
        timeout = max([r.decl.stop_timeout_s for r in state.consumers] + [5.0])
        await finish_tasks(self._tasks, timeout)

    async def _stop_micro(self) -> None:
        with contextlib.suppress(Exception):
            await self.micro.stop()

    async def _close_redis(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def metrics(self) -> dict[str, float]:
        """Counters for /metrics: the service's, dead letters, and each consumer's lag."""
        out: dict[str, float] = {**self.counters(), "dead_letters_total": self.dead_letters}
        for decl in self.consumers():
            out[decl.lag_metric] = await metrics_http.consumer_lag(self.js, decl.stream, decl.durable)
        return out

    # -- consuming -----------------------------------------------------------------------------
    async def _consume(self, run: _Running) -> None:
        decl = run.decl
        while not self.stopping.is_set():
            run.fetching = True
            try:
                msgs = await run.sub.fetch(decl.fetch, timeout=decl.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):  # nats-py raises either, by path
                continue
            except nats.errors.ConnectionClosedError:
                return
            except Exception as exc:  # noqa: BLE001 - NATS away: the client reconnects, fetch again
                if self.stopping.is_set():
                    return
                self.log.warning(f"{self.name}.fetch_failed", stream=decl.stream, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)
                continue
            finally:
                run.fetching = False
            if decl.subject == self.subjects.sessions_completed:
                await self._deliver_sessions(decl, msgs)
            elif decl.batch:
                await self._handle_batch(decl, msgs)
            else:
                for msg in msgs:
                    await self._handle_one(decl, msg)
            del msgs  # do not hold a batch of payloads across the next (possibly long) fetch

    async def _handle_batch(self, decl: Consumer, msgs: list[Any]) -> None:
        try:
            await decl.handler(msgs)
        except Exception as exc:  # noqa: BLE001 - unacked messages are redelivered later
            self.log.error(f"{self.name}.{decl.what}_failed", error=f"{type(exc).__name__}: {exc}",
                           messages=len(msgs))
            await asyncio.sleep(decl.failure_pause_s or 0.5)

    async def _handle_one(self, decl: Consumer, msg: Any) -> None:
        try:
            await decl.handler(msg)
        except Exception as exc:  # noqa: BLE001 - not acked: retried, then dead-lettered
            error = f"{type(exc).__name__}: {exc}"
            self.log.error(f"{self.name}.{decl.what}_failed", subject=msg.subject, error=error)
            await self.retry_later(decl, msg, error)
            if decl.failure_pause_s:
                await asyncio.sleep(decl.failure_pause_s)

    async def _deliver_sessions(self, decl: Consumer, msgs: list[Any]) -> None:
        """Completed sessions, with every object reference resolved (``shared/bigmsg.py``): the
        handler sees each session's whole bytes in ``msg.data``.  A batch handler gets the fetch in
        parts, one large session per part at most, so a fetch of them is never all in memory."""
        part: list[Any] = []
        for msg in msgs:
            try:
                ref = bigmsg.reference(msg.headers)
            except bigmsg.ObjectUnusable as exc:
                await self.dead_letter(msg, exc.reason, code=exc.code, flush=True)
                continue
            if ref is not None:
                if part and decl.batch:
                    await self._handle_batch(decl, part)
                part = []
                if not await self._resolve(decl, msg, ref):
                    continue
            if decl.batch:
                part.append(msg)
            else:
                await self._handle_one(decl, msg)
        if part:
            await self._handle_batch(decl, part)

    async def _resolve(self, decl: Consumer, msg: Any, ref: bigmsg.Reference) -> bool:
        """Put the referenced session's bytes in ``msg.data``; False when it is not to be handled
        now (dead-lettered: the object can never be had; or left for redelivery: NATS failed)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            msg.data = await bigmsg.resolve(self.js, ref, expected_bucket=self.subjects.sessions_bucket)
        except bigmsg.ObjectUnusable as exc:
            await self.dead_letter(msg, exc.reason, code=exc.code, flush=True)
            return False
        except Exception as exc:  # noqa: BLE001 - NATS away or slow: retried like a failed handler
            error = f"fetching object {ref.bucket}/{ref.name}: {type(exc).__name__}: {exc}"
            self.log.error(f"{self.name}.object_fetch_failed", subject=msg.subject, error=error)
            await self.retry_later(decl, msg, error)
            return False
        self.log.info(f"{self.name}.object_fetched", object=f"{ref.bucket}/{ref.name}", bytes=ref.size,
                      seconds=round(loop.time() - t0, 3))
        return True

    async def retry_later(self, decl: Consumer, msg: Any, error: str,
                          on_poison: Callable[[], Awaitable[None]] | None = None) -> None:
        """A message whose handling failed: on its ``poison_after``-th delivery dead-lettered (code
        ``poison``; ``on_poison`` first), else its failure noted for the eventual advisory dead
        letter and, with ``nak_delay``, NAKed to come back after that delay."""
        try:
            meta = msg.metadata
        except Exception:  # noqa: BLE001 - not a JetStream message: nothing to redeliver
            return
        delivered = meta.num_delivered
        if decl.poison_after is not None and delivered >= decl.poison_after:
            if on_poison is not None:
                await on_poison()
            reason = decl.poison_reason.format(what=decl.what, delivered=delivered, error=error)
            await self.dead_letter(msg, reason, code="poison")
            return
        await note_failure(self.redis, self.keys, stream=decl.stream, consumer=decl.durable,
                           seq=meta.sequence.stream, reason=error)
        if decl.nak_delay is not None:
            with contextlib.suppress(Exception):
                await msg.nak(delay=decl.nak_delay(delivered))

    # -- dead letters --------------------------------------------------------------------------
    async def dead_letter(self, msg: Any, reason: str, *, code: str | None = None, ack: bool = True,
                          headers: dict[str, str] | None = None, flush: bool = False) -> None:
        """Park ``msg`` on ``NS.deadletter.<service>`` with why (and ``code``), count it, ack it.

        ``flush``: the dead letter reaches the server before the original is acked."""
        self.dead_letters += 1
        if code is not None:
            self.rejected[code] = self.rejected.get(code, 0) + 1
        self.log.warning(f"{self.name}.dead_letter", subject=msg.subject, reason=reason[:300], code=code,
                         size=len(msg.data))
        extra = {"Buildtel-Reason-Code": code} if code is not None else {}
        await publish_dead_letter(self.nc, self.redis, self.subjects, self.keys, service=self.name,
                                  subject=msg.subject, reason=reason, data=msg.data,
                                  headers={**dict(msg.headers or {}), **extra, **(headers or {})})
        if code is not None:
            with contextlib.suppress(Exception):  # per-cause count shared by every replica
                await self.redis.incr(self.keys.dead_letters(self.name, code))
        if flush:
            try:
                await flush_nats(self.nc, timeout=5)
            except Exception as exc:  # noqa: BLE001 - acking anyway: redelivery would fail identically
                self.log.warning(f"{self.name}.dead_letter_flush_failed", error=repr(exc))
        if ack:
            await msg.ack()

    async def dead_letter_many(self, bad: list[tuple[Any, str]], *, code: str | None = None) -> None:
        """:meth:`dead_letter` for a fetch's bad messages: all published, one flush (they reach the
        server before any original is acked), then every original acked."""
        for msg, reason in bad:
            await self.dead_letter(msg, reason, code=code, ack=False)
        try:
            await flush_nats(self.nc, timeout=5)
        except Exception as exc:  # noqa: BLE001 - acking anyway: redelivery would fail identically
            self.log.warning(f"{self.name}.dead_letter_flush_failed", error=repr(exc))
        for msg, _ in bad:
            await msg.ack()

    def _count_advisory(self, reason: str) -> None:
        self.dead_letters += 1
        self.rejected["max_deliver"] = self.rejected.get("max_deliver", 0) + 1
        self.log.warning(f"{self.name}.dead_letter", reason=reason[:300], code="max_deliver")

    # -- endpoints -----------------------------------------------------------------------------
    async def _serve(self, ep: Endpoint, req: Any) -> None:
        try:
            body = await ep.handler(req.data or b"")
        except ServiceError as exc:
            await req.respond_error(str(exc.code), exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - the caller gets a 500 naming it, not a timeout
            self.log.error(f"{self.name}.api_failed", endpoint=ep.name, error=repr(exc))
            await req.respond_error(str(INTERNAL), f"{type(exc).__name__}: {exc}")
            return
        await req.respond(body)

    # -- helpers for workers -------------------------------------------------------------------
    async def idle(self, seconds: float, wake: asyncio.Event | None = None) -> bool:
        """Wait ``seconds``, or less when ``wake`` is set or the service stops; True once stopping."""
        waits = [asyncio.ensure_future(self.stopping.wait())]
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if wake is not None:
            wake.clear()
        return self.stopping.is_set()
