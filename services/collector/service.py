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
from typing import Any

from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from buildtel.services.collector import fold, lua
from buildtel.services.collector.completeness import completeness
from buildtel.shared import metrics as metrics_http
from buildtel.shared.bus import (
    MAX_DELIVER,
    close_nats,
    connect_nats,
    connect_redis,
    ensure_streams,
    note_failure,
    publish_dead_letter,
    watch_max_deliveries,
)
from buildtel.shared.codec import decode_batch_raw, encode
from buildtel.shared.keys import Keys
from buildtel.shared.logs import get_logger
from buildtel.shared.redaction import redact_batch
from buildtel.shared.runner import finish_tasks
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from buildtel.shared.protocol import EventBatch, is_session_id
from buildtel.shared.validate import Rejected, check_envelope, refused_events

log = get_logger("collector")

FETCH_BATCH = 256
LEASE_MS = 15_000
ACK_WAIT_S = 5.0  # docs/protocol.md "Work split among collectors" states this figure
# Events per Lua script call, and per pipeline round (acknowledged together).  A call of 2 000
# events holds Redis for ~5-10 ms; a round of 20 000 takes ~0.1 s, far inside the ack wait, and the
# batches of a fetch still waiting their turn are told "in progress" between rounds.
FOLD_CHUNK_EVENTS = 2_000
FOLD_ROUND_EVENTS = 20_000
NAK_DELAY_S = 1.0  # a batch whose fold failed comes back after this (times its delivery count)
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
        self.rejected: dict[str, int] = {}  # dead letters by cause (validate.Rejected.code, ...)
        self.fold_failures = 0
        self.late_events = 0
        self.events_refused = 0  # events dropped from batches whose other events were kept
        self.sessions_incomplete = 0

    async def start(self) -> None:
        self.nc = await connect_nats(self.settings, self.nats_url, name=f"buildtel-collector-{self.owner}", role="collector")
        self.redis = connect_redis(self.redis_url)
        self.js = self.nc.jetstream()
        await ensure_streams(self.js, self.subjects)
        self._apply = self.redis.register_script(lua.APPLY)
        self._claim = self.redis.register_script(lua.CLAIM)
        self._retire = self.redis.register_script(lua.RETIRE)
        self._lost_batch = self.redis.register_script(lua.LOST_BATCH)
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
                # A batch that keeps failing is dead-lettered by _failed() on its last delivery;
                # one that never gets that far (a collector dying on it) by the advisory below.
                max_deliver=MAX_DELIVER,
            ),
        )
        self.advisories = await watch_max_deliveries(
            self.nc, self.redis, self.subjects, self.keys, service="collector",
            stream=self.subjects.events_stream, consumer="collector", counter=self._count_advisory,
            lost=lambda subject, reason: self._record_undecodable(subject, f"batch dead-lettered: {reason}",
                                                                  time.time()))
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
        await close_nats(self.nc, [getattr(self, "sub", None), getattr(self, "advisories", None)])
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        log.info("collector.stopped", events=self.events_in, sessions=self.sessions_completed)

    async def metrics(self) -> dict[str, float]:
        """Counters for /metrics (shared/metrics.py)."""
        return {"events_in_total": self.events_in, "batches_in_total": self.batches_in,
                "sessions_completed_total": self.sessions_completed, "dead_letters_total": self.dead_letters,
                "late_events_total": self.late_events, "fold_failures_total": self.fold_failures,
                "events_refused_total": self.events_refused, "sessions_incomplete_total": self.sessions_incomplete,
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
        """Validate a fetch, dead-letter what breaks a bound, fold the rest in bounded rounds.

        A fetch of 256 capped batches is ~2.5 M events (tens of seconds of decoding and Redis
        time), longer than the ack wait; so messages are taken in rounds of FOLD_ROUND_EVENTS, and
        every ACK_WAIT_S / 3 the ones not yet acknowledged are told "in progress" (which restarts
        their ack wait) instead of being redelivered to another collector meanwhile.
        """
        loop = asyncio.get_running_loop()
        now = time.time()
        alive = loop.time()
        work: list[tuple[Any, Any, list[Any], dict[int, Rejected]]] = []
        events = 0
        for i, msg in enumerate(msgs):
            if loop.time() - alive > ACK_WAIT_S / 3:
                await asyncio.gather(*(m.in_progress() for m in msgs[i:]), *(m.in_progress() for m, *_ in work),
                                     return_exceptions=True)
                alive = loop.time()
            batch = raws = None
            try:
                # Decoded once: the typed events are validated, their raw bytes kept in Redis.
                batch, raws = decode_batch_raw(msg.data)
                check_envelope(batch)
            except Rejected as exc:
                # Refused whole (version, size): its events are lost to the session, and it says so.
                await self._record_lost(msg, batch, raws, exc, now)
                await self._dead_letter(msg, exc.reason, code=exc.code)
                continue
            except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
                reason = f"undecodable event batch: {exc}"
                await self._record_undecodable(msg.subject, reason, now)
                await self._dead_letter(msg, reason, code="undecodable")
                continue
            if not batch.events:
                await msg.ack()
                continue
            if work and events + len(batch.events) > FOLD_ROUND_EVENTS:
                await self._fold_round(work, now)
                work, events = [], 0
            # Events that break a bound of their own are dropped and recorded as lost; the others
            # of the batch are folded (docs/protocol.md "Limits on a batch").
            work.append((msg, batch, raws, refused_events(batch, now)))
            events += len(batch.events)
        if work:
            await self._fold_round(work, now)

    async def _fold_round(self, work: list[tuple[Any, Any, list[Any], dict[int, Rejected]]], now: float) -> None:
        """Fold each batch in script calls of FOLD_CHUNK_EVENTS; ack the batches that folded, and
        hand the ones that failed to :meth:`_failed` (the others in the round are unaffected)."""
        pipe = self.redis.pipeline(transaction=False)
        calls: list[int] = []  # index in work of each script call
        k = self.keys
        for n, (msg, batch, raws, refused) in enumerate(work):
            sid, agent = batch.session_id, batch.agent_id
            notes = {i: (r.code, r.reason) for i, r in refused.items()}
            # Any agent's BuildStarted is redacted again before it is stored (docs/protocol.md);
            # only a batch that held a secret is re-encoded (and its new bytes sliced again).
            kept = redact_batch(batch, msg.data)
            if kept is not msg.data:
                raws = fold.raw_events(kept)
            for payload in fold.ops_payloads(raws, batch.events, FOLD_CHUNK_EVENTS, notes):
                await self._apply(
                    keys=[k.session_meta(sid), k.session_fragments(sid), k.session_seen(sid, agent),
                          k.active, k.finishing, k.completed(sid)],
                    args=[repr(now), agent, sid, payload, repr(self.settings.finish_grace_s)],
                    client=pipe,
                )
                calls.append(n)
        try:
            results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - Redis unreachable or timed out: every batch failed
            results = [exc] * len(calls)
        errors: dict[int, BaseException] = {}
        new = [0] * len(work)
        late = [False] * len(work)
        finished_any = False
        for n, res in zip(calls, results, strict=True):
            if isinstance(res, BaseException):
                errors.setdefault(n, res)
                continue
            folded, finished, was_late = res
            new[n] += int(folded)
            late[n] |= bool(was_late)
            finished_any |= bool(finished)
        acks = []
        partly: list[tuple[Any, Any, dict[int, Rejected]]] = []
        for n, (msg, batch, _, refused) in enumerate(work):
            if n in errors:
                await self._failed(msg, f"{type(errors[n]).__name__}: {errors[n]}")
                continue
            self.events_in += new[n]
            self.batches_in += 1
            if late[n]:
                self.late_events += len(batch.events)
                log.warning("session.late_events", session_id=batch.session_id, agent_id=batch.agent_id,
                            events=len(batch.events))
            if refused:
                partly.append((msg, batch, refused))
            acks.append(msg.ack())
        # Ack only now that Redis holds the fold: a crash before this line means redelivery,
        # which the seen-bitmaps turn into a no-op.
        await asyncio.gather(*acks)
        for msg, batch, refused in partly:
            await self._dead_letter_partly(msg, batch, refused)
        if finished_any:
            self._wake_sweeper.set()

    async def _failed(self, msg: Any, error: str) -> None:
        """A batch whose fold failed: retried a few times, then dead-lettered with the error."""
        self.fold_failures += 1
        meta = msg.metadata
        delivered = meta.num_delivered
        log.error("collector.fold_failed", subject=msg.subject, error=error[:300], delivery=delivered,
                  stream_seq=meta.sequence.stream)
        if delivered >= MAX_DELIVER:
            reason = f"fold failed on each of {delivered} deliveries: {error}"
            # Its session lost these events: never stored as whole (marked without the fold that fails).
            await self._record_undecodable(msg.subject, f"batch dead-lettered (poison): {error}", time.time())
            await self._dead_letter(msg, reason, code="poison")
            return
        await note_failure(self.redis, self.keys, stream=self.subjects.events_stream, consumer="collector",
                           seq=meta.sequence.stream, reason=error)
        with contextlib.suppress(Exception):
            await msg.nak(delay=NAK_DELAY_S * delivered)

    def _count_advisory(self, reason: str) -> None:
        self.dead_letters += 1
        self.rejected["max_deliver"] = self.rejected.get("max_deliver", 0) + 1
        log.warning("collector.dead_letter", reason=reason[:300], code="max_deliver")

    async def _dead_letter(self, msg: Any, reason: str, *, code: str, ack: bool = True,
                           headers: dict[str, str] | None = None) -> None:
        self.dead_letters += 1
        self.rejected[code] = self.rejected.get(code, 0) + 1
        log.warning("collector.dead_letter", subject=msg.subject, reason=reason[:300], code=code, size=len(msg.data))
        await publish_dead_letter(self.nc, self.redis, self.subjects, self.keys, service="collector",
                                  subject=msg.subject, reason=reason, data=msg.data,
                                  headers={**dict(msg.headers or {}), "Buildtel-Reason-Code": code, **(headers or {})})
        with contextlib.suppress(Exception):  # per-cause count shared by every replica
            await self.redis.incr(self.keys.counter(f"deadletter:collector:{code}"))
        if ack:
            await msg.ack()

    async def _dead_letter_partly(self, msg: Any, batch: EventBatch, refused: dict[int, Rejected]) -> None:
        """A batch whose good events were folded: the whole original goes to the dead letters
        (operators see the bad input), under the first refused event's code, naming what was kept."""
        first = refused[min(refused)]
        kept = len(batch.events) - len(refused)
        self.events_refused += len(refused)
        await self._dead_letter(
            msg, f"{len(refused)} of {len(batch.events)} events refused, the other {kept} kept "
                 f"(session {batch.session_id}, agent {batch.agent_id}): {first.reason}",
            code=first.code, ack=False,
            headers={"Buildtel-Events-Refused": str(len(refused)), "Buildtel-Events-Kept": str(kept)})

    async def _record_lost(self, msg: Any, batch: EventBatch | None, raws: list[Any] | None, exc: Rejected,
                           now: float) -> None:
        """Record every event of a batch refused whole as lost in its session's hot state."""
        if batch is None or raws is None or not batch.events:
            return
        sid, agent, k = batch.session_id, batch.agent_id, self.keys
        note = (exc.code, f"batch refused whole: {exc.reason}")
        try:
            for payload in fold.ops_payloads(raws, batch.events, FOLD_CHUNK_EVENTS,
                                             dict.fromkeys(range(len(batch.events)), note)):
                await self._apply(keys=[k.session_meta(sid), k.session_fragments(sid), k.session_seen(sid, agent),
                                        k.active, k.finishing, k.completed(sid)],
                                  args=[repr(now), agent, sid, payload, repr(self.settings.finish_grace_s)])
        except Exception as exc2:  # noqa: BLE001 - the dead letter still goes out; say what is unrecorded
            log.error("collector.lost_not_recorded", session_id=sid, agent_id=agent, events=len(batch.events),
                      error=f"{type(exc2).__name__}: {exc2}")

    async def _record_undecodable(self, subject: str, reason: str, now: float) -> None:
        """A batch lost without being folded (unreadable, poison, or given up by the server) still
        names its session in the subject (``NS.events.<sid>``): mark that session as having lost a
        batch of unknown events."""
        sid = subject.rpartition(".")[2]
        if not is_session_id(sid):
            return
        k = self.keys
        try:
            await self._lost_batch(keys=[k.session_meta(sid), k.active, k.completed(sid)],
                                   args=[repr(now), sid, reason[:fold.REASON_CHARS]])
        except Exception as exc:  # noqa: BLE001 - the dead letter still goes out; say what is unrecorded
            log.error("collector.lost_not_recorded", session_id=sid, error=f"{type(exc).__name__}: {exc}")

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
                if fold.missing_events(meta) and now - last < self.settings.gap_wait_s:
                    continue  # known events may still come (redeliveries): wait, boundedly
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
        agents = list(fold.agent_counts(meta))
        bitmaps = await self.redis.mget([k.session_seen(sid, a) for a in agents]) if agents else []
        fin = fold.finished_event(meta)
        record = completeness(meta, {a: b or b"" for a, b in zip(agents, bitmaps, strict=True)}, fin,
                              gap_wait_s=self.settings.gap_wait_s)
        session = fold.build_session(sid, meta, fragments, now=now, completeness=record)
        data = encode(session)
        if len(data) > self.nc.max_payload:
            data = self._shrink(session, len(data))
        await self.js.publish(self.subjects.sessions_completed, data,
                              headers={"Nats-Msg-Id": sid}, timeout=10.0)
        await self._retire(
            keys=[k.completed(sid), k.active, k.finishing, k.session_meta(sid), k.session_fragments(sid),
                  k.session_prefix(sid) + "lock"]
            + [k.session_seen(sid, a) for a in agents],
            args=[sid, DONE_TTL_S],
        )
        self.sessions_completed += 1
        if not record.complete:
            self.sessions_incomplete += 1
            log.warning("session.incomplete", session_id=sid, outcome=session.outcome, reasons=record.reasons[:5])
        log.info("session.completed", session_id=sid, outcome=session.outcome, targets=len(session.targets),
                 events=session.totals.events, agents=len(agents))
        return 1
