"""Trace queries over NATS (a ``nats.micro`` service) and the span tree ``buildtel trace`` prints.

Endpoints, on ``<ns>.traces.<name>`` (MessagePack bodies; errors as NATS micro
errors with ``Nats-Service-Error-Code`` 400/404/500):

* ``get``     ``{id: trace id, cursor}``    -> :class:`TraceReply`
* ``session`` ``{id: session id, cursor}``  -> :class:`TraceReply`
* ``find``    ``{id, cursor}``: a session id or a trace id -> :class:`TraceReply`
* ``recent``  ``{n}``                       -> :class:`RecentReply`
* ``stats``   ``{}``                        -> :class:`StatsReply`

A trace can be larger than one NATS message (a 10,000-target build is
~3 MB of spans), so replies carry at most ``REPLY_BUDGET`` bytes of spans plus
``next_cursor`` (the sort key of the last span sent); :class:`TraceClient`
follows it.  A key cursor rather than an offset, because spans of a live trace
keep arriving between pages: an offset would then repeat or skip spans.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from buildtel.services.tracer.store import TraceStore, TraceSummary, span_order
from buildtel.services.tracer.subjects import TracerSubjects
from buildtel.shared import micro
from buildtel.shared.micro import ServiceError
from buildtel.shared.tracemodel import STATUS_ERROR, STATUS_OK, SpanRecord

API_VERSION = "1.0.0"
ENDPOINTS = ("get", "session", "find", "recent", "stats")
REPLY_BUDGET = 700 * 1024  # below NATS' default 1 MiB max payload, with room for the envelope


class TraceRequest(msgspec.Struct, kw_only=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    cursor: tuple[int, int, str] | None = None  # (start_ns, end_ns, span_id) of the last span received


class RecentRequest(msgspec.Struct, kw_only=True):
    n: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20


class TraceReply(msgspec.Struct, kw_only=True):
    trace_id: str
    session_ids: list[str] = []
    spans: list[SpanRecord] = []
    total: int = 0
    next_cursor: tuple[int, int, str] | None = None


class _RawTraceReply(msgspec.Struct, kw_only=True):
    trace_id: str
    session_ids: list[str] = []
    spans: list[msgspec.Raw] = []
    total: int = 0
    next_cursor: tuple[int, int, str] | None = None


class RecentReply(msgspec.Struct, kw_only=True):
    traces: list[TraceSummary] = []


class StatsReply(msgspec.Struct, kw_only=True):
    traces: int = 0
    sessions: int = 0
    segments: int = 0
    disk_bytes: int = 0
    spans_stored: int = 0  # since the service started
    otlp_requests: int = 0
    otlp_rejected_spans: int = 0
    otlp_bad_requests: int = 0
    sessions_synthesized: int = 0
    bus_batches: int = 0
    dead_letters: int = 0
    forward_sent: int = 0
    forward_dropped: int = 0
    otlp_url: str = ""  # empty when the OTLP receiver is not listening
    version: str = API_VERSION


class QueryError(ServiceError):
    """The tracer refused or failed a query; ``code`` is HTTP-like (404 = no such trace)."""

    service = "tracer"


_enc = msgspec.msgpack.Encoder()
_trace_req = msgspec.msgpack.Decoder(TraceRequest)
_recent_req = msgspec.msgpack.Decoder(RecentRequest)
_trace_reply = msgspec.msgpack.Decoder(TraceReply)
_recent_reply = msgspec.msgpack.Decoder(RecentReply)
_stats_reply = msgspec.msgpack.Decoder(StatsReply)


# -- server side ------------------------------------------------------------------------------

def answer(store: TraceStore, endpoint: str, data: bytes) -> bytes:
    """The reply body for one request; raises :class:`QueryError` (the service maps it)."""
    try:
        if endpoint == "recent":
            req = _recent_req.decode(data or _enc.encode({}))
            return _enc.encode(RecentReply(traces=store.recent(req.n)))
        treq = _trace_req.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise QueryError(400, f"bad {endpoint} request: {exc}") from None
    wanted = treq.id.lower()
    if endpoint == "get":
        trace_id = wanted if wanted in store.traces else None
    elif endpoint == "session":
        trace_id = store.trace_of_session(wanted)
    else:
        trace_id = store.resolve(wanted)
    if trace_id is None:
        raise QueryError(404, f"no trace stored for {endpoint} {wanted!r}")
    spans = store.get_trace(trace_id)
    entry = store.traces.get(trace_id)
    page: list[msgspec.Raw] = []
    used = 0
    pos = 0 if treq.cursor is None else bisect.bisect_right(spans, tuple(treq.cursor), key=span_order)
    while pos < len(spans):
        raw = _enc.encode(spans[pos])
        if page and used + len(raw) > REPLY_BUDGET:
            break
        page.append(msgspec.Raw(raw))
        used += len(raw)
        pos += 1
    more = pos < len(spans)
    return _enc.encode(_RawTraceReply(trace_id=trace_id, session_ids=sorted(entry.sessions) if entry else [],
                                      spans=page, total=len(spans),
                                      next_cursor=span_order(spans[pos - 1]) if more else None))


# -- client side ------------------------------------------------------------------------------

@dataclass
class Trace:
    trace_id: str
    session_ids: list[str] = field(default_factory=list)
    spans: list[SpanRecord] = field(default_factory=list)


class TraceClient:
    """Ask the tracer service.  Raises :class:`QueryError`: the service's code, 503 when no
    tracer is running, 504 on timeout."""

    def __init__(self, nc: Any, tsubjects: TracerSubjects, *, timeout: float = 5.0) -> None:
        self.nc = nc
        self.tsubjects = tsubjects
        self.timeout = timeout

    async def _request(self, endpoint: str, body: bytes) -> bytes:
        return await micro.request(self.nc, self.tsubjects.endpoint(endpoint), body, timeout=self.timeout,
                                   service="tracer", error=QueryError)

    async def _trace(self, endpoint: str, any_id: str) -> Trace:
        cursor: tuple[int, int, str] | None = None
        out: Trace | None = None
        while True:
            body = _enc.encode(TraceRequest(id=any_id, cursor=cursor))
            reply = _trace_reply.decode(await self._request(endpoint, body))
            if out is None:
                out = Trace(reply.trace_id, reply.session_ids)
            out.spans.extend(reply.spans)
            if reply.next_cursor is None or not reply.spans:
                return out
            cursor = reply.next_cursor

    async def get(self, trace_id: str) -> Trace:
        return await self._trace("get", trace_id)

    async def session(self, session_id: str) -> Trace:
        return await self._trace("session", session_id)

    async def find(self, any_id: str) -> Trace:
        """The trace of a session id, or the trace with this trace id."""
        return await self._trace("find", any_id)

    async def recent(self, n: int = 20) -> list[TraceSummary]:
        return _recent_reply.decode(await self._request("recent", _enc.encode(RecentRequest(n=n)))).traces

    async def stats(self) -> StatsReply:
        return _stats_reply.decode(await self._request("stats", b""))


# -- rendering --------------------------------------------------------------------------------

def format_duration(ns: int) -> str:
    s = ns / 1e9
    if s < 1e-3:
        return f"{ns / 1e3:.0f}µs"
    if s < 1:
        return f"{s * 1e3:.1f}ms"
    if s < 60:
        return f"{s:.3f}s"
    minutes, rest = divmod(s, 60)
    return f"{int(minutes)}m{rest:04.1f}s"


def _status(span: SpanRecord) -> str:
    if span.status_code == STATUS_ERROR:
        return "ERROR" + (f": {span.status_message}" if span.status_message else "")
    return "OK" if span.status_code == STATUS_OK else ""


def _details(span: SpanRecord) -> str:
    bits = [f"{k.removeprefix('build.')}={span.attributes[k]}" for k in ("build.worker", "build.cache")
            if k in span.attributes]
    return ("  " + " ".join(bits)) if bits else ""


def render_tree(trace: Trace) -> str:
    """The span tree with offsets from the trace start, durations and statuses."""
    spans = trace.spans
    if not spans:
        return f"trace {trace.trace_id}: no spans"
    ids = {s.span_id for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    roots = []
    for s in spans:
        if s.parent_span_id and s.parent_span_id in ids and s.parent_span_id != s.span_id:
            children.setdefault(s.parent_span_id, []).append(s)
        else:
            roots.append(s)
    t0 = min(s.start_ns for s in spans)
    t1 = max(s.end_ns for s in spans)
    header = f"trace {trace.trace_id}"
    if trace.session_ids:
        header += f"  session {', '.join(trace.session_ids)}"
    lines = [f"{header}  {len(spans)} spans  {format_duration(t1 - t0)}",
             f"{'START':>10} {'DURATION':>10}  {'STATUS':<6}  SPAN"]
    seen: set[str] = set()

    def walk(span: SpanRecord, prefix: str, last: bool, depth: int, parent_service: str | None) -> None:
        if span.span_id in seen:  # a cycle in bad input must not loop forever
            return
        seen.add(span.span_id)
        branch = "" if depth == 0 else ("└─ " if last else "├─ ")
        name = span.name
        if span.service_name != parent_service:
            name += f"  [{span.service_name}]"
        if depth == 0 and span.parent_span_id:
            name += f"  (parent {span.parent_span_id} not in this trace)"
        status = _status(span)
        # Offsets in seconds throughout, so the START column reads as one time axis.
        lines.append(f"{f'+{(span.start_ns - t0) / 1e9:.3f}s':>10} {format_duration(span.duration_ns):>10}  "
                     f"{status.split(':')[0]:<6}  {prefix}{branch}{name}{_details(span)}"
                     + (f"  — {status.split(': ', 1)[1]}" if ": " in status else ""))
        kids = sorted(children.get(span.span_id, []), key=lambda s: (s.start_ns, s.name))
        child_prefix = prefix + ("" if depth == 0 else ("   " if last else "│  "))
        for i, kid in enumerate(kids):
            walk(kid, child_prefix, i == len(kids) - 1, depth + 1, span.service_name)

    for root in sorted(roots, key=lambda s: (s.start_ns, s.name)):
        walk(root, "", True, 0, None)
    return "\n".join(lines)
