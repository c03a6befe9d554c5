"""Recorder service: keep the full event stream of every session flagged for recording.

It reads the events stream through its own durable consumer (``recorder``): the
stream has limits retention, so the collectors' consumer and this one each see
every batch.  Whether a session is to be recorded is said by its
``BuildStarted.record``, but other agents' events of the session can arrive
before it.  So a batch of a session whose flag is not yet known is *held*, not
acknowledged, for up to ``hold_s``; the flag, once seen, is written to Redis so
every recorder replica learns it.  Flagged batches are written to the
recording store (one file per batch, named by agent and first seq, so a
redelivery rewrites the same file) and only then acknowledged; unflagged ones
are acknowledged and dropped; held batches whose session never shows its
BuildStarted within ``hold_s`` are dropped too (counted).  A crash loses
nothing: unacknowledged batches come back.

A session's batch files are compacted into one log a little after its
BuildFinished; retention and the size cap are applied hourly.

It also answers requests about the recordings in its store (``api.py``: list, describe, events,
diff; answered by ``queries.py``), so the web service can serve them without a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from typing import Any

from buildtel.shared.bus import MAX_DELIVER
from buildtel.shared.codec import decode_batch
from buildtel.shared.keys import Keys
from buildtel.shared.protocol import BuildFinished, BuildStarted, EventBatch
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.redaction import redact_batch
from buildtel.shared.rediscluster import mget_any
from buildtel.shared.service import TOO_LARGE, BusService, Consumer, Endpoint, ServiceError, Worker
from buildtel.shared.settings import Settings
from buildtel.shared.validate import Rejected, check_batch

FETCH_BATCH = 256
SWEEP_INTERVAL_S = 0.2
FLAG_TTL_S = 8 * 86400  # outlives the events stream's 7-day max age
FLAG_CACHE = 100_000
MAX_HELD = 20_000  # batches held unacknowledged at once (bounded by max_ack_pending too)
GC_INTERVAL_S = 3600.0
COMPACT_DELAY_S = 5.0
_REPLY_OVERHEAD = 4096  # bytes of a NATS reply that are not its body (headers)
SAVE_RETRY_S = 5.0  # a batch that could not be written comes back after this
DURABLE = "recorder"


def flag_key(ns: str, sid: str) -> str:
    """Redis string "1"/"0": whether the session asked to be recorded (see buildtel.shared.keys)."""
    return Keys(ns).recorder_flag(sid)


class RecorderService(BusService):
    name = "recorder"
    description = "Builder Telemetry recordings: keeps flagged sessions' event streams and answers about them"

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *, hold_s: float = 60.0,
                 store: RecordingStore | None = None, metrics_port: int | None = None) -> None:
        super().__init__(settings, nats_url, redis_url, metrics_port=metrics_port)
        self.hold_s = hold_s
        self.store = store or RecordingStore.from_settings(settings)
        self._flags: OrderedDict[str, bool] = OrderedDict()
        self._held: dict[str, list[tuple[Any, EventBatch, float]]] = {}
        self._compact_at: dict[str, float] = {}
        self._last_gc = 0.0
        # Counters for tests and /metrics.
        self.batches_in = 0
        self.events_persisted = 0
        self.events_ignored = 0
        self.events_dropped_unflagged = 0
        self.batches_invalid = 0  # refused batches, left to the collector's dead letter

    # -- declarations (shared/service.py) -------------------------------------------------------
    def consumers(self) -> list[Consumer]:
        # Its own durable on the events stream (limits retention: the collectors read it too).  A
        # batch that keeps failing here (a disk error on it, a recorder dying on it) is parked on
        # NS.deadletter.recorder once the server gives up on it.
        return [Consumer(stream=self.subjects.events_stream, subject=self.subjects.events_all, durable=DURABLE,
                         handler=self._handle, batch=True, fetch=FETCH_BATCH,
                         ack_wait_s=self.hold_s + 30.0,  # held batches must not be redelivered while held
                         max_ack_pending=MAX_HELD * 2, max_deliver=MAX_DELIVER,
                         nak_delay=lambda _delivered: SAVE_RETRY_S)]

    def workers(self) -> list[Worker]:
        return [Worker("sweep", self._sweep)]

    def endpoints(self) -> list[Endpoint]:
        from functools import partial

        from buildtel.services.recorder.api import ENDPOINTS, endpoint_subject

        return [Endpoint(ep, endpoint_subject(self.subjects, ep), partial(self._api, ep)) for ep in ENDPOINTS]

    async def _api(self, endpoint: str, body: bytes) -> bytes:
        from buildtel.services.recorder.queries import answer

        data = await asyncio.to_thread(answer, self.store, endpoint, body)  # file reads: off the loop
        budget = max(1024, int(self.nc.max_payload) - _REPLY_OVERHEAD)
        if len(data) > budget:
            raise ServiceError(TOO_LARGE, f"the {endpoint} reply is {len(data)} bytes, more than one NATS message "
                                          f"({budget}) holds: ask for fewer (limit)")
        return data

    async def prepare(self, stack: contextlib.AsyncExitStack) -> None:
        # Held batches stay unacknowledged on stop (after the consume loop ended): the next
        # recorder gets them again.
        stack.callback(self._held.clear)

    def counters(self) -> dict[str, float]:
        return {"batches_in_total": self.batches_in, "events_persisted_total": self.events_persisted,
                "events_ignored_total": self.events_ignored, "batches_invalid_total": self.batches_invalid}

    async def started_fields(self) -> dict[str, Any]:
        return {"store": str(self.store.root)}

    def stopped_fields(self) -> dict[str, Any]:
        return {"persisted": self.events_persisted, "ignored": self.events_ignored}

    # -- flags ----------------------------------------------------------------------------------
    def _remember(self, sid: str, flag: bool) -> None:
        self._flags[sid] = flag
        self._flags.move_to_end(sid)
        while len(self._flags) > FLAG_CACHE:
            self._flags.popitem(last=False)

    async def _lookup(self, sids: list[str]) -> None:
        unknown = [s for s in sids if s not in self._flags]
        if not unknown:
            return
        # Flags of many sessions: one MGET, or one per slot on a Redis Cluster.
        values = await mget_any(self.redis, [flag_key(self.settings.namespace, s) for s in unknown])
        for sid, v in zip(unknown, values, strict=True):
            if v is not None:
                self._remember(sid, v == b"1")

    # -- consuming ------------------------------------------------------------------------------
    async def _handle(self, msgs: list[Any]) -> None:
        decoded: list[tuple[Any, EventBatch]] = []
        now = time.time()
        for msg in msgs:
            try:
                batch = decode_batch(msg.data)
                check_batch(batch, now)
            except Exception as exc:  # noqa: BLE001 - any decode or bound failure is bad input
                self._invalid(msg, exc)
                await msg.ack()
                continue
            self.batches_in += 1
            if not batch.events:
                await msg.ack()
                continue
            decoded.append((msg, batch))
        # Flags first, from every BuildStarted of this fetch, so a session's earlier
        # batches in the same fetch are decided too.
        pipe = self.redis.pipeline(transaction=False)
        for _, batch in decoded:
            for ev in batch.events:
                if isinstance(ev, BuildStarted):
                    self._remember(batch.session_id, ev.record)
                    pipe.set(flag_key(self.settings.namespace, batch.session_id), b"1" if ev.record else b"0",
                             ex=FLAG_TTL_S)
        if len(pipe):
            await pipe.execute()
        await self._lookup(sorted({b.session_id for _, b in decoded}))
        now = time.monotonic()
        for msg, batch in decoded:
            flag = self._flags.get(batch.session_id)
            if flag is None:
                self._held.setdefault(batch.session_id, []).append((msg, batch, now))
            else:
                await self._decide(msg, batch, flag)
        await self._bound_held()

    async def _decide(self, msg: Any, batch: EventBatch, flag: bool) -> None:
        if flag:
            first = min(ev.seq for ev in batch.events)
            # File IO off the event loop; acknowledged only once the batch is on disk.
            try:
                # Any agent's BuildStarted is redacted again before it is stored (docs/protocol.md).
                data = redact_batch(batch, msg.data)
                await asyncio.to_thread(self.store.save_batch, batch.session_id, batch.agent_id, first, data)
            except OSError as exc:  # disk full, permissions: retried, then dead-lettered (max_deliver)
                error = f"{type(exc).__name__}: {exc}"
                self.log.error("recorder.save_failed", session_id=batch.session_id, error=error,
                               delivery=msg.metadata.num_delivered)
                await self.retry_later(self.consumers()[0], msg, error)
                return
            self.events_persisted += len(batch.events)
            if any(isinstance(ev, BuildFinished) for ev in batch.events):
                self._compact_at[batch.session_id] = time.monotonic() + self.settings.finish_grace_s + COMPACT_DELAY_S
        else:
            self.events_ignored += len(batch.events)
        await msg.ack()

    async def _bound_held(self) -> None:
        while sum(len(v) for v in self._held.values()) > MAX_HELD:
            oldest = min(self._held, key=lambda s: self._held[s][0][2])
            await self._drop(oldest, "too many batches held")

    async def _drop(self, sid: str, why: str) -> None:
        items = self._held.pop(sid, [])
        for msg, batch, _ in items:
            self.events_dropped_unflagged += len(batch.events)
            with contextlib.suppress(Exception):
                await msg.ack()
        self.log.warning("recorder.dropped_unknown_session", session_id=sid, batches=len(items), reason=why)

    def _invalid(self, msg: Any, exc: Exception) -> None:
        """A batch the collector refuses too: the collector reads the same stream and dead-letters
        it (once, with the reason), so here it is only counted and logged, never kept."""
        self.batches_invalid += 1
        code = exc.code if isinstance(exc, Rejected) else "undecodable"
        self.log.info("recorder.invalid_batch", subject=msg.subject, code=code, reason=str(exc)[:300],
                 size=len(msg.data), dead_letter="collector")

    # -- held batches, compaction, retention ----------------------------------------------------
    async def _sweep(self) -> None:
        while not await self.idle(SWEEP_INTERVAL_S):
            try:
                await self.sweep_once()
            except Exception as exc:  # noqa: BLE001 - Redis/disk blips: next sweep retries
                self.log.warning("recorder.sweep_failed", error=repr(exc))
                await asyncio.sleep(0.5)

    async def sweep_once(self) -> None:
        now = time.monotonic()
        if self._held:
            # Another replica may have seen the session's BuildStarted meanwhile.
            await self._lookup(list(self._held))
            for sid in list(self._held):
                flag = self._flags.get(sid)
                if flag is not None:
                    for msg, batch, _ in self._held.pop(sid):
                        await self._decide(msg, batch, flag)
                elif now - self._held[sid][0][2] > self.hold_s:
                    await self._drop(sid, f"no BuildStarted within {self.hold_s:g}s")
        for sid, due in list(self._compact_at.items()):
            if due <= now:
                del self._compact_at[sid]
                await asyncio.to_thread(self.store.compact_events, sid)
        if now - self._last_gc > GC_INTERVAL_S:
            self._last_gc = now
            result = await asyncio.to_thread(self.store.gc)
            if any(result.values()):
                self.log.info("recorder.gc", **result)
