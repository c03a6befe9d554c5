"""The analyzer's bus API: request/reply messages, :class:`AnalyzerClient` and alert readers.

Requests go to the ``<ns>-analyzer`` NATS micro service (``<ns>.analyzer.report``,
``.stats`` and ``.flamegraph``); every replica listens in the same queue group, so each request
is answered by exactly one of them.  Bodies are MessagePack; errors come back as
micro errors (``Nats-Service-Error-Code``: 400 bad request, 413 reply too big
for one NATS message, 500 internal) and surface as :class:`AnalyzerError`.

Alerts are JetStream messages on ``<ns>.alerts.<kind>.<branch>.<target>``
(stream ``<NS>_ALERTS``, see ``subjects.py``); :func:`wait_for_alerts` and
:func:`follow_alerts` read them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any, Literal

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from buildtel.services.analyzer.alerts import Alert, alert_decoder
from buildtel.services.analyzer.analytics import AnalyticsReport, ReportFilter
from buildtel.services.analyzer.subjects import AnalyzerSubjects
from buildtel.shared import micro
from buildtel.shared.micro import ServiceError

API_VERSION = "1.0.0"
DAY_S = 86400.0
# Allowance per session a report may cover, on top of the client's timeout: the analyzer takes
# ~0.1-0.3 ms per 200-target session end to end (docs/performance.md); 2 ms leaves room for a
# slow or busy machine, so only a stalled request reaches it.
REPORT_S_PER_SESSION = 0.002


class ReportRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A report over a window of stored sessions; no window at all means "everything storage holds".

    The analyzer reads the window from the storage service (report rows, page by page), however
    large: ``last`` is bounded only by what storage holds.  Without storage it answers 503."""

    last: int | None = None
    since: float | None = None  # finish time, Unix s, inclusive
    until: float | None = None  # finish time, Unix s, exclusive
    branch: str | None = None
    outcome: Literal["success", "failed", "abandoned", "cancelled", "unknown"] | None = None
    name: str | None = None
    target: str | None = None
    include_sessions: bool = False  # add one row per session (for CSV export)
    top_targets: int | None = None  # keep only the N targets with the most total time
    critical_paths: int = 10  # most recent sessions whose critical paths are analysed
    speedup_pct: float = 50.0  # the what-if speed-up

    def filter(self) -> ReportFilter:
        return ReportFilter(last=self.last, since=self.since, until=self.until, branch=self.branch,
                            outcome=self.outcome, name=self.name, target=self.target)


class AnalyzerStats(msgspec.Struct, kw_only=True):
    sessions: int = 0  # sessions folded (each once)
    points: int = 0  # series points folded (each once)
    alerts: int = 0  # alerts committed (each once)
    late: int = 0  # points recorded but not fed to a detector (a redelivery long after newer ones)
    redelivered: int = 0  # session deliveries after the first (a replica died or was too slow)
    outbox: int = 0  # alerts committed but not yet confirmed published
    replica: str = ""  # the replica that answered
    version: str = API_VERSION


report_decoder = msgspec.msgpack.Decoder(AnalyticsReport)
request_decoder = msgspec.msgpack.Decoder(ReportRequest)
stats_decoder = msgspec.msgpack.Decoder(AnalyzerStats)
_enc = msgspec.msgpack.Encoder()


def alerts_stream_config(subjects: AnalyzerSubjects) -> StreamConfig:
    # Limits retention: alerts are history farms can replay; the one-day duplicate window is
    # what turns a republished alert (outbox sweep after a crash) into a no-op.
    return StreamConfig(name=subjects.alerts_stream, subjects=[subjects.alerts_all], retention=RetentionPolicy.LIMITS,
                        storage=StorageType.FILE, max_age=90 * DAY_S, max_msgs=1_000_000, max_bytes=1024**3,
                        duplicate_window=DAY_S)


async def ensure_alerts_stream(js: Any, subjects: AnalyzerSubjects, *, replicas: int | None = None) -> None:
    from buildtel.shared.bus import ensure_stream

    await ensure_stream(js, alerts_stream_config(subjects), replicas=replicas)


class AnalyzerError(ServiceError):
    service = "analyzer"


