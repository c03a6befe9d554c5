"""``tests``, ``test_history`` and ``failures`` over partitioned storage, merged exactly (router.py).

These reports group across sessions (a test is flaky when it passed and failed on one commit,
possibly in builds stored on different partitions; the flaky failure rule compares commits
across builds) over a window of the newest ``sessions`` builds overall, so no partition can
answer its part alone.  Each partition answers an internal request on its own subject only
(``<ns>.storage.p<k>.tests_part`` / ``failures_part`` / ``passed_part``):

* ``tests_part``: one row per session of its newest ``sessions`` matching the filters, newest
  first: (t, id, branch, commit, whether it holds tests, its test cases that match ``test`` and,
  when given, ``target``; with a target the window is the sessions that built it).
  Rows of sessions without tests are a key only: the router needs every key to cut the window.
* ``failures_part``: the same rows with each session's classified failures, compacted to what
  grouping reads (target, signature, class, rule, first error line).
* ``passed_part``: which of the given (commit, target) pairs were built successfully in its
  sessions at or after the window's cut (the flaky rule's other half, asked in a second round
  once the router knows every failure of the window).

Each reply stays within the reply budget: rows are paged (a cursor of the last row's key), and a
session whose cases or failures alone do not fit is split over pages (``case``: how many of
them were sent); the router joins the parts.  The router sorts all rows by (t, id), newest
first, keeps a session stored twice (across a change of P) once, cuts at the newest
``sessions``, and runs the single store's own code (``tests_history.stats``/``runs_of``,
``failures.group``) on the result: the answer is what one store holding every session gives.
Cost: every row of every partition's window crosses the bus once per query.  A session stored
between the two rounds of ``failures`` may count as a pass for the flaky rule.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import msgspec

from buildtel.services.storage import failures as fl
from buildtel.services.storage import tests_history as th
from buildtel.services.storage.index import Filters
from buildtel.shared.failclass import Rule
from buildtel.shared.protocol import TestCase
from buildtel.shared.service import BAD_REQUEST, ServiceError

TESTS_PART, FAILURES_PART, PASSED_PART = "tests_part", "failures_part", "passed_part"
_SLACK = 512  # bytes of a reply besides its rows


class PartCursor(msgspec.Struct, array_like=True):
    t: float
    id: str
    case: int = 0  # >0: resume inside this session after that many cases (or failures)


class Window(msgspec.Struct, kw_only=True, omit_defaults=True):
    since: float | None = None
    until: float | None = None
    branch: str | None = None
    name: str | None = None
    label: str | None = None
    target: str | None = None  # sessions that built this target (``tests`` with a target)
    sessions: int = 1000


class TestsPartRequest(msgspec.Struct, kw_only=True):
    __test__ = False

    window: Window
    test: str = ""  # a substring of the test id, or (exact) the test id
    exact: bool = False
    target: str | None = None  # only cases of this build target (exact; None: any)
    cursor: PartCursor | None = None


class TestRow(msgspec.Struct, array_like=True):
    __test__ = False

    t: float
    id: str
    branch: str | None
    commit: str | None
    has_tests: bool
    tests: list[TestCase]


class TestsPartReply(msgspec.Struct):
    rows: list[TestRow]
    cursor: PartCursor | None = None


class FailuresPartRequest(msgspec.Struct, kw_only=True):
    window: Window
    cursor: PartCursor | None = None


class Fail(msgspec.Struct, array_like=True):
    """What ``failures.group`` reads of a TargetFailure (``errors``: the first line only)."""

    target: str
    signature: str | None
    failure_class: str | None
    class_rule: str
    errors: list[str]


class FailRow(msgspec.Struct, array_like=True):
    t: float
    id: str
    commit: str | None
    failures: list[Fail]


class FailuresPartReply(msgspec.Struct):
    rows: list[FailRow]
    cursor: PartCursor | None = None


class PassedPartRequest(msgspec.Struct, kw_only=True):
    window: Window
    cut: tuple[float, str]  # the oldest key of the merged window
    pairs: list[tuple[str, str]]  # (commit, target)


class PassedPartReply(msgspec.Struct):
    passed: list[tuple[str, str]]


_enc = msgspec.msgpack.Encoder()
_dec: dict[str, Any] = {TESTS_PART: msgspec.msgpack.Decoder(TestsPartRequest), FAILURES_PART: msgspec.msgpack.Decoder(
    FailuresPartRequest), PASSED_PART: msgspec.msgpack.Decoder(PassedPartRequest)}
_tests_reply = msgspec.msgpack.Decoder(TestsPartReply)
_fail_reply = msgspec.msgpack.Decoder(FailuresPartReply)
_passed_reply = msgspec.msgpack.Decoder(PassedPartReply)


def _decode(endpoint: str, data: bytes) -> Any:
    try:
        return _dec[endpoint].decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ServiceError(BAD_REQUEST, f"bad {endpoint} request: {exc}") from None


def _filters(w: Window) -> Filters:
    return Filters(branch=w.branch, name=w.name, label=w.label, target=w.target, since=w.since, until=w.until)


def _resume(summaries: list[Any], cursor: PartCursor | None) -> tuple[int, int]:
    """Where a page starts in ``summaries`` (newest first): (index, items of it already sent)."""
    if cursor is None:
        return 0, 0
    key = (cursor.t, cursor.id)
    for i, s in enumerate(summaries):
        if s.key == key and cursor.case > 0:
            return i, cursor.case
        if s.key < key:
            return i, 0
    return len(summaries), 0


def _page(rows: list[tuple[Any, Any, list[Any], int]], budget: int, make: Any) -> tuple[list[Any], PartCursor | None]:
    """Rows within ``budget``: (summary, row without items, items, items sent before) each; a
    row too large alone is split (its first items, the cursor inside it)."""
    out: list[Any] = []
    total = _SLACK
    for s, row, items, skip in rows:
        items = items[skip:]
        size = len(_enc.encode(make(row, items)))
        if total + size <= budget:
            out.append(make(row, items))
            total += size
            continue
        if out:
            last = out[-1]
            return out, PartCursor(last.t, last.id)
        take, used = 0, len(_enc.encode(make(row, []))) + _SLACK
        for it in items:
            used += len(_enc.encode(it))
            if used > budget and take:
                break
            take += 1
        out.append(make(row, items[:take]))
        return out, (PartCursor(s.t, s.id, skip + take) if take < len(items) else PartCursor(s.t, s.id))
    return out, None


def missing(k: int) -> str:
    return f"partial: partition {k} did not answer"


def _failures_of(store: Any, s: Any, rules: tuple[Rule, ...]) -> list[Any]:
    """As ``failures.read`` reads one session's failures."""
    if not (s.failed or s.outcome in ("failed", "cancelled")):
        return []
    raw = store.read_summary(s)
    if raw is None:
        return []
    try:
        return fl.counted(fl._session_decoder.decode(raw), rules)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []


