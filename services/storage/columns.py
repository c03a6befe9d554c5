"""Report rows: what a report needs of each stored session, read without decoding whole sessions.

The analyzer's reports used to fetch whole ``BuildSession``\\ s (tens of KB each, most of it
environment, commands, deps and phases the report never reads).  The storage service's
``columns`` endpoint (``<ns>.storage.columns``) answers instead with, per session, one small
:class:`ReportRow` (times, outcome, branch and commit, completeness, totals, cache figures, the
last health checkpoint) and, per target, flat columns packed as bytes: a name id into the page's
own name table, the duration and one code byte (cache result and status).  That is ~13 bytes
a target instead of ~150, decoded here by :class:`ReportView`, a partial view of the stored
record that skips every field the report does not read.

Pages are newest first (finish time, then id, like ``query``), keyset-paginated by
``cursor`` and bounded in bytes below one NATS message; :func:`column_pages` follows the
cursors.  Filters are the report's (``analytics.ReportFilter`` without ``last``, which is the
caller's ``limit``): ``branch`` is the build's VCS branch, ``name`` its build name.

Wire layout of the columns (little-endian, one entry per target, sessions in page order and
each session's targets in stored order): ``name_ids`` uint32, ``durations`` float64,
``codes`` uint8 = cache code (0 miss, 1 hit, 2 uncacheable) | status code << 2 (0 success,
1 failed, 2 skipped, 3 cancelled).
"""

from __future__ import annotations

import asyncio
import sys
from array import array
from collections.abc import AsyncIterator
from operator import attrgetter
from typing import Annotated, Any, Literal

import msgspec

from buildtel.services.storage.api import Cursor
from buildtel.services.storage.index import Filters
from buildtel.shared import micro
from buildtel.shared.codec import encode
from buildtel.shared.protocol import HealthCheckpoint, Outcome, SessionTotals
from buildtel.shared.service import TOO_LARGE, ServiceError
from buildtel.shared.subjects import Subjects

ENDPOINT = "columns"
MAX_PAGE_SESSIONS = 10_000
CACHE_CODES = {"local_hit": 1, "remote_hit": 1, "miss": 0, "uncacheable": 2}
STATUS_CODES = {"success": 0, "failed": 1, "skipped": 2, "cancelled": 3}
STATUSES = ("success", "failed", "skipped", "cancelled")
SCAN_BYTES = 64 * 1024 * 1024  # stored bytes one request reads at most (filters that match little)
_ROW_BYTES = 160  # a row without its strings and health checkpoint, encoded (an estimate for paging)
_TARGET_BYTES = 13  # 4 + 8 + 1

Time = Annotated[float, msgspec.Meta(ge=0)]


class ColumnsRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One page of report rows, newest first; every filter is optional and they combine with AND."""

    since: Time | None = None  # finish time, inclusive
    until: Time | None = None  # finish time, exclusive
    branch: str | None = None  # VCS branch
    outcome: Outcome | None = None
    name: str | None = None  # build name
    target: str | None = None  # sessions that ran this target
    agent: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE_SESSIONS)] = MAX_PAGE_SESSIONS
    cursor: Cursor | None = None


class ReportRow(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    """What a report reads of one session besides its targets (``BuildSession`` field names)."""

    id: str
    name: str = ""
    start: float = 0.0
    finish: float = 0.0
    duration_s: float = 0.0
    outcome: str = "success"
    branch: str | None = None
    commit: str | None = None
    complete: bool = True  # BuildSession.completeness (None reads as complete, see is_complete)
    cache_hits: int = 0
    cache_misses: int = 0
    cache_hit_rate: float = 0.0
    totals: SessionTotals = msgspec.field(default_factory=SessionTotals)
    targets: int = 0  # how many column entries belong to this session
    health: HealthCheckpoint | None = None


class ColumnsReply(msgspec.Struct, kw_only=True):
    """A page: ``cursor`` set means ask again with it for more."""

    sessions: list[ReportRow] = []
    names: list[str] = []
    name_ids: bytes = b""
    durations: bytes = b""
    codes: bytes = b""
    cursor: Cursor | None = None


# -- the partial view of a stored BuildSession ---------------------------------------------------
class _Target(msgspec.Struct, array_like=True, gc=False):
    """The first six fields of ``TargetMetrics`` (array_like: the rest of the array is skipped)."""

    name: str
    start: float = 0.0
    end: float = 0.0
    duration_s: float = 0.0
    status: Literal["success", "failed", "skipped", "cancelled"] = "success"
    cache: Literal["local_hit", "remote_hit", "miss", "uncacheable"] = "miss"


class _MapTarget(msgspec.Struct, gc=False):
    """A target as records written before ``TargetMetrics`` became array_like encoded it."""

    name: str = ""
    duration_s: float = 0.0
    status: Literal["success", "failed", "skipped", "cancelled"] = "success"
    cache: Literal["local_hit", "remote_hit", "miss", "uncacheable"] = "miss"


class _Vcs(msgspec.Struct, gc=False):
    branch: str | None = None
    commit: str | None = None


class _Env(msgspec.Struct, gc=False):
    vcs: _Vcs | None = None


class _Completeness(msgspec.Struct, gc=False):
    complete: bool = True


class _ViewBase(msgspec.Struct, kw_only=True, tag="session", tag_field="type", gc=False):
    """The fields of ``BuildSession`` a report reads, same names and defaults; the rest is skipped."""

    id: str
    name: str = ""
    start: float = 0.0
    finish: float = 0.0
    duration_s: float = 0.0
    outcome: str = "success"
    environment: _Env | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    cache_hit_rate: float = 0.0
    totals: SessionTotals = msgspec.field(default_factory=SessionTotals)
    health: HealthCheckpoint | None = None
    completeness: _Completeness | None = None


class ReportView(_ViewBase, kw_only=True, tag="session", tag_field="type", gc=False):
    targets: list[_Target] = []


class _AnyTargetsView(_ViewBase, kw_only=True, tag="session", tag_field="type", gc=False):
    # Arrays as the protocol encodes targets now, maps as records written before TargetMetrics
    # became array_like (a second, slower decoder: only such records pay for it).
    targets: list[_Target | dict[str, msgspec.Raw]] = []


view_decoder = msgspec.msgpack.Decoder(ReportView)
_any_view_decoder = msgspec.msgpack.Decoder(_AnyTargetsView)
request_decoder = msgspec.msgpack.Decoder(ColumnsRequest)
reply_decoder = msgspec.msgpack.Decoder(ColumnsReply)
_enc = msgspec.msgpack.Encoder()
_map_target = msgspec.msgpack.Decoder(_MapTarget)
_name, _dur, _status, _cache = (attrgetter("name"), attrgetter("duration_s"), attrgetter("status"),
                                attrgetter("cache"))
_STATUS_BITS = {k: v << 2 for k, v in STATUS_CODES.items()}


def decode_view(payload: bytes) -> tuple[_ViewBase, list[Any]]:
    """The view of a stored session and its targets (objects with name, duration_s, status, cache)."""
    try:
        v = view_decoder.decode(payload)
        return v, v.targets
    except msgspec.ValidationError:
        w = _any_view_decoder.decode(payload)
    # Old map-encoded targets: re-encode the few fields read and decode them as a struct.
    return w, [t if isinstance(t, _Target) else _map_target.decode(_enc.encode(t)) for t in w.targets]


class _Interner(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> int:
        v = self[key] = len(self)
        return v


class PageBuilder:
    """Accumulates rows and columns of one reply; ``size`` estimates its encoded bytes."""

    def __init__(self, req: ColumnsRequest) -> None:
        self.req = req
        self.rows: list[ReportRow] = []
        self.names = _Interner()
        self.ids = array("I")
        self.durations = array("d")
        self.codes = bytearray()
        self.size = 64
        self.last: Cursor | None = None  # key of the last row added, when it has one

    def matches(self, v: _ViewBase) -> bool:
        """The filters storage's index cannot decide exactly (name, VCS branch, finish bounds)."""
        r = self.req
        if r.name is not None and v.name != r.name:
            return False
        if r.branch is not None:
            vcs = v.environment.vcs if v.environment is not None else None
            if vcs is None or vcs.branch != r.branch:
                return False  # the index also matches a "branch" label; reports mean the VCS branch
        if r.since is not None and v.finish < r.since:
            return False
        return r.until is None or v.finish < r.until

    def add(self, payload: bytes) -> int | None:
        """Add one stored session; its estimated bytes, or None when the filters leave it out."""
        v, ts = decode_view(payload)
        if not self.matches(v):
            return None
        if self.req.target is not None and not any(t.name == self.req.target for t in ts):
            return None  # a 32-bit hash collision in the index
        known = len(self.names)
        self.ids.extend(map(self.names.__getitem__, map(_name, ts)))
        self.durations.extend(map(_dur, ts))
        codes = bytes(map(CACHE_CODES.__getitem__, map(_cache, ts)))
        statuses = list(map(_status, ts))
        if statuses.count("success") != len(statuses):  # rare: only then is the status merged in
            codes = bytes(c | _STATUS_BITS[st] for c, st in zip(codes, statuses, strict=True))
        self.codes += codes
        vcs = v.environment.vcs if v.environment is not None else None
        row = ReportRow(id=v.id, name=v.name, start=v.start, finish=v.finish, duration_s=v.duration_s,
                        outcome=sys.intern(v.outcome), branch=vcs.branch if vcs else None,
                        commit=vcs.commit if vcs else None,
                        complete=v.completeness is None or v.completeness.complete, cache_hits=v.cache_hits,
                        cache_misses=v.cache_misses, cache_hit_rate=v.cache_hit_rate, totals=v.totals,
                        targets=len(ts), health=v.health)
        self.rows.append(row)
        added = _ROW_BYTES + len(v.id) + len(v.name) + 2 * 40 + _TARGET_BYTES * len(ts)
        if len(self.names) > known:
            added += sum(len(n) + 5 for n in list(self.names)[known:])
        if v.health is not None:
            added += 256 + sum(len(r) + 3 for r in v.health.reasons)
        self.size += added
        # Storage orders by finish (start when there is none): the key to resume after this row.
        t = v.finish if v.finish > 0 else v.start
        self.last = Cursor(t, v.id) if t > 0 else None
        return added

    def encode(self, cursor: Cursor | None) -> bytes:
        ids, durs = self.ids, self.durations
        if sys.byteorder != "little":  # the wire is little-endian
            ids, durs = array("I", ids), array("d", durs)
            ids.byteswap()
            durs.byteswap()
        return _enc.encode(ColumnsReply(sessions=self.rows, names=list(self.names), name_ids=ids.tobytes(),
                                        durations=durs.tobytes(), codes=bytes(self.codes), cursor=cursor))


