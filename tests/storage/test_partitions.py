"""Partitioned storage (docs/scaling.md, Partitions) on the real nats-server: sessions spread by
id through the stream's subject transform, one store per partition, queries merged across
partitions, a partition SIGKILLed while builds go on (partial answers, then nothing lost)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from buildtel.services.storage import format as fmt
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.services.storage.service import StorageService
from buildtel.services.storage.summary import view_decoder
from buildtel.shared.bus import ensure_streams
from buildtel.shared.codec import encode
from buildtel.shared.partitions import partition_dirs, partition_of, store_dir
from buildtel.shared.protocol import BuildSession
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import running, stack_env

P = 3


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def publish(nc, subjects: Subjects, sessions: list[BuildSession]) -> None:
    """As the collector does with P > 1: the id as the subject's last token."""
    js = nc.jetstream()
    for s in sessions:
        await js.publish(subjects.sessions_completed_for(s.id), encode(s), headers={"Nats-Msg-Id": s.id})


def ids_on_disk(directory: Path) -> list[str]:
    out = []
    for _, path in fmt.list_segments(directory):
        data = path.read_bytes()
        out += [view_decoder.decode(fmt.payload_of(data, ref)).id for ref in fmt.scan(data, str(path)).records]
    return out


async def test_partition_of_is_the_servers_mapping(settings: Settings, nc, make_session) -> None:
    subjects = Subjects(settings.namespace)
    js = nc.jetstream()
    await ensure_streams(js, subjects, partitions=5)
    sessions = [make_session(i) for i in range(40)]
    await publish(nc, subjects, sessions)
    for seq, s in enumerate(sessions, start=1):
        msg = await js.get_msg(subjects.sessions_stream, seq)
        assert msg.subject == f"{subjects.sessions_completed}.{partition_of(s.id, 5)}.{s.id}"
    assert len({partition_of(s.id, 5) for s in sessions}) == 5  # spread over all of them


@pytest.fixture
async def partitioned(settings: Settings, nc) -> AsyncIterator[list[StorageService]]:
    s = settings.with_(storage_partitions=P)
    # Small reply pages: merged answers then span several pages of several partitions.
    svcs = [StorageService(s, s.nats_url or "", s.redis_url or "", partition=k, max_reply_bytes=6000)
            for k in range(P)]
    async with running(*svcs):
        yield svcs


