"""The storage query API: request/reply messages and :class:`StorageClient`.

The storage service answers NATS requests (a ``nats.micro`` service named
``<ns>-storage``) on ``<ns>.storage.get|recent|range|query|stats`` (and ``columns``, the
report rows of ``columns.py``).  Bodies are
MessagePack (buildtel.shared.codec) of the structs below; an empty request body means
"all defaults".  Errors come back as NATS micro errors: headers
``Nats-Service-Error-Code`` (400 bad request, 404 not found, 413 a single
session larger than a NATS message, 500 internal) and ``Nats-Service-Error``
(description); the client raises them as :class:`StorageError`.

A session larger than one reply (``get`` answers 413) is read in parts: ``chunk``
returns the stored bytes from an offset, as many as one reply holds, with the
total size; :meth:`StorageClient.get` does this by itself and reassembles.

Lists are keyset-paginated: a reply carries at most what fits in one NATS
message plus a ``cursor`` when more may follow; :class:`StorageClient` follows
cursors for you, so ``recent(500)`` returns 500 sessions even though no
single reply could hold them.  A session too large for any page comes as
``oversized`` (its id, in its place in the order, in a page of its own), and
the client fetches it with ``get``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from nats.aio.client import Client as NATS

from buildtel.shared import micro
from buildtel.shared.codec import decode_session, encode
from buildtel.shared.micro import ServiceError
from buildtel.shared.protocol import BuildSession, Outcome
from buildtel.shared.subjects import Subjects

API_VERSION = "1.1.0"  # 1.1: `chunk`, and `oversized` in list replies
ENDPOINTS = ("get", "chunk", "recent", "range", "query", "summaries", "stats")
MAX_ITEMS = 10_000  # per request; the client pages beyond one reply's worth by itself

Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_ITEMS)]
Time = Annotated[float, msgspec.Meta(ge=0)]


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    """Where the previous page stopped: the (finish time, id) of its last session."""

    t: float
    id: str


class GetRequest(msgspec.Struct, kw_only=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class ChunkRequest(msgspec.Struct, kw_only=True):
    """Part of a stored session's bytes, from ``offset`` (as many as one reply holds)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


class ChunkReply(msgspec.Struct, kw_only=True):
    size: int  # of the whole stored session
    offset: int
    data: bytes


class RecentRequest(msgspec.Struct, kw_only=True):
    n: Count = 20
    cursor: Cursor | None = None


class RangeRequest(msgspec.Struct, kw_only=True):
    start: Time
    end: Time
    limit: Count | None = None
    cursor: Cursor | None = None


class QueryRequest(msgspec.Struct, kw_only=True):
    outcome: Outcome | None = None
    branch: str | None = None
    agent: str | None = None
    target: str | None = None
    since: Time | None = None  # finish time, inclusive
    until: Time | None = None  # finish time, exclusive
    limit: Count = 100
    cursor: Cursor | None = None
    name: str | None = None
    label: str | None = None  # "key=value"


class SummariesRequest(msgspec.Struct, kw_only=True):
    """Compact summaries of the sessions matching every given filter (no record is read)."""

    outcome: Outcome | None = None
    branch: str | None = None
    agent: str | None = None  # an agent id, or a machine (its "machine/pid.start" agents too)
    name: str | None = None
    label: str | None = None  # "key=value"
    target: str | None = None
    since: Time | None = None  # finish time, inclusive
    until: Time | None = None  # finish time, exclusive
    order: Literal["newest", "oldest"] = "newest"
    limit: Count = 100
    cursor: Cursor | None = None


class SessionSummary(msgspec.Struct, kw_only=True):
    """One stored session in a line: what lists, dashboards and scripts need of it."""

    id: str
    name: str = ""
    start: float = 0.0
    finish: float = 0.0
    duration_s: float = 0.0
    outcome: str = "success"
    exit_code: int | None = None
    branch: str | None = None
    commit: str | None = None
    agents: list[str] = []
    labels: dict[str, str] = {}
    targets: int = 0
    failed: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_hit_rate: float = 0.0
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None
    up_to_date: int | None = None
    complete: bool = True
    incomplete_reasons: list[str] = []  # the first reason the completeness record gives, if any
    more_reasons: int = 0  # reasons beyond the first
    stored_bytes: int = 0


