"""Redis Cluster: every script and MULTI touches one slot; the fold and the analyzer run on a real
3-master cluster (started here when the pass itself is on a single Redis).

Slot rules are the server's and redis-py's, not ours: a script over keys of two slots is refused on
a cluster (the client refuses it before sending, the server answers CROSSSLOT), so the end-to-end
tests below passing on the cluster is the proof; the property test checks the key layout for any
session id, agent and series name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, ResponseError

from buildtel.services.analyzer.service import AnalyzerService
from buildtel.services.collector.service import CollectorService
from buildtel.shared.bus import connect_redis
from buildtel.shared.keys import SHARDS, Keys, shard
from buildtel.shared.rediscluster import (
    RedisClusterEngine,
    is_cluster,
    is_cluster_url,
    parse_cluster_url,
)
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.analyzer.test_service import _step_history
from tests.util import completed_sessions, publish_events, synthetic_build

_sid = st.text("0123456789abcdef", min_size=32, max_size=32)
_name = st.text(min_size=1, max_size=80)


def _one_slot(keys: list[str]) -> bool:
    return len({key_slot(k.encode()) for k in keys}) == 1


@hsettings(max_examples=200, deadline=None)
@given(ns=st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True), sid=_sid, agents=st.lists(_name, min_size=1,
                                                                                            max_size=4))
def test_every_script_of_a_session_touches_one_slot(ns: str, sid: str, agents: list[str]) -> None:
    k = Keys(ns)
    # collector/lua.py: APPLY (per agent), RETIRE, LOST_BATCH, CLAIM; the completion reads.
    for agent in agents:
        assert _one_slot([k.session_meta(sid), k.session_fragments(sid), k.session_seen(sid, agent),
                          k.active_of(sid), k.finishing_of(sid), k.completed(sid)])
    assert _one_slot([k.completed(sid), k.active_of(sid), k.finishing_of(sid), k.session_meta(sid),
                      k.session_fragments(sid), k.session_lock(sid), *(k.session_seen(sid, a) for a in agents)])


@hsettings(max_examples=200, deadline=None)
@given(sid=_sid, series=st.lists(_name, min_size=1, max_size=20))
def test_every_analyzer_commit_touches_one_slot(sid: str, series: list[str]) -> None:
    k = Keys("buildtel")
    by_shard: dict[int, list[str]] = {}
    for name in series:
        by_shard.setdefault(int(k.analyzer_series(name).split("{a")[1][:2]), []).append(name)
    for n, names in by_shard.items():  # one COMMIT per shard (analyzer/service.py _commit_by_shard)
        assert _one_slot([k.analyzer_done(sid, n), k.analyzer_outbox(n), k.analyzer_stats(n),
                          *(k.analyzer_series(s) for s in names)])
    # SESSION_SEEN: the session's done hash and counters of the session's own shard.
    assert _one_slot([k.analyzer_done(sid, shard(sid)), k.analyzer_stats(shard(sid))])
    # The notifier's queue: jobs + due (MULTI), a digest + the digest schedule (script, MULTI).
    assert _one_slot([k.notifier_jobs, k.notifier_due, k.notifier_digests, k.notifier_digest("hook", "2026-12-07")])


def test_the_cluster_url_form() -> None:
    url = "redis+cluster://:p%40ss@127.0.0.1:7000,127.0.0.1:7001,redis+cluster://10.0.0.3:7002"
    assert is_cluster_url(url) and not is_cluster_url("redis://:x@127.0.0.1:6379/0")
    kw = parse_cluster_url(url)
    assert [(n.host, n.port) for n in kw["startup_nodes"]] == [("127.0.0.1", 7000), ("127.0.0.1", 7001),
                                                                ("10.0.0.3", 7002)]
    assert kw["password"] == "p@ss" and kw["ssl"] is False
    assert parse_cluster_url("rediss+cluster://u:pw@h:1")["ssl"] is True
    with pytest.raises(ValueError, match="node 2"):
        parse_cluster_url("redis+cluster://h:1,nohost")


@pytest.fixture(scope="module")
def cluster_url(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The pass's cluster when it runs on one (BUILDER_TELEMETRY_TEST_REDIS=cluster), else one of
    this module's own."""
    if is_cluster_url(redis_url):
        yield redis_url
        return
    with RedisClusterEngine(tmp_path_factory.mktemp("redis-cluster"), masters=3) as cluster:
        yield cluster.url


@pytest.fixture
async def on_cluster(settings: Settings, cluster_url: str) -> Any:
    s = settings.with_(redis_url=cluster_url)
    r = connect_redis(cluster_url)
    yield s, r
    async for key in r.scan_iter(match=f"{s.namespace}:*", count=1000):
        await r.delete(key)
    await r.aclose()


