"""Test cases across stored sessions: per-test figures, flaky tests, one test's runs (docs/tests.md).

Endpoints (``<ns>.storage.tests``, ``<ns>.storage.test_history``), MessagePack bodies of the
structs below, errors as the other storage endpoints (400 with the reason):

* ``tests``: over the newest ``sessions`` stored sessions that match the filters and hold test
  cases, one :class:`TestStat` per test (``suite::name``): runs by outcome, durations, and
  whether it is **flaky**: it both passed and failed (or errored) on the same commit — or, for
  sessions with no known commit, within the same session (a retry).  ``flake_rate`` = failed
  runs that share their commit with a pass / runs that passed or failed.  Sorted by
  ``sort``: ``flaky`` (flake rate, then failures), ``slowest`` (mean duration), ``failing``
  (failed runs) or ``name``.  With ``target``, the sessions read are the newest that built that
  target (the index's target filter) and only the runs attributed to it (``TestCase.target``,
  exact) count: a target page's figures are its own tests' over its own builds.
* ``test_history``: one test's newest runs (session, time, branch, commit, outcome, duration,
  message), newest first.

Sessions are read from the store (a stored session is the only place tests live); a session
without tests is skipped from its bytes, without decoding (the key ``tests`` never appears in
its MessagePack), and one with tests is decoded into a view of only the fields used here.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import msgspec

from buildtel.services.storage.api import StorageError
from buildtel.services.storage.index import Filters
from buildtel.shared import micro
from buildtel.shared.protocol import TestCase
from buildtel.shared.service import BAD_REQUEST, ServiceError
from buildtel.shared.subjects import Subjects

TESTS, TEST_HISTORY = "tests", "test_history"
MAX_SESSIONS = 20_000
MAX_TESTS = 10_000
EXAMPLES = 5  # example sessions of a flaky test
_TESTS_KEY = b"\xa5tests"  # the key `tests` as MessagePack writes it (fixstr of 5)

Time = Annotated[float, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
Sort = Literal["flaky", "slowest", "failing", "name"]


class TestsRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    __test__ = False

    since: Time | None = None  # session time (finish, else start), inclusive
    until: Time | None = None  # exclusive
    branch: Name | None = None
    name: Name | None = None  # session (build) name
    label: Name | None = None  # "key=value"
    test: Annotated[str, msgspec.Meta(max_length=4096)] = ""  # substring of the test id
    target: Name | None = None  # only runs of this build target (TestCase.target, exact)
    flaky: bool = False  # only flaky tests
    sort: Sort = "flaky"
    sessions: Annotated[int, msgspec.Meta(ge=1, le=MAX_SESSIONS)] = 1000
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_TESTS)] = 100


class TestStat(msgspec.Struct, kw_only=True):
    __test__ = False

    test: str  # "suite::name" ("name" without a suite)
    suite: str
    name: str
    runs: int = 0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    mean_duration_s: float = 0.0  # over runs that were not skipped
    max_duration_s: float = 0.0
    flaky: bool = False
    flaky_commits: int = 0  # commits (or sessions) on which it both passed and failed
    flake_rate: float = 0.0
    last_flake: float | None = None  # time of the newest failure that was a flake
    flaky_sessions: list[str] = []  # newest first, at most EXAMPLES
    last_outcome: str = ""
    last_run: float = 0.0
    last_session: str = ""


class TestsReply(msgspec.Struct, kw_only=True):
    sessions_read: int  # sessions with tests in the window read
    tests_total: int  # tests found before `flaky`/`limit`
    tests: list[TestStat]
    partial: list[str] = []  # "partial: partition k did not answer" (partitioned storage, router.py)


class TestHistoryRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    test: Name  # "suite::name"
    since: Time | None = None
    until: Time | None = None
    branch: Name | None = None
    sessions: Annotated[int, msgspec.Meta(ge=1, le=MAX_SESSIONS)] = 1000
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_TESTS)] = 200


class TestRun(msgspec.Struct, kw_only=True):
    __test__ = False

    session_id: str
    t: float
    branch: str | None
    commit: str | None
    outcome: str
    duration_s: float
    message: str = ""


class TestHistoryReply(msgspec.Struct, kw_only=True):
    test: str
    runs: list[TestRun]
    partial: list[str] = []  # "partial: partition k did not answer" (partitioned storage, router.py)


# Views: only what is used here is decoded (msgspec skips the rest of a stored session).
class _Vcs(msgspec.Struct):
    commit: str | None = None
    branch: str | None = None


class _Env(msgspec.Struct):
    vcs: _Vcs | None = None


class _View(msgspec.Struct):
    id: str
    start: float = 0.0
    finish: float = 0.0
    environment: _Env | None = None
    tests: list[TestCase] = []


_view_decoder = msgspec.msgpack.Decoder(_View)
tests_decoder = msgspec.msgpack.Decoder(TestsRequest)
test_history_decoder = msgspec.msgpack.Decoder(TestHistoryRequest)
tests_reply_decoder = msgspec.msgpack.Decoder(TestsReply)
test_history_reply_decoder = msgspec.msgpack.Decoder(TestHistoryReply)
_enc = msgspec.msgpack.Encoder()


def test_id(case: TestCase) -> str:
    return f"{case.suite}::{case.name}" if case.suite else case.name


def _decode(decoder: Any, what: str, data: bytes) -> Any:
    try:
        req = decoder.decode(data or b"\x80")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ServiceError(BAD_REQUEST, f"bad {what} request: {exc}") from None
    if req.since is not None and req.until is not None and req.until < req.since:
        raise ServiceError(BAD_REQUEST, f"bad {what} request: until {req.until} is before since {req.since}")
    return req


def _views(store: Any, summaries: list[Any]) -> list[tuple[Any, _View]]:
    """(summary, view) of each session holding tests, newest first (blocking: a worker thread)."""
    out = []
    for s in summaries:
        raw = store.read_summary(s)
        if raw is None or _TESTS_KEY not in raw:
            continue
        try:
            view = _view_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # stored by a version with another shape of these fields: not ours to judge
        if view.tests:
            out.append((s, view))
    return out


def stats(views: list[tuple[Any, _View]], needle: str = "", target: str | None = None) -> list[TestStat]:
    """Per-test figures and the flaky rule over ``views`` (newest first), of the runs whose id
    holds ``needle`` and (unless None) that ``target`` ran."""
    by_test: dict[str, TestStat] = {}
    # test -> commit (or session) -> [(t, session, outcome)]
    groups: dict[str, dict[str, list[tuple[float, str, str]]]] = {}
    durations: dict[str, float] = {}
    for s, v in views:
        vcs = v.environment.vcs if v.environment else None
        key = f"commit:{vcs.commit}" if vcs and vcs.commit else f"session:{v.id}"
        for c in v.tests:
            tid = test_id(c)
            if (needle and needle not in tid) or (target is not None and c.target != target):
                continue
            st = by_test.get(tid)
            if st is None:
                st = by_test[tid] = TestStat(test=tid, suite=c.suite, name=c.name, last_outcome=c.outcome,
                                             last_run=s.t, last_session=v.id)
            elif st.last_session == v.id:
                st.last_outcome = c.outcome  # a later run in the newest build (a retry): cases are in run order
            st.runs += 1
            if c.outcome == "passed":
                st.passed += 1
            elif c.outcome == "failed":
                st.failed += 1
            elif c.outcome == "error":
                st.errors += 1
            else:
                st.skipped += 1
                continue
            durations[tid] = durations.get(tid, 0.0) + c.duration_s
            st.max_duration_s = max(st.max_duration_s, c.duration_s)
            groups.setdefault(tid, {}).setdefault(key, []).append((s.t, v.id, c.outcome))
    for tid, st in by_test.items():
        ran = st.passed + st.failed + st.errors
        st.mean_duration_s = durations.get(tid, 0.0) / ran if ran else 0.0
        flakes: list[tuple[float, str]] = []
        for runs in groups.get(tid, {}).values():
            outcomes = {o for _, _, o in runs}
            if "passed" in outcomes and outcomes & {"failed", "error"}:
                st.flaky_commits += 1
                flakes += [(t, sid) for t, sid, o in runs if o != "passed"]
        if flakes:
            flakes.sort(reverse=True)
            st.flaky = True
            st.flake_rate = len(flakes) / ran
            st.last_flake = flakes[0][0]
            seen: list[str] = []
            for _, sid in flakes:
                if sid not in seen:
                    seen.append(sid)
                if len(seen) == EXAMPLES:
                    break
            st.flaky_sessions = seen
    return list(by_test.values())


_SORTS = {
    "flaky": lambda s: (-s.flake_rate, -(s.failed + s.errors), s.test),
    "slowest": lambda s: (-s.mean_duration_s, s.test),
    "failing": lambda s: (-(s.failed + s.errors), s.test),
    "name": lambda s: s.test,
}


def _filters(req: Any) -> Filters:
    return Filters(branch=req.branch, name=getattr(req, "name", None), label=getattr(req, "label", None),
                   target=getattr(req, "target", None), since=req.since, until=req.until)


def _fit(reply: Any, items: list[Any], budget: int, make: Any) -> bytes:
    """The reply encoded within ``budget`` bytes: fewer items when it would not fit."""
    while True:
        out = _enc.encode(make(items))
        if len(out) <= budget or len(items) <= 1:
            return out
        items = items[:len(items) * budget // len(out) * 9 // 10 or 1]


async def serve_tests(store: Any, data: bytes, budget: int) -> bytes:
    req: TestsRequest = _decode(tests_decoder, TESTS, data)
    summaries, _ = await store.summaries(_filters(req), desc=True, limit=req.sessions)
    views = await asyncio.to_thread(_views, store, summaries)
    all_stats = await asyncio.to_thread(stats, views, req.test, req.target)
    chosen = [s for s in all_stats if s.flaky] if req.flaky else all_stats
    chosen.sort(key=_SORTS[req.sort])
    chosen = chosen[:req.limit]
    return _fit(None, chosen, budget,
                lambda items: TestsReply(sessions_read=len(views), tests_total=len(all_stats), tests=items))


def runs_of(views: list[tuple[Any, _View]], test: str, limit: int) -> list[TestRun]:
    out = []
    for s, v in views:
        vcs = v.environment.vcs if v.environment else None
        for c in v.tests:
            if test_id(c) == test:
                out.append(TestRun(session_id=v.id, t=s.t, branch=vcs.branch if vcs else None,
                                   commit=vcs.commit if vcs else None, outcome=c.outcome,
                                   duration_s=c.duration_s, message=c.message))
                if len(out) >= limit:
                    return out
    return out


async def serve_test_history(store: Any, data: bytes, budget: int) -> bytes:
    req: TestHistoryRequest = _decode(test_history_decoder, TEST_HISTORY, data)
    summaries, _ = await store.summaries(_filters(req), desc=True, limit=req.sessions)
    views = await asyncio.to_thread(_views, store, summaries)
    runs = runs_of(views, req.test, req.limit)
    return _fit(None, runs, budget, lambda items: TestHistoryReply(test=req.test, runs=items))


# -- clients ----------------------------------------------------------------------------------
async def tests(nc: Any, subjects: Subjects, req: TestsRequest, *, timeout: float = 30.0) -> TestsReply:
    """Per-test figures from the storage service (raises ``StorageError``: 503 none answering, 400 bad)."""
    data = await micro.request(nc, subjects.endpoint("storage", TESTS), _enc.encode(req), timeout=timeout,
                               service="storage service", error=StorageError)
    return tests_reply_decoder.decode(data)


async def test_history(nc: Any, subjects: Subjects, req: TestHistoryRequest, *,
                       timeout: float = 30.0) -> TestHistoryReply:
    """One test's newest runs from the storage service."""
    data = await micro.request(nc, subjects.endpoint("storage", TEST_HISTORY), _enc.encode(req), timeout=timeout,
                               service="storage service", error=StorageError)
    return test_history_reply_decoder.decode(data)