class AnalyzerClient:
    """Ask the analyzer service.  A request that times out or finds no responder (a replica died
    holding it, or replicas are restarting) is retried: reports are reads, so this is safe.

    ``timeout`` is the wait for a small request; a report's wait grows with its window (see
    :meth:`report_timeout`), so a valid report over a long history is never cut off by it."""

    def __init__(self, nc: Any, namespace: str, *, timeout: float = 30.0, attempts: int = 3) -> None:
        self.nc = nc
        self.namespace = namespace
        self.subjects = AnalyzerSubjects.of(namespace)
        self.timeout = timeout
        self.attempts = attempts

    async def _request(self, endpoint: str, body: bytes, timeout: float | None = None) -> bytes:
        # A replica killed mid-request leaves it unanswered: ask again (another replica answers).
        for attempt in range(self.attempts):
            try:
                return await micro.request(self.nc, self.subjects.endpoint(endpoint), body,
                                           timeout=timeout or self.timeout, service="analyzer", error=AnalyzerError)
            except AnalyzerError as exc:
                if exc.code not in (503, 504) or attempt == self.attempts - 1:
                    raise
                if exc.code == 503:
                    await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def report(self, request: ReportRequest | None = None, **kw: Any) -> AnalyticsReport:
        req = request or ReportRequest(**kw)
        timeout = await self.report_timeout(req)
        return report_decoder.decode(await self._request("report", _enc.encode(req), timeout))

    async def report_timeout(self, req: ReportRequest) -> float:
        """``timeout`` plus :data:`REPORT_S_PER_SESSION` for every session the window may hold:
        ``last``, at most what storage stores (asked of it; ``timeout`` alone when it does not answer,
        as the analyzer will then refuse at once)."""
        from buildtel.services.storage.api import StorageClient, StorageError
        from buildtel.shared.subjects import Subjects

        try:
            stored = (await StorageClient(self.nc, Subjects(self.namespace), timeout=min(5.0, self.timeout))
                      .stats()).sessions
        except StorageError:
            return self.timeout
        window = stored if req.last is None else min(max(req.last, 0), stored)
        return self.timeout + REPORT_S_PER_SESSION * window

    async def stats(self) -> AnalyzerStats:
        return stats_decoder.decode(await self._request("stats", b""))

    async def flamegraph(self, request: FlameGraphRequest | None = None, **kw: Any) -> FlameGraphReply:
        """A flame graph (or a session's chart) as SVG bytes; see :class:`FlameGraphRequest`."""
        req = request or FlameGraphRequest(**kw)
        return flame_reply_decoder.decode(await self._request("flamegraph", _enc.encode(req)))


