"""Change the number of storage partitions offline: ``buildtel storage rebalance --partitions P2``.

With every storage instance stopped (each store's lock and a ``stats`` request that nobody
answers say so) and every storage durable caught up (nothing pending: all a partition was sent is
on its disk), this:

1. copies each stored session, verbatim, into a new store for the partition its id maps to under
   P2 (``telemetry/.rebalance/p<k>/``, or ``.rebalance/flat/`` for P2 = 1), the same mapping the
   server applies (``shared/partitions.py``), each new store fsynced;
2. moves the old stores aside (``telemetry/.rebalance-old/``) and the new ones into place;
3. switches the sessions stream's subject transform to P2 and gives each new partition a durable
   that starts after the stream's last message (everything before it is already stored: without
   this a new partition 0 would re-read the whole stream), keeping the position of partitions
   that stay; then deletes the old stores.

Sessions published during step 3 (collectors left running) go to the partition of the mapping
they met and are consumed there; queries find them wherever they are, and the count is printed.
An interrupted run leaves ``.rebalance``/``.rebalance-old`` behind: the next run refuses until a
person has looked (the old stores are whole until step 3 deletes them).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from buildtel.services.storage.index import Filters
from buildtel.services.storage.service import STORAGE_MAX_DELIVER
from buildtel.services.storage.store import TelemetryStorage
from buildtel.shared import micro, partitions
from buildtel.shared.bus import stream_configs
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

PAGE = 256  # sessions read from an old store per step (bounds the memory of a re-home)


class RebalanceError(RuntimeError):
    """Rebalancing was refused or failed; the message says why and what to do."""


@dataclass
class Report:
    before: int
    after: int
    sessions: int = 0  # re-homed (each once)
    duplicates: int = 0  # stored in two old partitions: kept once
    per_partition: dict[int, int] = field(default_factory=dict)
    arrived_during_switch: int = 0


def _old_stores(tdir: Path) -> dict[int | None, Path]:
    out: dict[int | None, Path] = {k: p for k, p in partitions.partition_dirs(tdir).items()}
    if partitions.unpartitioned_files(tdir):
        out[None] = tdir
    return out


async def _check_stopped(nc: Any, js: Any, subjects: Subjects, before: int) -> int:
    """Refuse while a storage instance answers or a durable has sessions not yet stored; the
    stream's last sequence (everything up to it is on some store's disk)."""
    try:
        await micro.request(nc, subjects.endpoint("storage", "stats"), b"", timeout=1.0, service="storage",
                            error=lambda c, d: RebalanceError(f"{c}: {d}"))
    except RebalanceError as exc:
        if not str(exc).startswith(("503", "504")):
            raise RebalanceError("a storage instance is running (it answered): stop every storage instance "
                                 "first") from None
    else:
        raise RebalanceError("a storage instance is running (it answered): stop every storage instance first")
    durables = [partitions.DURABLE] if before == 1 else [partitions.storage_durable(k) for k in range(before)]
    last = (await js.stream_info(subjects.sessions_stream)).state.last_seq
    for d in durables:
        try:
            info = await js.consumer_info(subjects.sessions_stream, d)
        except Exception:  # noqa: BLE001 - never created: nothing was consumed by it, nothing pending
            continue
        waiting = info.num_pending + info.num_ack_pending
        if waiting:
            raise RebalanceError(f"consumer {d} has {waiting} session(s) not yet stored: start that storage "
                                 "instance until it has caught up, stop it, and run rebalance again")
    return int(last)


async def _rehome(settings: Settings, olds: dict[int | None, Path], stage: Path, after: int, rep: Report) -> None:
    news: dict[int, TelemetryStorage] = {}
    try:
        for k in range(after):
            d = stage / ("flat" if after == 1 else f"p{k}")
            news[k] = TelemetryStorage(d, max_sessions=settings.max_sessions, retention_s=settings.retention_s,
                                       fsync=settings.fsync)
            await news[k].open()
        for old_dir in olds.values():
            old = TelemetryStorage(old_dir, max_sessions=settings.max_sessions, retention_s=settings.retention_s)
            try:
                await old.open()  # takes the store's lock: refused while an instance holds it
            except Exception as exc:  # noqa: BLE001 - locked (an instance runs) or damaged: say which
                raise RebalanceError(f"cannot open {old_dir}: {exc}") from None
            try:
                cursor = None
                while True:
                    page = await old.page(Filters(), desc=False, limit=PAGE, cursor=cursor)
                    groups: dict[int, list[bytes]] = {}
                    for payload, key in zip(page.payloads, page.keys, strict=True):
                        groups.setdefault(partitions.partition_of(key[1], after), []).append(payload)
                    for k, payloads in groups.items():
                        for new in await news[k].append_encoded(payloads):
                            rep.sessions += new
                            rep.duplicates += not new
                            rep.per_partition[k] = rep.per_partition.get(k, 0) + new
                    if page.cursor is None:
                        break
                    cursor = page.cursor
            finally:
                await old.close()
    finally:
        for store in news.values():
            await store.close()


async def _switch_bus(js: Any, subjects: Subjects, before: int, after: int, last: int) -> int:
    """Stream transform to ``after`` partitions, durables for the new layout; messages that
    arrived meanwhile."""
    current = (await js.stream_info(subjects.sessions_stream)).config
    wanted = stream_configs(subjects, after)[1]
    await js.update_stream(dataclasses.replace(current, subjects=wanted.subjects,
                                               subject_transform=wanted.subject_transform))
    keep = set(range(min(before, after))) if before > 1 and after > 1 else set()
    old = [partitions.DURABLE] if before == 1 else [partitions.storage_durable(k) for k in range(before)]
    for k_old, name in enumerate(old):
        if before == 1 or k_old not in keep:
            try:
                await js.delete_consumer(subjects.sessions_stream, name)
            except Exception:  # noqa: BLE001 - never created
                pass
    for k in range(after):
        if k in keep:
            continue
        part = None if after == 1 else k
        filters = list(partitions.storage_filters(subjects, part)) or [subjects.sessions_completed]
        await js.add_consumer(subjects.sessions_stream, config=ConsumerConfig(
            durable_name=partitions.storage_durable(part), name=partitions.storage_durable(part),
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1,
            ack_wait=30.0, max_ack_pending=1024, max_deliver=STORAGE_MAX_DELIVER,
            filter_subjects=filters if len(filters) > 1 else None,
            filter_subject=filters[0] if len(filters) == 1 else None))
    return int((await js.stream_info(subjects.sessions_stream)).state.last_seq) - last


async def rebalance(settings: Settings, nc: Any, after: int) -> Report:
    """Re-home every stored session into ``after`` partitions (see the module docstring)."""
    if not 1 <= after <= partitions.MAX_PARTITIONS:
        raise RebalanceError(f"--partitions must be 1..{partitions.MAX_PARTITIONS}, not {after}")
    subjects = Subjects(settings.namespace)
    js = nc.jetstream()
    tdir = settings.telemetry_dir
    stage, aside = tdir / ".rebalance", tdir / ".rebalance-old"
    if stage.exists() or aside.exists():
        raise RebalanceError(f"{stage} or {aside} is left from an interrupted rebalance: look at them (the old "
                             "stores are whole in one of the two) and remove them before running again")
    try:
        info = await js.stream_info(subjects.sessions_stream)
        before = partitions.partitions_of_transform(info.config.subject_transform)
    except Exception as exc:  # noqa: BLE001 - no stream: nothing was ever published here
        raise RebalanceError(f"stream {subjects.sessions_stream} not found ({type(exc).__name__}): start the stack "
                             "once so it exists") from None
    olds = _old_stores(tdir)
    rep = Report(before=before, after=after)
    last = await _check_stopped(nc, js, subjects, before)
    await _rehome(settings, olds, stage, after, rep)
    aside.mkdir(mode=0o700)
    for k, d in olds.items():
        if k is None:  # the flat store's files (and its lock) directly in telemetry/
            for f in [p for p in tdir.iterdir() if p.is_file()]:
                f.rename(aside / f.name)
        else:
            d.rename(aside / d.name)
    if after == 1:
        for f in (stage / "flat").iterdir():
            f.rename(tdir / f.name)
    else:
        for k in range(after):
            (stage / f"p{k}").rename(tdir / f"p{k}")
    shutil.rmtree(stage)
    rep.arrived_during_switch = await _switch_bus(js, subjects, before, after, last)
    shutil.rmtree(aside)
    return rep
