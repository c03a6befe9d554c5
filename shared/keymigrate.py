"""Carry hot state written before the keys had hash tags (shared/keys.py) over to the tagged names.

Runs when a collector, analyzer or notifier starts on a single Redis (a previous version never ran
on a Redis Cluster: its scripts span slots), so an upgrade keeps in-flight sessions, detector
baselines and queued deliveries instead of stranding them.  Idempotent and safe for several
replicas at once: ``RENAMENX`` moves a key only if the new name is free (a key another replica moved
meanwhile is skipped), sorted-set members and hash fields are copied before their old key goes.
What it cannot place (a new name already taken) stays under the old name and is logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from buildtel.shared.keys import Keys, shard
from buildtel.shared.logs import get_logger
from buildtel.shared.rediscluster import is_cluster

log = get_logger("keymigrate")


async def _rename(r: Any, old: bytes, new: str, counts: dict[str, int]) -> None:
    try:
        moved = await r.renamenx(old, new)
    except ResponseError:  # gone meanwhile (another replica moved it)
        return
    if moved:
        counts["moved"] += 1
    else:
        counts["kept"] += 1
        log.warning("keymigrate.target_taken", old=old.decode(errors="replace"), new=new)


async def _zsets(r: Any, old: str, target: Any, counts: dict[str, int]) -> None:
    members = await r.zrange(old, 0, -1, withscores=True)
    for member, score in members:
        await r.zadd(target(member.decode()), {member: score}, nx=True)
    if members:
        counts["moved"] += len(members)
    await r.delete(old)


async def migrate_collector(r: Any, k: Keys) -> dict[str, int]:
    """``NS:sess:<id>:…``, ``NS:done:<id>``, ``NS:active``, ``NS:finishing`` -> the session's shard."""
    counts = {"moved": 0, "kept": 0}
    if is_cluster(r):
        return counts
    async for key in r.scan_iter(match=f"{k.ns}:sess:*", count=1000):
        rest = key.decode(errors="replace")[len(f"{k.ns}:sess:"):]
        sid, _, suffix = rest.partition(":")
        if suffix:
            await _rename(r, key, k.session_prefix(sid) + suffix, counts)
    async for key in r.scan_iter(match=f"{k.ns}:done:*", count=1000):
        sid = key.decode(errors="replace")[len(f"{k.ns}:done:"):]
        await _rename(r, key, k.completed(sid), counts)
    await _zsets(r, f"{k.ns}:active", k.active_of, counts)
    await _zsets(r, f"{k.ns}:finishing", k.finishing_of, counts)
    _report("collector", counts)
    return counts


async def migrate_analyzer(r: Any, k: Keys, series_of: Callable[[bytes], str]) -> dict[str, int]:
    """``NS:analyzer:series:<s>`` -> its shard; the outbox's alerts to their series' shard; the
    counters into shard 0 (``series_of``: an outbox entry's series, or ValueError; the analyzer's
    decoder, which this module may not import).  Done markers (``NS:analyzer:done:<id>``, 3-day TTL) are not carried:
    a session redelivered across the upgrade folds its series again."""
    counts = {"moved": 0, "kept": 0}
    if is_cluster(r):
        return counts
    prefix = f"{k.ns}:analyzer:series:"
    async for key in r.scan_iter(match=f"{prefix}*", count=1000):
        await _rename(r, key, k.analyzer_series(key.decode(errors="replace")[len(prefix):]), counts)
    old_outbox = f"{k.ns}:analyzer:outbox"
    for alert_id, data in (await r.hgetall(old_outbox)).items():
        try:
            n = shard(series_of(data))
        except ValueError as exc:  # the old sweeper would have dropped it too: say so
            log.error("keymigrate.outbox_undecodable", alert=alert_id.decode(errors="replace"), error=str(exc))
            n = 0
        await r.hsetnx(k.analyzer_outbox(n), alert_id, data)
        await r.hdel(old_outbox, alert_id)
        counts["moved"] += 1
    old_stats = f"{k.ns}:analyzer:stats"
    for field, value in (await r.hgetall(old_stats)).items():
        await r.hincrby(k.analyzer_stats(0), field, int(value))
        await r.hdel(old_stats, field)
        counts["moved"] += 1
    _report("analyzer", counts)
    return counts


async def migrate_notifier(r: Any, k: Keys) -> dict[str, int]:
    """``NS:notifier:due|jobs|digests|digest:…`` -> the queue's tag."""
    counts = {"moved": 0, "kept": 0}
    if is_cluster(r):
        return counts
    old = f"{k.ns}:notifier:"
    for name, new in (("due", k.notifier_due), ("jobs", k.notifier_jobs), ("digests", k.notifier_digests)):
        if await r.exists(old + name):
            await _rename(r, (old + name).encode(), new, counts)
    async for key in r.scan_iter(match=f"{old}digest:*", count=1000):
        sub_period = key.decode(errors="replace")[len(f"{old}digest:"):]
        sub, _, period = sub_period.rpartition(":")
        await _rename(r, key, k.notifier_digest(sub, period), counts)
    _report("notifier", counts)
    return counts


async def run(what: str, migration: Any) -> None:
    """Await one migration; a failure is logged (the service starts, the old keys stay), never fatal."""
    try:
        await migration
    except Exception as exc:  # noqa: BLE001 - Redis blip or a key of an unexpected type
        log.error("keymigrate.failed", part=what, error=f"{type(exc).__name__}: {exc}")


def _report(what: str, counts: dict[str, int]) -> None:
    if counts["moved"] or counts["kept"]:
        log.info("keymigrate.done", part=what, moved=counts["moved"], left_in_place=counts["kept"])