class SummariesReply(msgspec.Struct, kw_only=True):
    summaries: list[SessionSummary] = []
    cursor: Cursor | None = None


class StatsRequest(msgspec.Struct, kw_only=True):
    pass


class SessionsReply(msgspec.Struct, kw_only=True):
    """A page of sessions; ``cursor`` set means ask again with it for more."""

    sessions: list[BuildSession] = []
    cursor: Cursor | None = None
    oversized: str | None = None  # the id of the next session, too large for a page: `get` it


class RawSessionsReply(msgspec.Struct, kw_only=True):
    """What the service encodes: the same layout as :class:`SessionsReply`, with stored bytes
    spliced in as they are on disk (no decode/re-encode, fields newer than the service kept)."""

    sessions: list[msgspec.Raw] = []
    cursor: Cursor | None = None
    oversized: str | None = None


class StatsReply(msgspec.Struct, kw_only=True):
    sessions: int = 0
    segments: int = 0
    disk_bytes: int = 0
    oldest: float | None = None
    newest: float | None = None
    damaged_regions: int = 0  # found when the store was opened
    stored: int = 0  # since the service started
    duplicates: int = 0
    dead_letters: int = 0
    max_sessions: int = 0
    retention_s: float = 0.0
    version: str = API_VERSION
    open_s: float = 0.0  # how long opening the store took (index files, else scans)
    unverified_segments: int = 0  # opened from index files, not yet checksummed (verify runs after open)


REQUEST_TYPES: dict[str, type[msgspec.Struct]] = {
    "get": GetRequest, "chunk": ChunkRequest, "recent": RecentRequest, "range": RangeRequest,
    "query": QueryRequest, "summaries": SummariesRequest, "stats": StatsRequest,
}
_decoders = {name: msgspec.msgpack.Decoder(t) for name, t in REQUEST_TYPES.items()}
_sessions_decoder = msgspec.msgpack.Decoder(SessionsReply)
_stats_decoder = msgspec.msgpack.Decoder(StatsReply)
_summaries_decoder = msgspec.msgpack.Decoder(SummariesReply)
_chunk_decoder = msgspec.msgpack.Decoder(ChunkReply)
_EMPTY_MAP = encode({})


def endpoint_subject(subjects: Subjects, endpoint: str) -> str:
    return subjects.endpoint("storage", endpoint)


def decode_request(endpoint: str, data: bytes) -> Any:
    """The request struct for ``endpoint``; raises msgspec errors naming the bad field."""
    return _decoders[endpoint].decode(data or _EMPTY_MAP)


class StorageError(ServiceError):
    """The storage service refused or failed a request; ``code`` is HTTP-like (404 = not found)."""

    service = "storage"

    @property
    def not_found(self) -> bool:
        return self.code == 404


