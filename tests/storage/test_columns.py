"""The storage service's ``columns`` endpoint: report rows, paged in bytes, filtered, refused when bad."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
import pytest

from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.columns import (
    STATUSES,
    ColumnsError,
    ColumnsReply,
    ColumnsRequest,
    column_pages,
    decode_durations,
    decode_ids,
)
from buildtel.services.storage.rowcache import RowCache, peek_id
from buildtel.services.storage.service import StorageService
from buildtel.shared import micro
from buildtel.shared.codec import encode
from buildtel.shared.protocol import BuildSession
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.storage.test_storage_service import eventually, publish

REPLY_LIMIT = 8 * 1024


@pytest.fixture
async def stored(settings: Settings, nc, make_session) -> AsyncIterator[list[BuildSession]]:
    """30 sessions of 12 targets in a storage service whose replies are at most 8 KB."""
    svc = StorageService(settings.with_(fsync=False), settings.nats_url or "", settings.redis_url or "",
                         max_reply_bytes=REPLY_LIMIT)
    await svc.start()
    now = time.time()
    sessions = []
    for i in range(30):
        s = make_session(i, targets=12, finish=now - 1000 + 10 * i, outcome="failed" if i % 5 == 0 else "success",
                         branch="dev" if i % 3 == 0 else "main")
        if i % 4 == 0:  # a "branch" label that is not the VCS branch: a report's branch is the VCS one
            s = msgspec.structs.replace(s, name="nightly", labels={**s.labels, "branch": "dev"})
        sessions.append(s)
        await publish(nc, settings, encode(s), s.id)
    client = StorageClient(nc, Subjects(settings.namespace))

    async def all_stored() -> bool:
        return (await client.stats()).sessions == len(sessions)

    await eventually(all_stored)
    try:
        yield sessions
    finally:
        await svc.stop()


async def _all(nc, settings: Settings, req: ColumnsRequest, limit: int | None = None) -> list[ColumnsReply]:
    return [p async for p in column_pages(nc, Subjects(settings.namespace), req, limit=limit)]


async def test_rows_and_columns_are_the_stored_sessions_newest_first_in_small_pages(stored, settings, nc) -> None:
    pages = await _all(nc, settings, ColumnsRequest())
    assert len(pages) > 3  # 30 sessions x 12 targets do not fit one 8 KB reply
    rows = [r for p in pages for r in p.sessions]
    newest_first = sorted(stored, key=lambda s: s.finish, reverse=True)
    assert [r.id for r in rows] == [s.id for s in newest_first]
    by_id = {s.id: s for s in stored}
    for p in pages:
        assert len(msgspec.msgpack.encode(p)) <= REPLY_LIMIT
        ids, durs = decode_ids(p.name_ids), decode_durations(p.durations)
        k = 0
        for r in p.sessions:
            s = by_id[r.id]
            assert (r.start, r.finish, r.outcome, r.branch, r.commit, r.totals, r.targets) == (
                s.start, s.finish, s.outcome, "dev" if s.environment.vcs.branch == "dev" else "main",
                s.environment.vcs.commit, s.totals, len(s.targets))
            for t in s.targets:
                assert (p.names[ids[k]], durs[k], STATUSES[p.codes[k] >> 2]) == (t.name, t.duration_s, t.status)
                assert p.codes[k] & 3 == (1 if t.cache in ("local_hit", "remote_hit") else 0)
                k += 1
        assert k == len(ids) == len(durs) == len(p.codes)


async def test_filters_and_limit(stored, settings, nc) -> None:
    async def ids(req: ColumnsRequest, limit: int | None = None) -> list[str]:
        return [r.id for p in await _all(nc, settings, req, limit) for r in p.sessions]

    newest_first = sorted(stored, key=lambda s: s.finish, reverse=True)
    assert await ids(ColumnsRequest(), limit=7) == [s.id for s in newest_first[:7]]
    # The VCS branch, not the label that the store's index also matches.
    assert await ids(ColumnsRequest(branch="dev")) == [s.id for s in newest_first
                                                       if s.environment.vcs.branch == "dev"]
    assert await ids(ColumnsRequest(name="nightly", outcome="failed")) == [
        s.id for s in newest_first if s.name == "nightly" and s.outcome == "failed"]
    mid = stored[10].finish
    assert await ids(ColumnsRequest(since=mid, until=stored[20].finish)) == [s.id for s in newest_first
                                                                          if mid <= s.finish < stored[20].finish]
    assert await ids(ColumnsRequest(target="//pkg:t11", branch="nope")) == []


async def test_bad_requests_are_refused(stored, settings, nc) -> None:
    subject = Subjects(settings.namespace).endpoint("storage", "columns")
    for body, words in ((encode({"limit": 0}), "limit"), (b"\x93junk", "bad columns request"),
                        (encode({"since": 10.0, "until": 5.0}), "before since")):
        with pytest.raises(ColumnsError) as err:
            await micro.request(nc, subject, body, timeout=5, service="storage", error=ColumnsError)
        assert err.value.code == 400 and words in err.value.description
    # and the service goes on answering
    assert len(await _all(nc, settings, ColumnsRequest(), limit=3)) == 1


def test_the_row_cache_is_bounded_and_serves_what_a_fresh_reduction_gives(make_session) -> None:
    sessions = [make_session(i, targets=20) for i in range(50)]
    payloads = [encode(s) for s in sessions]
    sizes = [RowCache().reduce(p).size for p in payloads]
    cache = RowCache(max_bytes=sum(sizes[-10:]))  # room for the newest ten
    first = [cache.entry(p) for p in payloads]
    assert cache.misses == 50 and cache.bytes <= cache.max_bytes and len(cache.entries) == 10
    again = [cache.entry(p) for p in payloads[-10:]]  # the newest ten stayed: served without a decode
    assert cache.hits == 10 and [e.row for e in again] == [e.row for e in first[-10:]]
    fresh = RowCache()
    for p, e in zip(payloads, first, strict=True):
        f = fresh.entry(p)
        assert f.row == e.row and list(f.durations) == list(e.durations) and f.codes == e.codes
        assert [fresh.names.order[i] for i in f.ids] == [cache.names.order[i] for i in e.ids]


def test_the_session_id_is_read_from_the_first_bytes_or_not_at_all(make_session) -> None:
    s = make_session(1)
    payload = encode(s)
    assert peek_id(payload) == (s.id, len(payload))
    # Another writer's field order (id first): no guess, the record is decoded instead.
    reordered = msgspec.msgpack.encode({"id": s.id, **msgspec.to_builtins(s)})
    assert peek_id(reordered) is None
    cache = RowCache()
    assert cache.entry(reordered).row.id == s.id and cache.entry(reordered).row.id == s.id
    assert (cache.hits, cache.misses) == (0, 2)  # without the id up front, it is reduced each time


async def test_a_request_looks_at_a_bounded_number_of_sessions_and_the_client_goes_on(stored, settings, nc,
                                                                                      monkeypatch) -> None:
    """A filter the index cannot decide exactly (the VCS branch, which a "branch" label also matches
    in the index) stops a request once it has looked at SCAN_SESSIONS sessions (checked per chunk
    it takes from the index) with a cursor; following the cursors gives the whole answer."""
    from buildtel.services.storage import pages

    monkeypatch.setattr(pages, "SCAN_SESSIONS", 4)
    replies = await _all(nc, settings, ColumnsRequest(branch="dev"))
    assert len(replies) >= 2 and replies[0].cursor is not None  # stopped early, said where to go on
    newest_first = sorted(stored, key=lambda s: s.finish, reverse=True)
    assert [r.id for p in replies for r in p.sessions] == [s.id for s in newest_first
                                                            if s.environment.vcs.branch == "dev"]