async def test_sessions_spread_by_id_and_queries_merge_across_partitions(
        partitioned: list[StorageService], settings: Settings, nc, make_session) -> None:
    subjects = Subjects(settings.namespace)
    now = time.time()
    sessions = [make_session(i, finish=now - 500 + i * 3, outcome="failed" if i % 4 == 0 else "success",
                             branch="dev" if i % 3 == 0 else "main", targets=2 + i % 4, target_prefix=f"//p{i % 5}:t")
                for i in range(90)]
    sessions.append(make_session(99, finish=sessions[10].finish))  # a tie on finish time: the id orders
    for i, s in enumerate(sessions):
        s.duration_s = 10.0 + (i * 7) % 53  # durations that make the trend's percentiles mean something
    await publish(nc, subjects, sessions)
    client = StorageClient(nc, subjects, timeout=10.0)

    async def all_stored() -> bool:
        return (await client.stats()).sessions == len(sessions)

    await eventually(all_stored, what="every session stored")
    stats = await client.stats()
    assert stats.partitions == P and stats.partial == []
    # Each session in the store of the partition its id maps to, once.
    for k in range(P):
        on_disk = ids_on_disk(store_dir(settings.telemetry_dir, k))
        assert sorted(on_disk) == sorted(s.id for s in sessions if partition_of(s.id, P) == k)
        assert on_disk, f"partition {k} got nothing"
    assert set(partition_dirs(settings.telemetry_dir)) == set(range(P))
    assert not fmt.list_segments(settings.telemetry_dir)  # nothing in the unpartitioned place

    def newest(xs: list[BuildSession]) -> list[str]:
        return [s.id for s in sorted(xs, key=lambda s: (s.finish, s.id), reverse=True)]

    assert [s.id for s in await client.recent(37)] == newest(sessions)[:37]
    assert [s.id for s in await client.recent(500)] == newest(sessions)
    failed = [s for s in sessions if s.outcome == "failed"]
    assert [s.id for s in await client.query(outcome="failed", limit=100)] == newest(failed)
    assert [s.id for s in await client.query(branch="dev", limit=5)] == newest(
        [s for s in sessions if s.environment.vcs and s.environment.vcs.branch == "dev"])[:5]
    window = [s for s in sessions if now - 400 <= s.finish < now - 200]
    assert [s.id for s in await client.range(now - 400, now - 200)] == newest(window)[::-1]
    summaries = await client.summaries(limit=1000)
    assert [s.id for s in summaries] == newest(sessions)
    oldest = await client.summaries(order="oldest", limit=50, outcome="success")
    assert [s.id for s in oldest] == newest([s for s in sessions if s.outcome == "success"])[::-1][:50]
    # Report rows (the analyzer's reports, the dashboard): merged pages, names renumbered per page.
    from buildtel.services.storage.columns import ColumnsRequest, column_pages, decode_durations, decode_ids

    rows, by_id = [], {s.id: s for s in sessions}
    async for page in column_pages(nc, subjects, ColumnsRequest(branch="main")):
        assert page.partial == []
        ids, durs, off = decode_ids(page.name_ids), decode_durations(page.durations), 0
        for row in page.sessions:
            rows.append(row.id)
            want = by_id[row.id].targets
            assert [page.names[i] for i in ids[off:off + row.targets]] == [t.name for t in want]
            assert list(durs[off:off + row.targets]) == [t.duration_s for t in want]
            off += row.targets
    assert rows == newest([s for s in sessions if s.environment.vcs and s.environment.vcs.branch == "main"])
    from buildtel.services.storage.history import TargetHistoryRequest, TrendRequest, buckets, target_history, trend

    # Trend: exactly what one store computes from the same sessions (percentiles need every duration).
    got_trend = await trend(nc, subjects, TrendRequest(since=now - 600, until=now, bucket_s=120, branch="main"))
    mains = [_AsSummary(s) for s in sessions if s.environment.vcs and s.environment.vcs.branch == "main"
             and now - 600 <= s.finish < now]
    assert got_trend.partial == [] and got_trend.builds == len(mains) > 0
    assert got_trend.buckets == buckets(mains, now - 600, now, 120)

    runs = await target_history(nc, subjects, TargetHistoryRequest(target="//p1:t1", limit=25))
    ran = [s for s in sessions if any(t.name == "//p1:t1" for t in s.targets)]
    assert [r.session_id for r in runs.runs] == newest(ran)[:25] and runs.partial == []
    for s in sessions[::17]:
        assert (await client.get(s.id)).id == s.id
    with pytest.raises(StorageError) as err:
        await client.get("0" * 32)
    assert err.value.code == 404
    assert client.partial == []


class _AsSummary:
    """A session as ``history.buckets`` reads an index summary (order time = finish here)."""

    def __init__(self, s: BuildSession) -> None:
        self.t, self.outcome, self.duration_s, self.complete = s.finish, s.outcome, s.duration_s, True
        self.cache_hits, self.cache_misses = s.cache_hits, s.cache_misses