async def follow_alerts(js: Any, namespace: str, *, branch: str | None = None, target: str | None = None,
                        kind: str | None = None, from_start: bool = True) -> AsyncGenerator[Alert, None]:
    """Yield alerts as they are published (from the stream's start, or only new ones)."""
    subjects = AnalyzerSubjects.of(namespace)
    # The analyzer declares the alerts stream; a follower (reader role) may not, so it waits for it.
    while True:
        try:
            await js.stream_info(subjects.alerts_stream)
            break
        except NotFoundError:
            await asyncio.sleep(1.0)
    sub = await js.subscribe(subjects.alerts_filter(kind=kind, branch=branch, target=target),
                             stream=subjects.alerts_stream, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except NatsTimeoutError:
                continue
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                yield alert_decoder.decode(msg.data)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def read_alerts(js: Any, namespace: str, *, branch: str | None = None, target: str | None = None,
                      kind: str | None = None, idle: float = 0.5) -> list[Alert]:
    """Every alert stored so far (matching the filters), oldest first."""
    subjects = AnalyzerSubjects.of(namespace)
    out: list[Alert] = []
    try:
        sub = await js.subscribe(subjects.alerts_filter(kind=kind, branch=branch, target=target),
                                 stream=subjects.alerts_stream, ordered_consumer=True)
    except Exception:  # noqa: BLE001 - no alerts stream yet: no alert was ever published
        return out
    try:
        # Nothing stored matches: say so at once instead of waiting ``idle`` for a first message.
        # (A consumer's counts are exact when it is created; none delivered and none pending.)
        with contextlib.suppress(Exception):
            info = await sub.consumer_info()
            if not info.num_pending and not (info.delivered and info.delivered.stream_seq):
                return out
        while True:
            try:
                msg = await sub.next_msg(timeout=idle)
            except NatsTimeoutError:
                return out
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                out.append(alert_decoder.decode(msg.data))
            meta = msg.metadata
            if meta is not None and meta.num_pending == 0:
                return out
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def wait_for_alerts(bus: Any, timeout: float, *, count: int | None = None, branch: str | None = None,
                          target: str | None = None, from_start: bool = False) -> list[Alert]:
    """Collect alerts for up to ``timeout`` seconds (or until ``count`` arrived).

    ``bus`` is anything with ``js`` and ``settings.namespace`` (``buildtel.cli.common.Bus``)
    or a JetStream context plus ``namespace=`` via :func:`follow_alerts` directly.
    """
    out: list[Alert] = []
    gen = follow_alerts(bus.js, bus.settings.namespace, branch=branch, target=target, from_start=from_start)

    async def collect() -> None:
        async for a in gen:
            out.append(a)
            if count is not None and len(out) >= count:
                return

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(collect(), timeout)
    await gen.aclose()
    return out


# -- flame graphs (``<ns>.analyzer.flamegraph``) ------------------------------------------------
# The request, the reply, and the one function that turns sessions into the SVG.  The function
# lives here, beside the messages, because ``buildtel flamegraph`` calls it too: the CLI and the
# endpoint then give byte-identical SVGs for the same sessions and options by construction.

FLAME_OPTIONS = ("title", "subtitle", "width", "height", "minwidth", "countname", "colors", "hash", "reverse",
                 "inverted", "flamechart", "negate", "search_data")


class FlameGraphSelection(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Which sessions: one ``session`` (full id or a unique prefix of >= 6 hex digits), or a window
    like a report's (``last``/``since``/``until``/``branch``/``outcome``/``target``; none = the whole
    history).  ``target`` (sessions that ran it) was added later: unset, a request means what it did."""

    session: str | None = None
    last: int | None = None
    since: float | None = None  # finish time, Unix s, inclusive
    until: float | None = None  # finish time, Unix s, exclusive
    branch: str | None = None
    outcome: Literal["success", "failed", "abandoned", "cancelled", "unknown"] | None = None
    target: str | None = None

    def filter(self) -> ReportFilter:
        return ReportFilter(last=self.last, since=self.since, until=self.until, branch=self.branch,
                            outcome=self.outcome, target=self.target)


class FlameGraphRequest(FlameGraphSelection, kw_only=True, omit_defaults=True):
    """A flame graph of the selected sessions' targets (by package path, integer microseconds).

    ``diff`` draws a differential against another selection (red slower, blue faster; widths from
    ``diff_widths``, ``normalize`` scales the base to the same total (unset: when the two sides
    cover different numbers of sessions), ``diff_color`` colours by
    self or subtree change).  ``chart`` draws one session's timeline instead.  The option fields
    are flamegraph.pl's (``buildtel.shared.flamegraph.FlameGraphOptions``).  ``folded`` adds the stacks.
    """

    diff: FlameGraphSelection | None = None
    diff_widths: Literal["after", "before"] = "after"
    diff_color: Literal["self", "total"] = "self"
    normalize: bool | None = None  # unset: on when the two sides cover different numbers of sessions
    chart: bool = False
    folded: bool = False
    title: str | None = None
    subtitle: str = ""
    width: int = 1200
    height: int = 16
    minwidth: float | str = 0.1
    countname: str | None = None
    colors: str = "cache"  # by the targets' cache result (shared/flamegraph/build.py); or a flamegraph.pl palette
    hash: bool = False
    reverse: bool = False
    inverted: bool = False
    flamechart: bool = False
    negate: bool = False
    search_data: bool = True  # the endpoint turns it off by itself when the SVG would not fit


class FlameGraphReply(msgspec.Struct, kw_only=True):
    svg: bytes
    folded: str | None = None  # the selection's stacks (not the base's), when asked for
    sessions: int = 0
    base_sessions: int = 0
    total_us: int = 0
    search_data: bool = True  # False when it was dropped to fit one NATS message
    partial: bool = False
    notes: list[str] = []


flame_reply_decoder = msgspec.msgpack.Decoder(FlameGraphReply)
flame_request_decoder = msgspec.msgpack.Decoder(FlameGraphRequest)