# -- a partition's part -----------------------------------------------------------------------
async def serve_tests_part(store: Any, data: bytes, budget: int) -> bytes:
    req: TestsPartRequest = _decode(TESTS_PART, data)
    summaries, _ = await store.summaries(_filters(req.window), desc=True, limit=req.window.sessions)
    start, skip = _resume(summaries, req.cursor)

    def build() -> bytes:
        rows = []
        for n, s in enumerate(summaries[start:]):
            views = th._views(store, [s])
            v = views[0][1] if views else None
            vcs = v.environment.vcs if v is not None and v.environment else None
            cases = [c if req.exact else msgspec.structs.replace(c, message="") for c in (v.tests if v else [])
                     if (th.test_id(c) == req.test if req.exact else req.test in th.test_id(c))
                     and (req.target is None or c.target == req.target)]
            rows.append((s, (s.t, s.id, vcs.branch if vcs else None, vcs.commit if vcs else None, v is not None),
                         cases, skip if n == 0 else 0))
        page, cursor = _page(rows, budget, lambda r, items: TestRow(r[0], r[1], r[2], r[3], r[4], items))
        return _enc.encode(TestsPartReply(rows=page, cursor=cursor))

    return await asyncio.to_thread(build)


async def serve_failures_part(store: Any, data: bytes, budget: int, rules: tuple[Rule, ...]) -> bytes:
    req: FailuresPartRequest = _decode(FAILURES_PART, data)
    summaries, _ = await store.summaries(_filters(req.window), desc=True, limit=req.window.sessions)
    start, skip = _resume(summaries, req.cursor)

    def build() -> bytes:
        rows = []
        for n, s in enumerate(summaries[start:]):
            items = [Fail(f.target, f.signature, f.failure_class, f.class_rule, f.errors[:1])
                     for f in _failures_of(store, s, rules)]
            rows.append((s, (s.t, s.id, s.commit), items, skip if n == 0 else 0))
        page, cursor = _page(rows, budget, lambda r, items: FailRow(r[0], r[1], r[2], items))
        return _enc.encode(FailuresPartReply(rows=page, cursor=cursor))

    return await asyncio.to_thread(build)


async def serve_passed_part(store: Any, data: bytes) -> bytes:
    req: PassedPartRequest = _decode(PASSED_PART, data)
    summaries, _ = await store.summaries(_filters(req.window), desc=True, limit=req.window.sessions)
    cut = tuple(req.cut)
    inside = [s for s in summaries if s.key >= cut]
    wanted = {(c, t) for c, t in req.pairs}

    def build() -> bytes:
        return _enc.encode(PassedPartReply(passed=sorted(fl.passed_pairs(store, inside, wanted))))

    return await asyncio.to_thread(build)


# -- the router's merge -----------------------------------------------------------------------
class _At(NamedTuple):
    t: float


async def _rows(router: Any, endpoint: str, req: Any, decoder: Any, items: str) -> tuple[list[Any], list[str]]:
    """Every answering partition's rows (paged, split rows joined), and the partial notes."""
    async def every(k: int) -> list[Any] | ServiceError:
        out: list[Any] = []
        cursor = None
        while True:
            got = await router._one(k, endpoint, _enc.encode(msgspec.structs.replace(req, cursor=cursor)))
            if isinstance(got, ServiceError):
                return got
            reply = decoder.decode(got)
            for row in reply.rows:
                if out and out[-1].id == row.id:
                    getattr(out[-1], items).extend(getattr(row, items))  # the rest of a split session
                else:
                    out.append(row)
            if reply.cursor is None or not reply.rows:
                return out
            cursor = reply.cursor

    return joined(await asyncio.gather(*(every(k) for k in range(router.partitions))))


