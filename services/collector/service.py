"""Collector service: NATS wiring around the pure fold (``fold.py``) and the Lua scripts.

Work split: every collector pulls from ONE durable JetStream consumer
(``collector``) on the events stream, so each batch goes to one collector at a
time; folding is an atomic, idempotent Redis script, so it does not matter which
collector gets which batch, or whether a batch is delivered twice (after a
crash, before its ack).  A batch is acknowledged only after Redis has folded it.

Completion: a sweeper in every collector looks at finished sessions (ready or
past their grace period) and inactive ones (abandoned); it takes a lease on the
session, publishes the folded ``BuildSession`` to the sessions stream with
``Nats-Msg-Id`` = session id (JetStream drops a second publish), then retires
the hot state.  A collector dying half-way leaves the lease to expire and
another collector completes the session; storage is idempotent by id too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import defaultdict
from typing import Any

from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.collector import fold, lua
from shared import metrics as metrics_http
from shared.bus import close_nats, connect_nats, connect_redis, ensure_streams, publish_dead_letter
from shared.codec import decode_batch, encode
from shared.keys import Keys
from shared.logs import get_logger
from shared.redaction import redact_batch
from shared.runner import finish_tasks
from shared.settings import Settings
from shared.subjects import Subjects

log = get_logger("collector")

FETCH_BATCH = 256
LEASE_MS = 15_000
ACK_WAIT_S = 5.0
DONE_TTL_S = 24 * 3600
SWEEP_INTERVAL_S = 0.1


class CollectorService:
    name = "collector"

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *, metrics_port: int | None = None) -> None:
        self.settings = settings
        self.metrics_port = metrics_port  # /metrics + /healthz (shared/metrics.py); None: none
        self.nats_url = nats_url
        self.redis_url = redis_url
        self.subjects = Subjects(settings.namespace)
        self.keys = Keys(settings.namespace)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.nc: Any = None
        self.redis: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._wake_sweeper = asyncio.Event()
        self._stopped = False
        # Counters for /metrics and tests.
        self.events_in = 0
        self.batches_in = 0
        self.sessions_completed = 0
        self.dead_letters = 0
        self.late_events = 0

    async def start(self) -> None:
        self.nc = await connect_nats(self.settings, self.nats_url, name=f"buildtel-collector-{self.owner}")
        self.redis = connect_redis(self.redis_url)
        self.js = self.nc.jetstream()
        await ensure_streams(self.js, self.subjects)
        self._apply = self.redis.register_script(lua.APPLY)
        self._claim = self.redis.register_script(lua.CLAIM)
        self._retire = self.redis.register_script(lua.RETIRE)
        self.sub = await self.js.pull_subscribe(
            self.subjects.events_all,
            durable="collector",
            stream=self.subjects.events_stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                # Short: folding is idempotent, so a slow collector's batch redelivered to another
                # costs nothing, while a crashed collector's batches wait out this long.
                ack_wait=ACK_WAIT_S,
                max_ack_pending=20_000,
                max_deliver=-1,
            ),
        )
        self._tasks = [
            asyncio.create_task(self._consume(), name="collector.consume"),
            asyncio.create_task(self._sweep(), name="collector.sweep"),
        ]
        await metrics_http.attach(self, self.settings, port=self.metrics_port)
        log.info("collector.started", owner=self.owner, stream=self.subjects.events_stream)

    async def stop(self) -> None:
        """Stop taking work, let the current batch finish (bounded), then close. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await metrics_http.detach(self)
        self._stopping.set()
        self._wake_sweeper.set()
        await finish_tasks(self._tasks)
        await close_nats(self.nc, [getattr(self, "sub", None)])
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        log.info("collector.stopped", events=self.events_in, sessions=self.sessions_completed)

    async def metrics(self) -> dict[str, float]:
        """Counters for /metrics (shared/metrics.py)."""
        return {"events_in_total": self.events_in, "batches_in_total": self.batches_in,
                "sessions_completed_total": self.sessions_completed, "dead_letters_total": self.dead_letters,
                "late_events_total": self.late_events,
                "consumer_lag": await metrics_http.consumer_lag(self.js, self.subjects.events_stream, "collector")}

    # -- folding ---------------------------------------------------------------------------
    async def _consume(self) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await self.sub.fetch(FETCH_BATCH, timeout=0.5)
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            except Exception as exc:  # noqa: BLE001 - connection blips: wait and fetch again
                if self._stopping.is_set():
                    return
                log.warning("collector.fetch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)
                continue
            try:
                await self._fold(msgs)
            except Exception as exc:  # noqa: BLE001 - unacked messages are redelivered later
                log.error("collector.fold_failed", error=f"{type(exc).__name__}: {exc}", messages=len(msgs))
                await asyncio.sleep(0.5)

    async def _fold(self, msgs: list[Any]) -> None:
        groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
        good: list[Any] = []
        for msg in msgs:
            try:
                batch = decode_batch(msg.data)
                # Any agent's BuildStarted is redacted again before it is stored (docs/protocol.md).
                payload, _ = fold.ops_payload(redact_batch(batch, msg.data), batch.events)
            except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
                await self._dead_letter(msg, f"undecodable event batch: {exc}")
                continue
            if not batch.events:
                await msg.ack()
                continue
            groups[(batch.session_id, batch.agent_id)].append((payload, len(batch.events)))
            good.append(msg)
        if not groups:
            return
        now = time.time()
        finished_any = False
        pipe = self.redis.pipeline(transaction=False)
        calls: list[tuple[str, str, int]] = []
        k = self.keys
        for (sid, agent), payloads in groups.items():
            for payload, count in payloads:
                await self._apply(
                    keys=[k.session_meta(sid), k.session_fragments(sid), k.session_seen(sid, agent),
                          k.active, k.finishing, k.completed(sid)],
                    args=[repr(now), agent, sid, payload, repr(self.settings.finish_grace_s)],
                    client=pipe,
                )
                calls.append((sid, agent, count))
        results = await pipe.execute()
        for (sid, agent, count), (new, finished, late) in zip(calls, results, strict=True):
            self.events_in += int(new)
            if late:
                self.late_events += count
                log.warning("session.late_events", session_id=sid, agent_id=agent, events=count)
            finished_any |= bool(finished)
        self.batches_in += len(good)
        # Ack only now that Redis holds the fold: a crash before this line means redelivery,
        # which the seen-bitmaps turn into a no-op.
        await asyncio.gather(*(m.ack() for m in good))
        if finished_any:
            self._wake_sweeper.set()

    async def _dead_letter(self, msg: Any, reason: str) -> None:
        self.dead_letters += 1
        log.warning("collector.dead_letter", subject=msg.subject, reason=reason[:300], size=len(msg.data))
        await publish_dead_letter(self.nc, self.redis, self.subjects, self.keys, service="collector",
                                  subject=msg.subject, reason=reason, data=msg.data,
                                  headers=dict(msg.headers or {}))
        await msg.ack()

    # -- completion ------------------------------------------------------------------------
    async def _sweep(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake_sweeper.wait(), SWEEP_INTERVAL_S)
            self._wake_sweeper.clear()
            if self._stopping.is_set():
                return
            try:
                await self.sweep_once()
            except Exception as exc:  # noqa: BLE001 - Redis/NATS blips: next sweep retries
                log.warning("collector.sweep_failed", error=repr(exc))
                await asyncio.sleep(0.5)

    async def sweep_once(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        k = self.keys
        done = 0
        finishing = await self.redis.zrange(k.finishing, 0, -1, withscores=True)
        for raw_sid, due in finishing:
            sid = raw_sid.decode()
            meta = await self.redis.hgetall(k.session_meta(sid))
            if fold.is_ready(meta):
                done += await self._complete(sid, now)
            elif due <= now:
                last = float(meta.get(b"last", b"0") or 0)
                if fold.missing_events(meta) and now - last < self.settings.session_timeout_s:
                    continue  # known events still to come (redeliveries): keep waiting
                done += await self._complete(sid, now)
        stale = await self.redis.zrangebyscore(k.active, "-inf", now - self.settings.session_timeout_s)
        for raw_sid in stale:
            sid = raw_sid.decode()
            if await self.redis.zscore(k.finishing, sid) is None:
                done += await self._complete(sid, now)
        return done

    def _shrink(self, session: Any, size: int) -> bytes:
        """Fit a huge session into the server's max payload rather than lose it: drop phases
        and dependencies first, then the shortest targets (totals keep the full figures)."""
        limit = self.nc.max_payload - 4096
        slim = fold.without_detail(session)
        data = encode(slim)
        if len(data) > limit:
            keep = max(1, int(len(slim.targets) * limit / len(data) * 0.9))
            slim = fold.longest_targets(slim, keep)
            data = encode(slim)
        log.error("session.truncated", session_id=session.id, bytes=size, max_payload=self.nc.max_payload,
                  targets_kept=len(slim.targets), targets=len(session.targets))
        return data

    async def _complete(self, sid: str, now: float) -> int:
        k = self.keys
        if not await self._claim(keys=[k.session_prefix(sid) + "lock"], args=[self.owner, LEASE_MS]):
            return 0
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(k.session_meta(sid))
        pipe.hgetall(k.session_fragments(sid))
        meta, frags = await pipe.execute()
        fragments = [frags[f] for f in sorted(frags)]  # a fixed order, whatever Redis returns
        if not meta:
            await self.redis.zrem(k.finishing, sid)
            await self.redis.zrem(k.active, sid)
            return 0
        session = fold.build_session(sid, meta, fragments, now=now)
        data = encode(session)
        if len(data) > self.nc.max_payload:
            data = self._shrink(session, len(data))
        await self.js.publish(self.subjects.sessions_completed, data,
                              headers={"Nats-Msg-Id": sid}, timeout=10.0)
        agents = list(fold.agent_counts(meta))
        await self._retire(
            keys=[k.completed(sid), k.active, k.finishing, k.session_meta(sid), k.session_fragments(sid),
                  k.session_prefix(sid) + "lock"]
            + [k.session_seen(sid, a) for a in agents],
            args=[sid, DONE_TTL_S],
        )
        self.sessions_completed += 1
        log.info("session.completed", session_id=sid, outcome=session.outcome, targets=len(session.targets),
                 events=session.totals.events, agents=len(agents))
        return 1
