"""Raising the number of storage partitions (docs/scaling.md, Partitions): ``buildtel storage
rebalance`` re-homes every stored session by id, switches the stream and the consumers, and the
partitioned stack then has every session once, old and new, on the real nats-server."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from buildtel.services.storage import format as fmt
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.rebalance import RebalanceError, rebalance
from buildtel.services.storage.service import StorageService
from buildtel.services.storage.summary import view_decoder
from buildtel.shared.codec import encode
from buildtel.shared.partitions import partition_dirs, partition_of, store_dir
from buildtel.shared.protocol import BuildSession
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import stack_env


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.05)


def ids_on_disk(directory: Path) -> list[str]:
    out = []
    for _, path in fmt.list_segments(directory):
        data = path.read_bytes()
        out += [view_decoder.decode(fmt.payload_of(data, ref)).id for ref in fmt.scan(data, str(path)).records]
    return out


async def publish(nc, subject: Callable[[str], str], sessions: list[BuildSession]) -> None:
    js = nc.jetstream()
    for s in sessions:
        await js.publish(subject(s.id), encode(s), headers={"Nats-Msg-Id": s.id})


async def run_partitions(settings: Settings, p: int) -> list[StorageService]:
    s = settings.with_(storage_partitions=p)
    svcs = [StorageService(s, s.nats_url or "", s.redis_url or "", partition=None if p == 1 else k)
            for k in range(p)]
    for svc in svcs:
        await svc.start()
    return svcs


async def cli(settings: Settings, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(stack_env(settings))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "buildtel.cli.main", "--namespace", settings.namespace, "--cache-dir",
        str(settings.cache_dir), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out.decode() + err.decode()


async def test_rebalance_from_one_to_three_to_five_partitions_keeps_every_session_once(
        settings: Settings, nc, make_session) -> None:
    subjects = Subjects(settings.namespace)
    client = StorageClient(nc, subjects, timeout=10.0)
    now = time.time()
    everything: list[BuildSession] = []

    async def stored(n: int) -> bool:
        return (await client.stats()).sessions == n

    # P = 1, as every existing user has it.
    svcs = await run_partitions(settings, 1)
    try:
        batch = [make_session(i, finish=now - 900 + i) for i in range(40)]
        await publish(nc, lambda _: subjects.sessions_completed, batch)
        everything += batch
        await eventually(lambda: stored(len(everything)), what="P=1 stored")
        with pytest.raises(RebalanceError, match="storage instance is running"):
            await rebalance(settings, nc, 3)
    finally:
        for svc in svcs:
            await svc.stop()

    rep = await rebalance(settings, nc, 3)
    assert (rep.before, rep.after, rep.sessions, rep.duplicates) == (1, 3, 40, 0)
    assert not fmt.list_segments(settings.telemetry_dir)
    for k in range(3):
        assert sorted(ids_on_disk(store_dir(settings.telemetry_dir, k))) == sorted(
            s.id for s in everything if partition_of(s.id, 3) == k)

    svcs = await run_partitions(settings, 3)
    try:
        # The new partition 0 does not re-read the stream's P = 1 history (it would store twice).
        batch = [make_session(100 + i, finish=now - 500 + i) for i in range(30)]
        await publish(nc, subjects.sessions_completed_for, batch)
        everything += batch
        await eventually(lambda: stored(len(everything)), what="P=3 stored the new builds")
        assert sorted(s.id for s in await client.recent(1000)) == sorted(s.id for s in everything)
    finally:
        for svc in svcs:
            await svc.stop()

    code, out = await cli(settings, "storage", "rebalance", "--partitions", "5")
    assert code == 0, out
    assert "rebalanced 70 session(s) from 3 to 5 partition(s)" in out
    assert set(partition_dirs(settings.telemetry_dir)) == set(range(5))

    svcs = await run_partitions(settings, 5)
    try:
        batch = [make_session(200 + i, finish=now - 100 + i) for i in range(20)]
        await publish(nc, subjects.sessions_completed_for, batch)
        everything += batch
        await eventually(lambda: stored(len(everything)), what="P=5 stored the new builds")
        got = [s.id for s in await client.recent(1000)]
        assert sorted(got) == sorted(s.id for s in everything) and client.partial == []
        assert got == [s.id for s in sorted(everything, key=lambda s: (s.finish, s.id), reverse=True)]
    finally:
        for svc in svcs:
            await svc.stop()
    for k in range(5):  # every session once, in the partition its id maps to
        assert sorted(ids_on_disk(store_dir(settings.telemetry_dir, k))) == sorted(
            s.id for s in everything if partition_of(s.id, 5) == k)


async def test_a_partition_count_other_than_the_streams_is_refused_with_the_fix(settings: Settings, nc) -> None:
    svcs = await run_partitions(settings, 1)
    for svc in svcs:
        await svc.stop()
    with pytest.raises(ValueError, match=r"rebalance --partitions 2"):
        await run_partitions(settings, 2)