def joined(answers: list[Any]) -> tuple[list[Any], list[str]]:
    """Each partition's rows (its answer, in partition order) joined, and the partial notes of
    those that did not answer; any other refusal is the answer."""
    rows: list[Any] = []
    partial: list[str] = []
    for k, a in enumerate(answers):
        if isinstance(a, ServiceError):
            if a.code not in (503, 504):
                raise a
            partial.append(missing(k))
        else:
            rows += a
    return rows, partial


def _window(rows: list[Any], n: int) -> list[Any]:
    """The newest ``n`` sessions overall, newest first, each once."""
    rows.sort(key=lambda r: (r.t, r.id), reverse=True)
    seen: set[str] = set()
    out = []
    for r in rows:
        if r.id not in seen:
            seen.add(r.id)
            out.append(r)
            if len(out) == n:
                break
    return out


def _views(rows: list[TestRow]) -> list[tuple[Any, Any]]:
    return [(_At(r.t), th._View(id=r.id, environment=th._Env(vcs=th._Vcs(commit=r.commit, branch=r.branch)),
                                tests=r.tests)) for r in rows if r.has_tests]


async def tests(router: Any, data: bytes) -> bytes:
    req: th.TestsRequest = th._decode(th.tests_decoder, th.TESTS, data)
    window = Window(since=req.since, until=req.until, branch=req.branch, name=req.name, label=req.label,
                    target=req.target, sessions=req.sessions)
    rows, partial = await _rows(router, TESTS_PART, TestsPartRequest(window=window, test=req.test, target=req.target),
                                _tests_reply, "tests")
    views = _views(_window(rows, req.sessions))
    all_stats = await asyncio.to_thread(th.stats, views, req.test, req.target)
    chosen = [s for s in all_stats if s.flaky] if req.flaky else all_stats
    chosen.sort(key=th._SORTS[req.sort])
    return th._fit(None, chosen[:req.limit], router.budget(), lambda items: th.TestsReply(
        sessions_read=len(views), tests_total=len(all_stats), tests=items, partial=partial))


async def test_history(router: Any, data: bytes) -> bytes:
    req: th.TestHistoryRequest = th._decode(th.test_history_decoder, th.TEST_HISTORY, data)
    window = Window(since=req.since, until=req.until, branch=req.branch, sessions=req.sessions)
    rows, partial = await _rows(router, TESTS_PART, TestsPartRequest(window=window, test=req.test, exact=True),
                                _tests_reply, "tests")
    runs = th.runs_of(_views(_window(rows, req.sessions)), req.test, req.limit)
    return th._fit(None, runs, router.budget(),
                   lambda items: th.TestHistoryReply(test=req.test, runs=items, partial=partial))


async def failures(router: Any, data: bytes) -> bytes:
    req = fl._decode(data)
    window = Window(since=req.since, until=req.until, branch=req.branch, name=req.name, label=req.label,
                    sessions=req.sessions)
    rows, partial = await _rows(router, FAILURES_PART, FailuresPartRequest(window=window), _fail_reply, "failures")
    kept = _window(rows, req.sessions)
    found: list[fl.Failure] = [(r.t, r.id, r.commit, f) for r in kept for f in r.failures]
    wanted = sorted({(c, f.target) for _, _, c, f in found if c and f.failure_class in ("code", "unknown")})
    passed: set[tuple[str, str]] = set()
    if wanted:
        cut = (kept[-1].t, kept[-1].id)
        chunks: list[list[tuple[str, str]]] = [[]]
        size = _SLACK
        for pair in wanted:  # requests within the budget too
            n = len(pair[0]) + len(pair[1]) + 16
            if chunks[-1] and size + n > router.budget():
                chunks.append([])
                size = _SLACK
            chunks[-1].append(pair)
            size += n
        for k in range(router.partitions):
            if missing(k) in partial:
                continue
            for chunk in chunks:
                got = await router._one(k, PASSED_PART, _enc.encode(PassedPartRequest(window=window, cut=cut,
                                                                                      pairs=chunk)))
                if isinstance(got, ServiceError):
                    if got.code not in (503, 504):
                        raise got
                    partial.append(missing(k))
                    break
                passed.update((c, t) for c, t in _passed_reply.decode(got).passed)
    groups = fl.group(found, passed)
    chosen = [g for g in groups if (req.failure_class is None or g.failure_class == req.failure_class)
              and (not req.match or req.match in g.signature or any(req.match in t for t in g.targets))]
    return fl._fit(lambda items: fl.FailuresReply(sessions_read=len({sid for _, sid, _, _ in found}),
                                                  failures_total=len(found), groups_total=len(groups),
                                                  groups=items, partial=partial), chosen[:req.limit], router.budget())