def spawn(settings: Settings, k: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **stack_env(settings), "BUILDER_TELEMETRY_CACHE_DIR": str(settings.cache_dir),
           "BUILDER_TELEMETRY_STORAGE_PARTITIONS": str(P), "BUILDER_TELEMETRY_LOG_FORMAT": "json"}
    cmd = [sys.executable, "-m", "buildtel.services.storage", "--partition", str(k), "--ack-wait-s", "1"]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def all_answer(client: StorageClient, procs: list[subprocess.Popen[bytes]], logs: list[Path],
                     n: int | None = None) -> bool:
    """Every partition process alive (else its log is the failure) and answering, no partition
    missing from the stats, and ``n`` sessions stored when given."""
    for k, proc in enumerate(procs):
        assert proc.poll() is None, logs[k].read_text()
    try:
        st = await client.stats()
    except StorageError:
        return False
    return st.partial == [] and (n is None or st.sessions == n)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each partition still running; SIGKILL one that has not stopped within 10 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_a_killed_partition_is_named_partial_then_catches_up_with_nothing_lost(
        settings: Settings, nc, tmp_path: Path, make_session) -> None:
    subjects = Subjects(settings.namespace)
    client = StorageClient(nc, subjects, timeout=10.0)
    logs = [tmp_path / f"p{k}.log" for k in range(P)]
    procs = [spawn(settings, k, logs[k]) for k in range(P)]
    try:
        async def answers() -> bool:
            return await all_answer(client, procs, logs)

        await eventually(answers, what="every partition answers")
        now = time.time()
        first = [make_session(i, finish=now - 1000 + i) for i in range(45)]
        await publish(nc, subjects, first)

        async def count(n: int) -> bool:
            return (await client.stats()).sessions == n

        await eventually(lambda: count(len(first)), what="the first builds stored")
        victim = 1
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(10)
        # Builds go on while partition 1 is down: its share waits in its durable consumer.
        second = [make_session(100 + i, finish=now - 500 + i) for i in range(45)]
        await publish(nc, subjects, second)
        live = [s for s in first + second if partition_of(s.id, P) != victim]
        mine = [s for s in first + second if partition_of(s.id, P) == victim]
        assert mine and live

        async def others_stored() -> bool:
            return (await client.stats()).sessions == len(live)

        await eventually(others_stored, what="the live partitions stored their share")
        note = f"partial: partition {victim} did not answer"
        got = await client.recent(1000)
        assert {s.id for s in got} == {s.id for s in live}  # the others' data, nothing of the dead one
        assert client.partial == [note]
        summaries = await client.summaries(limit=1000)
        assert len(summaries) == len(live) and client.partial == [note]
        assert (await client.stats()).partial == [note]
        from buildtel.services.storage.columns import ColumnsRequest, column_pages

        pages = [page async for page in column_pages(nc, subjects, ColumnsRequest())]
        assert sum(len(p.sessions) for p in pages) == len(live) and pages[0].partial == [note]
        from buildtel.services.storage.history import TrendRequest, trend

        tr = await trend(nc, subjects, TrendRequest(since=now - 2000, until=now + 1, bucket_s=3600))
        assert tr.builds == len(live) and tr.partial == [note]
        with pytest.raises(StorageError) as err:
            await client.get(mine[0].id)
        assert err.value.code == 503 and note in str(err.value)
        # A report over what answered says it is partial and which partition it lacks.
        from buildtel.services.analyzer.api import AnalyzerClient
        from buildtel.services.analyzer.export import summary
        from buildtel.services.analyzer.service import AnalyzerService

        analyzer = AnalyzerService(settings, settings.nats_url or "", settings.redis_url or "")
        await analyzer.start()
        try:
            rep = await AnalyzerClient(nc, settings.namespace).report(critical_paths=0)
        finally:
            await analyzer.stop()
        assert rep.sessions == len(live) and rep.partial and note in rep.notes
        assert f"(partial: partition {victim} did not answer)" in summary(rep)
        # What a person sees: the CLI's list says so on stderr, the web API in the page and the problem.
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
        env.update(stack_env(settings))
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "buildtel.cli.main", "--namespace", settings.namespace, "--cache-dir",
            str(settings.cache_dir), "sessions", "--limit", "500", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)
        out, errb = await asyncio.wait_for(cli.communicate(), 90)
        assert cli.returncode == 0, errb.decode()
        assert f"buildtel: {note}: its sessions are missing from this list" in errb.decode()
        assert len(out.decode().splitlines()) == 1 + len(live)  # header + the others' sessions
        import aiohttp

        from buildtel.services.web.service import WebService

        web = WebService(settings, settings.nats_url or "", settings.redis_url or "")
        await web.start()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{web.url}/api/v1/sessions?limit=500") as resp:
                    assert resp.status == 200
                    page = await resp.json()
                assert page["partial"] == [note] and len(page["sessions"]) == len(live)
                async with http.get(f"{web.url}/api/v1/sessions/{mine[0].id}") as resp:
                    assert resp.status == 503
                    assert note in (await resp.json())["detail"]
        finally:
            await web.stop()
        # The reports grouped across partitions (partmerge.py) say so too, in the reply and on stderr.
        from buildtel.services.storage import failures as fl
        from buildtel.services.storage import tests_history as th

        assert (await th.tests(nc, subjects, th.TestsRequest())).partial == [note]
        assert (await th.test_history(nc, subjects, th.TestHistoryRequest(test="s::t"))).partial == [note]
        failed = await fl.failures(nc, subjects, fl.FailuresRequest())
        assert failed.partial == [note] and failed.failures_total == 0  # make_session's builds all succeeded
        for args in (["tests"], ["failures"]):
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "buildtel.cli.main", "--namespace", settings.namespace, "--cache-dir",
                str(settings.cache_dir), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=env)
            _, errb = await asyncio.wait_for(cli.communicate(), 90)
            assert cli.returncode == 0, errb.decode()
            assert f"buildtel: {note}: its builds are missing from these figures" in errb.decode(), args

        procs[victim] = spawn(settings, victim, logs[victim])
        await eventually(answers, what="partition 1 answers again")
        await eventually(lambda: count(len(first) + len(second)), what="partition 1 caught up")
        stored = [s.id for s in await client.recent(1000)]
        assert client.partial == []
        assert sorted(stored) == sorted(s.id for s in first + second)  # exact: nothing lost, nothing twice
        assert sorted(ids_on_disk(store_dir(settings.telemetry_dir, victim))) == sorted(s.id for s in mine)
    finally:
        stop_all(procs)


