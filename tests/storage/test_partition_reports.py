"""``tests``, ``test_history`` and ``failures`` over partitioned storage (services/storage/partmerge.py):
builds with test cases and failed targets spread over P partitions on the real nats-server; the
merged replies equal what one store holding every build answers (the flaky rules across
partitions included), with small reply pages so rows are paged and split."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from buildtel.services.storage import failures as fl
from buildtel.services.storage import tests_history as th
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.service import StorageService
from buildtel.services.storage.store import TelemetryStorage
from buildtel.shared.partitions import partition_of
from buildtel.shared.protocol import BuildSession, TargetFailure, TestCase
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.storage.test_partitions import eventually, publish
from tests.util import running

P = 3
BUDGET = 6000  # small reply pages: rows span pages, a build's cases split over pages


@pytest.fixture
async def partitioned(settings: Settings, nc) -> AsyncIterator[list[StorageService]]:
    s = settings.with_(storage_partitions=P)
    svcs = [StorageService(s, s.nats_url or "", s.redis_url or "", partition=k, max_reply_bytes=BUDGET)
            for k in range(P)]
    async with running(*svcs):
        yield svcs


def builds(make_session, now: float) -> list[BuildSession]:
    """60 builds on 8 commits: `suite::flip` fails on some builds of a commit another build passes;
    target //pkg:t0 fails in every third build (two signatures, and no error line in some); every
    sixth build does not build //pkg:t1, which runs `suite::steady` and most runs of `suite::flip`."""
    out = []
    for i in range(60):
        s = make_session(i, finish=now - 1000 + i * 7, outcome="failed" if i % 3 == 0 else "success",
                         branch="dev" if i % 5 == 0 else "main", targets=1 if i % 6 == 5 else 3)
        assert s.environment is not None and s.environment.vcs is not None
        s.environment.vcs.commit = f"{i % 8:040x}"
        t1 = "//pkg:t1" if i % 6 != 5 else ""
        cases = [TestCase(suite="suite", name="steady", duration_s=0.1 + i / 100, target=t1),
                 TestCase(suite="suite", name="flip", duration_s=1.0 + (i % 4),
                          outcome="failed" if i % 3 == 0 else "passed", message=f"assert {i}",
                          target=t1 if i % 4 else ""),
                 TestCase(suite="other", name="skip", outcome="skipped")]
        if i % 2:
            cases += [TestCase(suite="many", name=f"case{j:03d}-{'x' * 40}", duration_s=j / 1000,
                               outcome="error" if (i + j) % 17 == 0 else "passed") for j in range(150)]
        s.tests = cases
        if i % 3 == 0 and i % 9:
            s.failures = [TargetFailure(target="//pkg:t0", errors=[f"error: broken {i % 2}"],
                                        signature=f"error: broken {i % 2}", failure_class="code")]
        out.append(s)
    return out


async def single(tmp_path: Path, sessions: list[BuildSession]) -> TelemetryStorage:
    store = TelemetryStorage(tmp_path / "single", fsync=False)
    await store.open()
    assert await store.append_many(sessions) == [True] * len(sessions)
    return store


_enc = msgspec.msgpack.Encoder()


async def test_tests_history_and_failures_merge_as_one_store_answers(
        partitioned: list[StorageService], settings: Settings, nc, make_session, tmp_path: Path) -> None:
    subjects = Subjects(settings.namespace)
    now = time.time()
    sessions = builds(make_session, now)
    await publish(nc, subjects, sessions)
    client = StorageClient(nc, subjects, timeout=10.0)

    async def all_stored() -> bool:
        return (await client.stats()).sessions == len(sessions)

    await eventually(all_stored, what="every build stored")
    # A flaky commit's pass and failure are on different partitions: only a merge sees it.
    flip = [s for s in sessions if s.environment and s.environment.vcs and s.environment.vcs.commit == f"{0:040x}"]
    assert len({partition_of(s.id, P) for s in flip}) > 1
    store = await single(tmp_path, sessions)
    big = partitioned[0]._budget  # the same reply budget: a long answer is cut where one store cuts it
    try:
        for req in [th.TestsRequest(), th.TestsRequest(sessions=25), th.TestsRequest(sort="slowest", limit=7),
                    th.TestsRequest(flaky=True, branch="main"), th.TestsRequest(test="many", sort="failing",
                                                                                sessions=33, limit=20),
                    th.TestsRequest(since=now - 700, until=now - 300, sort="name"),
                    th.TestsRequest(target="//pkg:t1"), th.TestsRequest(target="//pkg:t1", flaky=True, sessions=20),
                    th.TestsRequest(target="//pkg:t1", test="flip", branch="main", sort="failing")]:
            want = th.tests_reply_decoder.decode(await th.serve_tests(store, _enc.encode(req), big))
            got = await th.tests(nc, subjects, req)
            assert got.partial == []
            assert (len(got.tests), got.tests_total, got.sessions_read) == (
                len(want.tests), want.tests_total, want.sessions_read)
            for a, b in zip(got.tests, want.tests, strict=True):
                assert a == b, [(f, getattr(a, f), getattr(b, f)) for f in a.__struct_fields__
                                if getattr(a, f) != getattr(b, f)]
            assert got == want, req
        flaky = (await th.tests(nc, subjects, th.TestsRequest(flaky=True, test="suite::"))).tests
        assert [(t.test, t.flaky_commits) for t in flaky] == [("suite::flip", 8)]  # every commit, across partitions
        # A target's tests: only the builds that built it (50 of 60), only the runs attributed to it.
        own = await th.tests(nc, subjects, th.TestsRequest(target="//pkg:t1", sort="name"))
        assert own.sessions_read == 50 and [(t.test, t.runs) for t in own.tests] == [
            ("suite::flip", sum(1 for i in range(60) if i % 6 != 5 and i % 4)), ("suite::steady", 50)]
        for hreq in [th.TestHistoryRequest(test="suite::flip"), th.TestHistoryRequest(test="suite::flip", limit=9),
                     th.TestHistoryRequest(test="many::case016-" + "x" * 40, sessions=40, branch="main"),
                     th.TestHistoryRequest(test="suite::steady", sessions=11)]:
            hwant = th.test_history_reply_decoder.decode(await th.serve_test_history(store, _enc.encode(hreq), big))
            hgot = await th.test_history(nc, subjects, hreq)
            assert hgot == hwant and hgot.runs, hreq
        for freq in [fl.FailuresRequest(), fl.FailuresRequest(sessions=20), fl.FailuresRequest(failure_class="flaky"),
                     fl.FailuresRequest(match="broken 1", limit=1), fl.FailuresRequest(branch="dev")]:
            fwant = fl.failures_reply_decoder.decode(await fl.serve_failures(store, _enc.encode(freq), big, ()))
            fgot = await fl.failures(nc, subjects, freq)
            assert fgot == fwant, freq
        classes = {g.failure_class for g in (await fl.failures(nc, subjects, fl.FailuresRequest())).groups}
        assert "flaky" in classes  # a failed target built on the same commit by a build of another partition
    finally:
        await store.close()
