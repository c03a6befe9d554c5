"""The deliveries in Redis, shared by every notifier replica: due times, jobs, claims, digests.

A *delivery* is ``<subscription>|<item>`` (item: an alert id, or ``digest-<day>-<hash>``).  It is

* queued once (:meth:`Queue.enqueue`: ``HSETNX`` job + ``ZADD NX`` due; a redelivered alert
  message queues nothing new);
* claimed by one replica at a time (:meth:`Queue.claim`: ``SET NX`` with a lease; the due time is
  pushed past the lease, so a replica that dies mid-delivery leaves a claim that expires and
  a due time that comes round: another replica retries);
* ended once: ``done`` after a 2xx, ``dead`` after the retry budget, ``suppressed`` when muted or
  acknowledged — the claim key then holds that word for :data:`END_TTL_S`, and a claim attempt
  that finds it drops the delivery instead of sending it again.  That marker is the exactly-once
  guarantee; ``X-Buildtel-Delivery`` covers the one gap left (a replica killed between the
  receiver's 2xx and writing ``done``: the retry carries the same id).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from buildtel.services.analyzer.alerts import Alert
from buildtel.shared.keys import Keys

END_TTL_S = 8 * 86_400  # longer than any redelivery or retry window
ENDS = (b"done", b"dead", b"suppressed")
DIGEST_TTL_S = 3 * 86_400

# Release a claim only if it is still ours (it may have expired and been taken since).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Forget a digest's schedule once its alerts are all queued, unless one arrived meanwhile.
_DIGEST_DONE = """
if redis.call('HLEN', KEYS[1]) == 0 then return redis.call('ZREM', KEYS[2], ARGV[1]) end
return 0
"""


class Job(msgspec.Struct, kw_only=True):
    sub: str
    item: str
    alerts: list[Alert]  # one alert, or a digest's
    period: str | None = None  # digest: its UTC day
    created: float
    attempts: int = 0
    last_error: str = ""


_enc = msgspec.msgpack.Encoder()
_job_dec = msgspec.msgpack.Decoder(Job)
_alert_dec = msgspec.msgpack.Decoder(Alert)


def delivery_key(sub: str, item: str) -> str:
    return f"{sub}|{item}"


def digest_period(now: float, hour: int) -> tuple[str, float]:
    """The digest an alert seen at ``now`` goes into: (its UTC day, when it is sent: the next
    ``hour``:00 UTC after ``now``)."""
    t = datetime.fromtimestamp(now, UTC)
    send = t.replace(hour=hour, minute=0, second=0, microsecond=0)
    if send <= t:
        send += timedelta(days=1)
    return send.strftime("%Y-%m-%d"), send.timestamp()


class Queue:
    def __init__(self, redis: Any, keys: Keys, owner: str) -> None:
        self.r, self.keys, self.owner = redis, keys, owner.encode()
        self._release = redis.register_script(_RELEASE)
        self._digest_done = redis.register_script(_DIGEST_DONE)

    async def enqueue(self, job: Job, due: float) -> None:
        key = delivery_key(job.sub, job.item)
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(self.keys.notifier_jobs, key, _enc.encode(job))
        pipe.zadd(self.keys.notifier_due, {key: due}, nx=True)
        await pipe.execute()

    async def due(self, now: float, limit: int) -> list[str]:
        found = await self.r.zrangebyscore(self.keys.notifier_due, "-inf", now, start=0, num=limit)
        return [m.decode() for m in found]

    async def claim(self, key: str, now: float, lease_s: float) -> Job | None:
        """The job of delivery ``key`` if this replica now holds it; None if another does, or it
        has ended (then it is dropped from the queue)."""
        ckey = self.keys.notifier_claim(key)
        if not await self.r.set(ckey, self.owner, nx=True, px=int(lease_s * 1000)):
            if await self.r.get(ckey) in ENDS:
                await self._drop(key)
            return None
        raw = await self.r.hget(self.keys.notifier_jobs, key)
        if raw is None:  # ended and dropped by another replica between our ZRANGE and SET
            await self.r.zrem(self.keys.notifier_due, key)
            await self._release(keys=[ckey], args=[self.owner])
            return None
        await self.r.zadd(self.keys.notifier_due, {key: now + lease_s}, xx=True)
        return _job_dec.decode(raw)

    async def end(self, job: Job, how: str) -> None:
        """Mark the delivery ended (``done``/``dead``/``suppressed``) for good, then drop it."""
        key = delivery_key(job.sub, job.item)
        await self.r.set(self.keys.notifier_claim(key), how.encode(), ex=END_TTL_S)
        await self._drop(key)
        await self.r.hincrby(self.keys.notifier_counts, f"{job.sub}|{how}", 1)

    async def retry(self, job: Job, at: float) -> None:
        key = delivery_key(job.sub, job.item)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.notifier_jobs, key, _enc.encode(job))
        pipe.zadd(self.keys.notifier_due, {key: at})
        await pipe.execute()
        await self._release(keys=[self.keys.notifier_claim(key)], args=[self.owner])
        await self.r.hincrby(self.keys.notifier_counts, f"{job.sub}|retried", 1)

    async def _drop(self, key: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(self.keys.notifier_due, key)
        pipe.hdel(self.keys.notifier_jobs, key)
        await pipe.execute()

    # -- daily digests -----------------------------------------------------------------------------
    async def add_to_digest(self, sub: str, alert: Alert, period: str, send_at: float) -> None:
        hkey = self.keys.notifier_digest(sub, period)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(hkey, alert.id, _enc.encode(alert))
        pipe.expire(hkey, DIGEST_TTL_S)
        pipe.zadd(self.keys.notifier_digests, {delivery_key(sub, period): send_at}, nx=True)
        await pipe.execute()

    async def due_digests(self, now: float) -> list[tuple[str, str]]:
        found = await self.r.zrangebyscore(self.keys.notifier_digests, "-inf", now)
        return [(sub, period) for sub, _, period in (m.decode().partition("|") for m in found)]

    async def queue_digest(self, sub: str, period: str, now: float) -> int:
        """Turn one due digest's alerts into one delivery; replicas doing it at once queue the same
        one (its item is a hash of the alert ids).  Returns how many alerts it holds."""
        hkey = self.keys.notifier_digest(sub, period)
        raw = await self.r.hgetall(hkey)
        if raw:
            alerts = sorted((_alert_dec.decode(v) for v in raw.values()), key=lambda a: (a.detected_at, a.id))
            ids = hashlib.sha256("\x00".join(sorted(a.id for a in alerts)).encode()).hexdigest()[:12]
            await self.enqueue(Job(sub=sub, item=f"digest-{period}-{ids}", alerts=alerts, period=period,
                                   created=now), now)
            await self.r.hdel(hkey, *raw.keys())
        await self._digest_done(keys=[hkey, self.keys.notifier_digests], args=[delivery_key(sub, period)])
        return len(raw)