async def test_up_with_partitions_runs_one_storage_per_partition_fed_by_the_collector(
        settings: Settings, nc) -> None:
    """``buildtel up``'s stack with P = 3: the collector publishes with the id in the subject, the
    stream maps it, three storage instances store their share; the analyzer's durable, made before
    the rebalance with the bare filter only, is converged on start and gets every session too."""
    from buildtel.cli.cmd_stack import LocalStack
    from buildtel.shared.partitions import consumer_filters
    from tests.util import publish_events, synthetic_build

    subjects = Subjects(settings.namespace)
    js = nc.jetstream()
    async with LocalStack(settings, services=["analyzer"]):  # P = 1: the analyzer's durable, bare filter
        pass
    info = await js.consumer_info(subjects.sessions_stream, "analyzer")
    assert info.config.filter_subject == subjects.sessions_completed
    # The farm grows: partitioned with the documented command (no storage ran: nothing to re-home).
    from buildtel.services.storage.rebalance import rebalance

    assert (await rebalance(settings, nc, P)).sessions == 0
    s = settings.with_(storage_partitions=P)
    async with LocalStack(s, services=["collector", "storage", "analyzer"]) as stack:
        storages = [svc for svc in stack.services if svc.name == "storage"]
        assert sorted(svc.partition for svc in storages) == list(range(P))
        info = await js.consumer_info(subjects.sessions_stream, "analyzer")
        assert set(info.config.filter_subjects or []) == set(consumer_filters(subjects, P))
        sids = []
        for n in range(12):
            sid, per_agent, _ = synthetic_build(targets=5, seed=n)
            sids.append(sid)
            for agent, events in per_agent.items():
                await publish_events(js, subjects, sid, agent, events)
        client = StorageClient(nc, subjects, timeout=10.0)

        async def all_stored() -> bool:
            return (await client.stats()).sessions == len(sids)

        await eventually(all_stored, what="the collector's sessions stored")
        for k in range(P):
            assert sorted(ids_on_disk(store_dir(s.telemetry_dir, k))) == sorted(
                i for i in sids if partition_of(i, P) == k)

        async def analyzer_done() -> bool:
            c = await js.consumer_info(subjects.sessions_stream, "analyzer")
            return c.delivered.stream_seq > 0 and c.num_pending == 0 and c.num_ack_pending == 0

        await eventually(analyzer_done, what="the analyzer consumed the partitioned sessions")
        c = await js.consumer_info(subjects.sessions_stream, "analyzer")
        assert c.num_redelivered == 0 and c.delivered.consumer_seq == len(sids)  # each session once
