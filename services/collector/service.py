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

The consume loop, dead letters, the max-deliveries advisory, lifecycle and /metrics are the
service skeleton's (``shared/service.py``); this module declares them and holds the handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextlib import AsyncExitStack
from typing import Any

from buildtel.services.collector import fold, lua
from buildtel.services.collector.completeness import completeness
from buildtel.shared import keymigrate
from buildtel.shared.bigmsg import publish_session
from buildtel.shared.bus import MAX_DELIVER
from buildtel.shared.codec import MAX_SESSION_BYTES, decode_batch_raw, encode
from buildtel.shared.failrecord import unify
from buildtel.shared.keys import SHARDS
from buildtel.shared.logs import get_logger
from buildtel.shared.partitions import publish_subject
from buildtel.shared.protocol import BuildStarted, EventBatch, is_session_id, session_started
from buildtel.shared.redaction import redact_batch
from buildtel.shared.rediscluster import is_noscript, load_scripts
from buildtel.shared.service import BusService, Consumer, Worker
from buildtel.shared.settings import Settings, SettingsError
from buildtel.shared.validate import Rejected, check_envelope, refused_events

log = get_logger("collector")

FETCH_BATCH = 256
# Each batch of a fetch is folded a step later than the one before it, in stream order.  A session
# is due for completion at the time its BuildFinished was folded (+ the grace): with one time for a
# whole fetch, builds finished one after the other but fetched together (a busy collector) tied and
# were completed in session-id order, a shuffle the analyzer then folded as if it were the builds'
# order (a demo regression went unseen next to a CPU hog).  2.56 ms for a fetch of 256.
ORDER_STEP_S = 1e-5
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


