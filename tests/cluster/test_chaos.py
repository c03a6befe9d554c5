"""Chaos: a NATS node SIGKILLed mid-burst of builds loses and doubles nothing.

The test starts its own 3-node cluster (R3 streams), the collector and storage services on every
node's URL, and a burst of builds through the normal agent path (the SDK's TelemetryClient, one
per build).  While the builds publish, the events stream's leader is SIGKILLed.  The sessions
storage then holds (counted through its query API) are exactly the builds sent, each once with
all its targets; builds published after the kill are stored too; the killed node, started again
on its ports and store, rejoins and its copies of the streams catch up (stream info: current).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from buildtel.services import registry
from buildtel.services.storage.api import StorageClient
from buildtel.shared.bus import connect_nats
from buildtel.shared.client import TelemetryClient
from buildtel.shared.natscluster import NatsCluster
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.cluster.conftest import eventually

pytestmark = pytest.mark.timeout(300)

BUILDS = 24
TARGETS = 40


async def _build(s: Settings, i: int, go: asyncio.Event | None = None, killed: asyncio.Event | None = None
                 ) -> tuple[str, int]:
    """One build through the SDK: a first third of its targets, then (on ``go``) a second third
    published as the node dies, then (once ``killed``) the rest, with the node down."""
    client = await TelemetryClient(s).start()
    client.build_started(name=f"chaos-{i}")
    for t in range(TARGETS):
        if t == TARGETS // 3 and go is not None:
            await go.wait()
        if t == 2 * TARGETS // 3 and killed is not None:
            await killed.wait()
        client.target_finished(f"//chaos:t{t}", start=time.time() - 1, duration_s=0.5)
        await asyncio.sleep(0)
    client.build_finished(exit_code=0)
    stats = await client.close(timeout=120)  # waits out the failover; every event acknowledged or counted
    assert stats.dropped == 0, f"build {i} dropped {stats.dropped} events: {stats}"
    return client.session_id, stats.sent


async def test_node_sigkill_mid_burst_loses_and_doubles_nothing_and_the_node_rejoins(
        cluster: NatsCluster, cluster_settings: Settings) -> None:
    s = cluster_settings.with_(batch_size=10, flush_interval_s=0.02)
    subjects = Subjects(s.namespace)
    services = [registry.create(n, s, cluster.url, s.redis_url or "") for n in ("collector", "storage")]
    started = []
    op = await connect_nats(s, cluster.url, name="test-operator", role="operator")
    try:
        for svc in services:
            await svc.start()
            started.append(svc)
        js = op.jetstream()
        leader = (await js.stream_info(subjects.events_stream)).cluster.leader
        go, down = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(_build(s, i, go, down)) for i in range(BUILDS)]

        async def first_thirds_stored() -> bool:  # every build has started and published a third
            return (await js.stream_info(subjects.events_stream)).state.messages >= BUILDS * (TARGETS // 3) // 10

        await eventually(first_thirds_stored, what="the burst's first third in the events stream")
        go.set()
        await asyncio.sleep(0.05)  # the builds' second thirds are being published...
        killed = cluster.kill(leader)  # ...when the events stream's leader is SIGKILLed
        down.set()
        sent = await asyncio.gather(*tasks)
        after = await _build(s, BUILDS)  # the stack goes on with one node down
        ids = [sid for sid, _ in sent] + [after[0]]
        assert all(n == TARGETS + 2 for _, n in [*sent, after])  # started + targets + finished, all sent

        storage = StorageClient(op, subjects, timeout=10)

        async def all_stored() -> bool:
            try:
                return (await storage.stats()).sessions >= len(ids)
            except Exception:  # noqa: BLE001 - a request during the failover: ask again
                return False

        await eventually(all_stored, timeout=180, what=f"{len(ids)} stored sessions")
        summaries = await storage.summaries(limit=10 * len(ids))
        stored = [x.id for x in summaries]
        assert len(stored) == len(ids) and set(stored) == set(ids), "lost or doubled sessions"
        assert {x.targets for x in summaries} == {TARGETS} and {x.outcome for x in summaries} == {"success"}
        assert (await storage.stats()).sessions == len(ids)
        # Upstream of storage's idempotence too: the collectors completed each build once.
        info = await js.stream_info(subjects.sessions_stream, subjects_filter=subjects.sessions_completed)
        assert (info.state.subjects or {}).get(subjects.sessions_completed) == len(ids)

        # The killed node rejoins: started on its ports and store, its copies catch up.
        await asyncio.to_thread(cluster.restart, killed.server_name)

        async def rejoined() -> bool:
            for stream in (subjects.events_stream, subjects.sessions_stream):
                info = await js.stream_info(stream)
                c = info.cluster
                if c is None:
                    return False
                peers = {p.name: p for p in c.replicas or []}
                if c.leader != killed.server_name and not (
                        killed.server_name in peers and peers[killed.server_name].current
                        and not peers[killed.server_name].offline):
                    return False
            return True

        await eventually(rejoined, timeout=120, what=f"node {killed.server_name} current again")
        last = (await js.stream_info(subjects.events_stream)).state.last_seq
        assert last >= len(ids) * (TARGETS + 2) // s.batch_size
    finally:
        for svc in reversed(started):
            await svc.stop()
        await op.close()