async def test_a_cross_slot_script_is_refused_by_the_cluster(on_cluster: Any) -> None:
    """What the tags guard against: the pre-cluster layout (a session key beside the global
    ``active`` set) is refused on a cluster, so the passing tests below did not pass by luck."""
    s, r = on_cluster
    assert is_cluster(r)
    with pytest.raises((RedisClusterException, ResponseError), match=r"(?i)slot"):
        await r.eval("redis.call('SET', KEYS[1], 1); redis.call('ZADD', KEYS[2], 1, 'x')", 2,
                     f"{s.namespace}:sess:{'a' * 32}:meta", f"{s.namespace}:active")


async def test_the_fold_completes_sessions_on_a_cluster_spread_over_every_master(on_cluster: Any, nc: Any) -> None:
    s, r = on_cluster
    js, subjects = nc.jetstream(), Subjects(s.namespace)
    collector = CollectorService(s, s.nats_url or "", s.redis_url or "")
    await collector.start()
    try:
        builds = [synthetic_build(targets=15, seed=i, agents=("agent-a", "agent-b")) for i in range(12)]
        for sid, per_agent, _ in builds:
            for agent, events in per_agent.items():
                await publish_events(js, subjects, sid, agent, events)
        done = await completed_sessions(js, subjects, len(builds), timeout=60)
        assert sorted(x.id for x in done) == sorted(sid for sid, _, _ in builds)
        for session, (_, _, expected) in zip(sorted(done, key=lambda x: x.id), sorted(builds), strict=True):
            assert (session.totals.events, len(session.targets)) == (expected["events"], expected["targets"])
            assert session.completeness is not None and session.completeness.complete
        # Nothing of them left in hot state but the completion markers; the shards they used live
        # on more than one master (12 sessions over 32 shards over 3 masters).
        k = Keys(s.namespace)
        for n in range(SHARDS):
            assert await r.zcard(k.active(n)) == 0 and await r.zcard(k.finishing(n)) == 0
        masters = {r.get_node_from_key(k.completed(sid)).name for sid, _, _ in builds}
        assert len(masters) >= 2, masters
        assert all(await asyncio.gather(*(r.exists(k.completed(sid)) for sid, _, _ in builds)))
    finally:
        await collector.stop()


async def test_the_analyzer_folds_series_of_every_shard_on_a_cluster(on_cluster: Any, nc: Any) -> None:
    s, _ = on_cluster
    analyzer = AnalyzerService(s, s.nats_url or "", s.redis_url or "")
    await analyzer.start()
    try:
        sessions = _step_history(n=60, at=30, seed=4)
        committed = [a for x in sessions for a in await analyzer.fold_session(x)]
        assert len(committed) == 1  # the step, found through states kept across shards
        assert await analyzer.outbox_size() == 1
        assert await analyzer.sweep_outbox_once(grace_s=0) == 1 and await analyzer.outbox_size() == 0
        again = [a for x in sessions for a in await analyzer.fold_session(x)]
        assert again == []  # every series' done marker held: a redelivery folds nothing
    finally:
        await analyzer.stop()



async def test_notifier_queue_api_keys_and_acknowledgements_on_a_cluster(on_cluster: Any) -> None:
    """The other multi-key writers: the notifier's MULTI and scripts (one tag), API keys (ordered
    writes over two slots), acknowledgements read over many slots."""
    import time

    from buildtel.services.notifier.queue import Job, Queue
    from buildtel.shared import alertstate, apikeys

    s, r = on_cluster
    k = Keys(s.namespace)
    q = Queue(r, k, "replica-1")
    await q.enqueue(Job(sub="hook", item="a1", alerts=[], created=time.time()), 0)
    assert await q.due(time.time(), 10) == ["hook|a1"]
    job = await q.claim("hook|a1", time.time(), 5)
    assert job is not None
    await q.retry(job, 0)
    job = await q.claim("hook|a1", time.time(), 5)
    assert job is not None and await q.claim("hook|a1", time.time(), 5) is None  # held: one replica
    await q.end(job, "done")
    assert await q.due(time.time() + 10, 10) == []
    key, record = await apikeys.create(r, k, tenant=s.namespace, scope="read")
    assert [x.id for x in await apikeys.list_keys(r, k)] == [record.id]
    assert await apikeys.verify(r, k, key) is not None
    assert await apikeys.revoke(r, k, record.id) and await apikeys.verify(r, k, key) is None
    assert not await apikeys.any_keys(r, k)
    ids = [f"alert-{i}" for i in range(20)]  # over many slots
    await alertstate.acknowledge(r, k, ids[7], by="me")
    found = await alertstate.states(r, k, [(a, "build|main|_", 0.0) for a in ids])
    assert [x.status for x in found] == ["acknowledged" if i == 7 else "open" for i in range(20)]