class CollectorService(BusService):
    name = "collector"

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *, metrics_port: int | None = None) -> None:
        super().__init__(settings, nats_url, redis_url, metrics_port=metrics_port)
        self._wake_sweeper = asyncio.Event()
        # One consumer, whole fetches.  ack_wait is short: folding is idempotent, so a slow
        # collector's batch redelivered to another costs nothing, while a crashed collector's
        # batches wait out this long.  A batch that keeps failing is dead-lettered by _failed()
        # on its MAX_DELIVER-th delivery; one that never gets that far (a collector dying on it)
        # by the server's advisory, which also marks its session as having lost a batch.
        self._events = Consumer(
            stream=self.subjects.events_stream, subject=self.subjects.events_all, durable="collector",
            handler=self._fold, batch=True, what="fold", fetch=FETCH_BATCH, fetch_timeout_s=0.5,
            ack_wait_s=ACK_WAIT_S, max_ack_pending=20_000, max_deliver=MAX_DELIVER, poison_after=MAX_DELIVER,
            poison_reason="fold failed on each of {delivered} deliveries: {error}",
            nak_delay=lambda delivered: NAK_DELAY_S * delivered,  # module global read late: tests shorten it
            lost=lambda subject, reason: self._record_undecodable(subject, f"batch dead-lettered: {reason}",
                                                                  time.time()))
        # Counters for /metrics and tests (dead_letters and rejected, by cause, are the skeleton's).
        self.events_in = 0
        self.batches_in = 0
        self.sessions_completed = 0
        self.sessions_started = 0  # SessionStarted announcements published (duplicates included)
        self.announce_failures = 0
        self.fold_failures = 0
        self.late_events = 0
        self.events_refused = 0  # events dropped from batches whose other events were kept
        self.sessions_incomplete = 0

    # -- declarations (shared/service.py) -------------------------------------------------------
    def consumers(self) -> list[Consumer]:
        return [self._events]

    def workers(self) -> list[Worker]:
        return [Worker("sweep", self._sweep)]

    async def prepare(self, stack: AsyncExitStack) -> None:
        self._apply = self.redis.register_script(lua.APPLY)
        self._claim = self.redis.register_script(lua.CLAIM)
        self._retire = self.redis.register_script(lua.RETIRE)
        self._lost_batch = self.redis.register_script(lua.LOST_BATCH)
        await load_scripts(self.redis, self._apply)  # a cluster pipeline does not load it itself
        await keymigrate.run("collector", keymigrate.migrate_collector(self.redis, self.keys))  # pre-tag keys

    def _failure_rules(self) -> tuple[Any, ...]:
        """The farm's failure-class rules; a file that became unusable is logged and the built-in
        rules alone are used (failures are still classified; the log line says which file)."""
        try:
            return self.settings.failure_rule_table()
        except SettingsError as exc:
            log.warning("failure_rules.unusable", error=str(exc))
            return ()

    def counters(self) -> dict[str, float]:
        return {"events_in_total": self.events_in, "batches_in_total": self.batches_in,
                "sessions_completed_total": self.sessions_completed, "late_events_total": self.late_events,
                "fold_failures_total": self.fold_failures, "events_refused_total": self.events_refused,
                "sessions_incomplete_total": self.sessions_incomplete,
                "sessions_started_total": self.sessions_started, "announce_failures_total": self.announce_failures}

    async def started_fields(self) -> dict[str, Any]:
        return {"stream": self.subjects.events_stream}

    def stopped_fields(self) -> dict[str, Any]:
        return {"events": self.events_in, "sessions": self.sessions_completed}

    # -- folding ---------------------------------------------------------------------------
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
        events = placed = 0  # placed: batches of this fetch folded in earlier rounds
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
                await self.dead_letter(msg, exc.reason, code=exc.code)
                continue
            except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
                reason = f"undecodable event batch: {exc}"
                await self._record_undecodable(msg.subject, reason, now)
                await self.dead_letter(msg, reason, code="undecodable")
                continue
            if not batch.events:
                await msg.ack()
                continue
            if work and events + len(batch.events) > FOLD_ROUND_EVENTS:
                await self._fold_round(work, now + placed * ORDER_STEP_S)
                placed += len(work)
                work, events = [], 0
            # Events that break a bound of their own are dropped and recorded as lost; the others
            # of the batch are folded (docs/protocol.md "Limits on a batch").
            work.append((msg, batch, raws, refused_events(batch, now)))
            events += len(batch.events)
        if work:
            await self._fold_round(work, now + placed * ORDER_STEP_S)

    async def _fold_round(self, work: list[tuple[Any, Any, list[Any], dict[int, Rejected]]], now: float) -> None:
        """Fold each batch in script calls of FOLD_CHUNK_EVENTS; ack the batches that folded, and
        hand the ones that failed to :meth:`_failed` (the others in the round are unaffected).
        The n-th batch is folded at ``now + n * ORDER_STEP_S``: see ORDER_STEP_S."""
        pipe = self.redis.pipeline(transaction=False)
        calls: list[int] = []  # index in work of each script call
        k = self.keys
        for n, (msg, batch, raws, refused) in enumerate(work):
            sid, agent = batch.session_id, batch.agent_id
            at = repr(now + n * ORDER_STEP_S)
            notes = {i: (r.code, r.reason) for i, r in refused.items()}
            # Any agent's BuildStarted is redacted again before it is stored (docs/protocol.md);
            # only a batch that held a secret is re-encoded (and its new bytes sliced again).
            kept = redact_batch(batch, msg.data)
            if kept is not msg.data:
                raws = fold.raw_events(kept)
            for payload in fold.ops_payloads(raws, batch.events, FOLD_CHUNK_EVENTS, notes):
                await self._apply(
                    keys=[k.session_meta(sid), k.session_fragments(sid), k.session_seen(sid, agent),
                          k.active_of(sid), k.finishing_of(sid), k.completed(sid)],
                    args=[at, agent, sid, payload, repr(self.settings.finish_grace_s)],
                    client=pipe,
                )
                calls.append(n)
        try:
            results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - Redis unreachable or timed out: every batch failed
            results = [exc] * len(calls)
        if any(isinstance(r, BaseException) and is_noscript(r) for r in results):
            # A cluster node restarted without its scripts: load again; these batches come back.
            with contextlib.suppress(Exception):
                await load_scripts(self.redis, self._apply)
        errors: dict[int, BaseException] = {}
        new = [0] * len(work)
        late = [False] * len(work)
        announce = [False] * len(work)
        finished_any = False
        for n, res in zip(calls, results, strict=True):
            if isinstance(res, BaseException):
                errors.setdefault(n, res)
                continue
            folded, finished, was_late, first_start = res
            new[n] += int(folded)
            late[n] |= bool(was_late)
            announce[n] |= bool(first_start)
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
            if announce[n]:
                await self._announce(batch)
            acks.append(msg.ack())
        # Ack only now that Redis holds the fold: a crash before this line means redelivery,
        # which the seen-bitmaps turn into a no-op.
        await asyncio.gather(*acks)
        for msg, batch, refused in partly:
            await self._dead_letter_partly(msg, batch, refused)
        if finished_any:
            self._wake_sweeper.set()

    async def _announce(self, batch: EventBatch) -> None:
        """Publish the session's SessionStarted (before the batch is acked, so a crash re-announces:
        ``Nats-Msg-Id`` makes that, and several collectors, one message).  A failure is logged and
        counted, never a reason to refold: the session itself is unaffected."""
        ev = next((e for e in batch.events if isinstance(e, BuildStarted)), None)
        if ev is None:
            return
        try:
            await self.js.publish(self.subjects.sessions_started, encode(session_started(ev)),
                                  headers={"Nats-Msg-Id": f"{ev.session_id}.started"}, timeout=5.0)
            self.sessions_started += 1
        except Exception as exc:  # noqa: BLE001 - NATS away, or a stream without the subject
            self.announce_failures += 1
            log.error("collector.announce_failed", session_id=ev.session_id, error=f"{type(exc).__name__}: {exc}")

    async def _failed(self, msg: Any, error: str) -> None:
        """A batch whose fold failed (the others of its round are unaffected): NAKed to come back
        later; on its MAX_DELIVER-th delivery dead-lettered with the error (code ``poison``), its
        session first marked as having lost a batch, so it is never stored as whole."""
        self.fold_failures += 1
        meta = msg.metadata
        log.error("collector.fold_failed", subject=msg.subject, error=error[:300], delivery=meta.num_delivered,
                  stream_seq=meta.sequence.stream)
        await self.retry_later(self._events, msg, error, on_poison=lambda: self._record_undecodable(
            msg.subject, f"batch dead-lettered (poison): {error}", time.time()))

    async def _dead_letter_partly(self, msg: Any, batch: EventBatch, refused: dict[int, Rejected]) -> None:
        """A batch whose good events were folded: the whole original goes to the dead letters
        (operators see the bad input), under the first refused event's code, naming what was kept."""
        first = refused[min(refused)]
        kept = len(batch.events) - len(refused)
        self.events_refused += len(refused)
        await self.dead_letter(
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
                                        k.active_of(sid), k.finishing_of(sid), k.completed(sid)],
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
            await self._lost_batch(keys=[k.session_meta(sid), k.active_of(sid), k.completed(sid)],
                                   args=[repr(now), sid, reason[:fold.REASON_CHARS]])
        except Exception as exc:  # noqa: BLE001 - the dead letter still goes out; say what is unrecorded
            log.error("collector.lost_not_recorded", session_id=sid, error=f"{type(exc).__name__}: {exc}")

    # -- completion ------------------------------------------------------------------------
    async def _sweep(self) -> None:
        while not await self.idle(SWEEP_INTERVAL_S, self._wake_sweeper):
            try:
                await self.sweep_once()
            except Exception as exc:  # noqa: BLE001 - Redis/NATS blips: next sweep retries
                log.warning("collector.sweep_failed", error=repr(exc))
                await asyncio.sleep(0.5)

    async def sweep_once(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        k = self.keys
        done = 0
        # Every shard's sets in one round trip (shared/keys.py: a shard's sets live in its slot).
        pipe = self.redis.pipeline(transaction=False)
        for n in range(SHARDS):
            pipe.zrange(k.finishing(n), 0, -1, withscores=True)
            pipe.zrangebyscore(k.active(n), "-inf", now - self.settings.session_timeout_s, withscores=True)
        found = await pipe.execute()
        # Completed in due order over all shards, as one sorted set gave them: the analyzer folds
        # sessions in the order they complete, and builds finished one after the other must reach
        # it in that order (shuffled by shard under load, a regression's first bad builds came late).
        finishing = sorted((one for per in found[0::2] for one in per), key=lambda x: (x[1], x[0]))
        stale = [sid for sid, _ in sorted((one for per in found[1::2] for one in per), key=lambda x: (x[1], x[0]))]
        for raw_sid, due in finishing:
            sid = raw_sid.decode()
            meta = await self.redis.hgetall(k.session_meta(sid))
            fin = fold.finished_event(meta)  # decoded once per sweep, handed to each check
            if fold.is_ready(meta, fin):
                # Every event it expects is folded, so this read is its final state (anything
                # later is a redelivered duplicate, a no-op): completed without reading it again.
                done += await self._complete(sid, now, meta, fin)
            elif due <= now:
                last = float(meta.get(b"last", b"0") or 0)
                if fold.missing_events(meta, fin) and now - last < self.settings.gap_wait_s:
                    continue  # known events may still come (redeliveries): wait, boundedly
                done += await self._complete(sid, now)
        for raw_sid in stale:
            sid = raw_sid.decode()
            if await self.redis.zscore(k.finishing_of(sid), sid) is None:
                done += await self._complete(sid, now)
        return done

    def _shrink(self, session: Any, size: int) -> bytes:
        """Fit a session over the size bound of any session (MAX_SESSION_BYTES; smaller ones travel
        through the object store, shared/bigmsg.py) rather than lose it: drop phases and
        dependencies first, then the shortest targets (totals keep the full figures)."""
        limit = MAX_SESSION_BYTES - 4096
        slim = fold.without_detail(session)
        data = encode(slim)
        if len(data) > limit:
            keep = max(1, int(len(slim.targets) * limit / len(data) * 0.9))
            slim = fold.longest_targets(slim, keep)
            data = encode(slim)
        log.error("session.truncated", session_id=session.id, bytes=size, max_bytes=MAX_SESSION_BYTES,
                  targets_kept=len(slim.targets), targets=len(session.targets))
        return data

    async def _complete(self, sid: str, now: float, meta: dict[bytes, bytes] | None = None,
                        fin: Any = fold.UNREAD) -> int:
        """Claim, fold and publish one session, then retire its hot state.  ``meta`` (and its
        decoded ``fin``): the session's meta hash as the sweep read it, when that read is final;
        otherwise it is read here, after the claim."""
        k = self.keys
        if not await self._claim(keys=[k.session_lock(sid)], args=[self.owner, LEASE_MS]):
            return 0
        pipe = self.redis.pipeline(transaction=False)
        if meta is None:
            pipe.hgetall(k.session_meta(sid))
            pipe.hgetall(k.session_fragments(sid))
            meta, frags = await pipe.execute()
            fin = fold.UNREAD
            agents = list(fold.agent_counts(meta))
            bitmaps = await self.redis.mget([k.session_seen(sid, a) for a in agents]) if agents else []
        else:  # fragments and seen bitmaps in one round trip
            agents = list(fold.agent_counts(meta))
            pipe.hgetall(k.session_fragments(sid))
            for a in agents:  # GETs, not MGET: a Redis Cluster pipeline refuses MGET
                pipe.get(k.session_seen(sid, a))
            frags, *bitmaps = await pipe.execute()
        fragments = [frags[f] for f in sorted(frags)]  # a fixed order, whatever Redis returns
        if not meta:
            await self.redis.zrem(k.finishing_of(sid), sid)
            await self.redis.zrem(k.active_of(sid), sid)
            return 0
        if fin is fold.UNREAD:
            fin = fold.finished_event(meta)
        record = completeness(meta, {a: b or b"" for a, b in zip(agents, bitmaps, strict=True)}, fin,
                              gap_wait_s=self.settings.gap_wait_s)
        session = fold.build_session(sid, meta, fragments, now=now, completeness=record, finished=fin)
        session = unify(session, self._failure_rules())  # one classified record per failed target
        data = encode(session)
        if len(data) > MAX_SESSION_BYTES:
            data = self._shrink(session, len(data))
        # One message, or (over one message's size) the object store and a reference to it.
        await publish_session(self.js, self.nc, self.subjects, data, msg_id=sid, timeout=10.0,
                              subject=publish_subject(self.subjects, sid, self.settings.storage_partitions))
        await self._retire(
            keys=[k.completed(sid), k.active_of(sid), k.finishing_of(sid), k.session_meta(sid),
                  k.session_fragments(sid), k.session_lock(sid)]
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