class StorageClient:
    """Ask the storage service over NATS.  Every method raises :class:`StorageError` on failure:
    the service's code and description, 503 when no storage service is running, 504 on timeout."""

    def __init__(self, nc: NATS, subjects: Subjects, *, timeout: float = 5.0) -> None:
        self.nc = nc
        self.subjects = subjects
        self.timeout = timeout

    async def _request(self, endpoint: str, req: msgspec.Struct) -> bytes:
        return await micro.request(self.nc, endpoint_subject(self.subjects, endpoint), encode(req),
                                   timeout=self.timeout, service="storage service", error=StorageError)

    async def get(self, session_id: str) -> BuildSession:
        """The stored session; ``StorageError`` with ``not_found`` when it is not stored.  One
        larger than a reply is fetched in parts (``chunk``) and reassembled."""
        try:
            data = await self._request("get", GetRequest(id=session_id))
        except StorageError as exc:
            if exc.code != 413:
                raise
            data = await self.get_raw_chunked(session_id)
        return decode_session(data)

    async def get_raw_chunked(self, session_id: str) -> bytes:
        """A stored session's bytes, fetched in parts of one reply each."""
        parts: list[bytes] = []
        offset, size = 0, None
        while size is None or offset < size:
            try:
                reply = _chunk_decoder.decode(await self._request("chunk", ChunkRequest(id=session_id, offset=offset)))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise StorageError(500, f"malformed reply from storage: {exc}") from None
            if size is None:
                size = reply.size
            if reply.size != size or reply.offset != offset or (not reply.data and offset < size):
                raise StorageError(500, f"session {session_id} changed or stalled while read in parts "
                                        f"(size {size} -> {reply.size}, offset {offset} -> {reply.offset})")
            parts.append(reply.data)
            offset += len(reply.data)
        return b"".join(parts)

    async def recent(self, n: int = 20) -> list[BuildSession]:
        """The ``n`` most recently finished sessions, newest first."""
        return await self._pages(lambda cur, left: RecentRequest(n=min(left, MAX_ITEMS), cursor=cur),
                                 "recent", n)

    async def range(self, start: float, end: float, *, limit: int | None = None) -> list[BuildSession]:
        """Sessions that finished in ``[start, end)``, oldest first (all of them unless ``limit``)."""
        return await self._pages(
            lambda cur, left: RangeRequest(start=start, end=end, cursor=cur,
                                           limit=None if left is None else min(left, MAX_ITEMS)),
            "range", limit)

    async def query(self, *, outcome: str | None = None, branch: str | None = None, agent: str | None = None,
                    target: str | None = None, since: float | None = None, until: float | None = None,
                    limit: int = 100) -> list[BuildSession]:
        """Sessions matching every given filter, newest first (at most ``limit``)."""
        return await self._pages(
            lambda cur, left: QueryRequest(outcome=outcome, branch=branch, agent=agent,  # type: ignore[arg-type]
                                           target=target, since=since, until=until,
                                           limit=min(left, MAX_ITEMS), cursor=cur),
            "query", limit)

    async def summaries(self, *, outcome: str | None = None, branch: str | None = None, agent: str | None = None,
                        name: str | None = None, label: str | None = None, target: str | None = None,
                        since: float | None = None, until: float | None = None, order: str = "newest",
                        limit: int = 100) -> list[SessionSummary]:
        """Compact summaries of the matching sessions (at most ``limit``), newest first unless
        ``order="oldest"``; pages through the service's replies."""
        out: list[SessionSummary] = []
        cursor: Cursor | None = None
        while len(out) < limit:
            req = SummariesRequest(outcome=outcome, branch=branch, agent=agent, name=name, label=label,  # type: ignore[arg-type]
                                   target=target, since=since, until=until, order=order,  # type: ignore[arg-type]
                                   limit=min(limit - len(out), MAX_ITEMS), cursor=cursor)
            try:
                reply = _summaries_decoder.decode(await self._request("summaries", req))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise StorageError(500, f"malformed reply from storage: {exc}") from None
            out.extend(reply.summaries)
            if reply.cursor is None or not reply.summaries:
                break
            cursor = reply.cursor
        return out

    async def exists(self, session_id: str) -> bool:
        """Whether the session is stored, asking for its first part only (never the whole session)."""
        try:
            await self._request("chunk", ChunkRequest(id=session_id, offset=0))
        except StorageError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    async def stats(self) -> StatsReply:
        return _stats_decoder.decode(await self._request("stats", StatsRequest()))

    async def _pages(self, make: Any, endpoint: str, limit: int | None) -> list[BuildSession]:
        out: list[BuildSession] = []
        cursor: Cursor | None = None
        while limit is None or len(out) < limit:
            left = None if limit is None else limit - len(out)
            try:
                reply = _sessions_decoder.decode(await self._request(endpoint, make(cursor, left)))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise StorageError(500, f"malformed reply from storage: {exc}") from None
            out.extend(reply.sessions)
            if reply.oversized is not None:
                out.append(await self.get(reply.oversized))
            if reply.cursor is None or not (reply.sessions or reply.oversized):
                break
            cursor = reply.cursor
        return out