def decode_ids(data: bytes) -> array[int]:
    a = array("I")
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def decode_durations(data: bytes) -> array[float]:
    a = array("d")
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a


class ColumnsError(Exception):
    """The storage service refused or failed a ``columns`` request (HTTP-like ``code``)."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"storage error {code}: {description}")
        self.code = code
        self.description = description


async def column_pages(nc: Any, subjects: Subjects, req: ColumnsRequest, *, limit: int | None = None,
                       timeout: float = 10.0) -> AsyncIterator[ColumnsReply]:
    """Every page of ``req``'s window, newest first, at most ``limit`` sessions in all; each
    request has its own ``timeout`` (a long window is many short requests, never one long one).
    Raises :class:`ColumnsError` (503 when no storage service answers, 504 on a timeout)."""
    subject = subjects.endpoint("storage", ENDPOINT)
    got = 0
    cursor = req.cursor
    while limit is None or got < limit:
        page_req = msgspec.structs.replace(req, cursor=cursor, limit=min(
            MAX_PAGE_SESSIONS, req.limit, MAX_PAGE_SESSIONS if limit is None else limit - got))
        data = await micro.request(nc, subject, encode(page_req), timeout=timeout, service="storage service",
                                   error=ColumnsError)
        try:
            page = reply_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ColumnsError(500, f"malformed columns reply from storage: {exc}") from None
        got += len(page.sessions)
        yield page
        if page.cursor is None:  # a page may be empty yet have a cursor: it scanned its share
            return
        cursor = page.cursor


# -- the service side ------------------------------------------------------------------------------
def _add_all(b: PageBuilder, payloads: list[bytes], budget: int, per_session: list[int]) -> int:
    """Add payloads while the reply stays within ``budget``; how many were consumed.
    ``per_session`` is [sessions added, their bytes, the largest]: the estimates that size chunks."""
    for i, payload in enumerate(payloads):
        if b.rows and b.last is not None and b.size + per_session[2] > budget:
            return i  # the next one might not fit: resume after the last row
        added = b.add(payload)
        if added is not None:
            per_session[0] += 1
            per_session[1] += added
            per_session[2] = max(per_session[2], added)
    return len(payloads)


async def serve_page(store: Any, req: ColumnsRequest, budget: int) -> bytes:
    """One reply of the ``columns`` endpoint from ``store`` (a ``TelemetryStorage``): stored records
    are read through ``store.page`` in small chunks and reduced to rows as they come, so the
    request holds one chunk of whole records at a time, and the reply stays within ``budget``."""
    f = Filters(outcome=req.outcome, branch=req.branch, agent=req.agent, target=req.target, since=req.since,
                until=req.until)
    b = PageBuilder(req)
    cursor: tuple[float, str] | None = (req.cursor.t, req.cursor.id) if req.cursor else None
    per_session = [1, _ROW_BYTES, _ROW_BYTES]
    scanned = 0
    out: Cursor | None = None
    while True:
        room = req.limit - len(b.rows)
        avg = per_session[1] / per_session[0]
        chunk = max(1, min(room, 512, int((budget - b.size) // max(avg, 1.0))))
        page = await store.page(f, desc=True, limit=chunk, cursor=cursor)
        used = await asyncio.to_thread(_add_all, b, page.payloads, budget, per_session)
        if used < len(page.payloads):
            out = b.last  # stopped for size: resume after the last row taken
            break
        cursor = page.cursor
        scanned += sum(map(len, page.payloads))
        if cursor is None:
            break  # nothing more matches
        if len(b.rows) >= req.limit or scanned >= SCAN_BYTES:
            out = Cursor(*cursor)
            break
    data = await asyncio.to_thread(b.encode, out)
    if len(data) > budget:
        raise ServiceError(TOO_LARGE, f"the report rows of session {b.rows[-1].id} are {len(data)} bytes, more "
                                      f"than one reply may carry ({budget})")
    return data
