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

import sys
from array import array
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec

from buildtel.services.storage.api import Cursor
from buildtel.shared import micro
from buildtel.shared.codec import encode
from buildtel.shared.protocol import HealthCheckpoint, Outcome, SessionTotals
from buildtel.shared.subjects import Subjects

ENDPOINT = "columns"
MAX_PAGE_SESSIONS = 10_000
CACHE_CODES = {"local_hit": 1, "remote_hit": 1, "miss": 0, "uncacheable": 2}
STATUS_CODES = {"success": 0, "failed": 1, "skipped": 2, "cancelled": 3}
STATUSES = ("success", "failed", "skipped", "cancelled")

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
    partial: list[str] = []  # partitions that did not answer (docs/scaling.md, Partitions)


request_decoder = msgspec.msgpack.Decoder(ColumnsRequest)
reply_decoder = msgspec.msgpack.Decoder(ColumnsReply)


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
