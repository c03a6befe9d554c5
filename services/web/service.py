"""The web service: the HTTP API of ``app.py`` on ``settings.http_host``, answered over NATS.

It keeps no history of its own: a list is a storage ``summaries`` request, a session a storage
``get`` (a prefix is resolved against the stored ids first), a report the analyzer's ``report``
and alerts are read from the alerts stream; what people decide about alerts (acknowledged, muted:
``shared/alertstate.py``) is the one thing it writes, to Redis, for keys with the write scope.
It connects to NATS as its own role ``web`` (``shared/auth.py``): query requests and reading
alerts, nothing that changes history.

Requests carry an API key (``shared/apikeys.py``, ``buildtel keys``) as a bearer token; the key
names its tenant (a namespace), whose storage and analyzer are asked, so one web service serves
several tenants (as far as its NATS role reaches: the embedded stack grants one namespace).
``BUILDER_TELEMETRY_HTTP_TOKEN``, when set, is also accepted, for this service's own namespace.
With neither keys nor token the API is open on loopback (the start-up log says so); binding
beyond loopback without them is refused.

The live stream (``GET /api/v1/stream``) and the per-tenant build figures of ``/metrics`` come
from one feed per tenant (``stream.py``, ``figures.py``): the service's own namespace and every
tenant an API key names are followed from the start, others when a client first asks.

The port is ``port``, else ``settings.web_port``, else ``default_port`` (``buildtel up``: any
free port, recorded in ``stack.json``; ``buildtel serve web``: 8480).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from typing import Any, ClassVar, TypeVar

import msgspec

from buildtel.services.analyzer.alerts import Alert
from buildtel.services.analyzer.api import AnalyzerClient, AnalyzerError, ReportRequest, read_alerts
from buildtel.services.storage import history
from buildtel.services.storage.api import (
    MAX_ITEMS,
    SessionSummary,
    StorageClient,
    StorageError,
    SummariesReply,
    SummariesRequest,
    endpoint_subject,
)
from buildtel.services.storage.history import TargetHistoryRequest, TrendReply, TrendRequest
from buildtel.services.web import artifacts, failures_api, tests_api
from buildtel.services.web.app import create_app
from buildtel.services.web.base import (
    BadGateway,
    Forbidden,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from buildtel.services.web.figures import families
from buildtel.services.web.query import (
    BUCKETS,
    FULL_LEN,
    AlertsQuery,
    BadInput,
    ReportQuery,
    SessionsQuery,
    TargetHistoryQuery,
    TrendsQuery,
    decode_cursor,
    encode_cursor,
    parse_duration,
)
from buildtel.services.web.schema import (
    MAX_LIMIT,
    AlertPage,
    AlertWithState,
    Caller,
    Health,
    SessionPage,
    TargetHistory,
)
from buildtel.services.web.stream import Hub, Stream, TooMany
from buildtel.shared import alertstate, apikeys, micro
from buildtel.shared import metrics as metrics_http
from buildtel.shared.auth import is_loopback
from buildtel.shared.codec import encode
from buildtel.shared.httpserver import DEFAULT_LIMITS, start_site
from buildtel.shared.keyed import keyed
from buildtel.shared.keys import SHARDS, Keys
from buildtel.shared.protocol import BuildSession
from buildtel.shared.service import BusService, Worker
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

T = TypeVar("T")
_summaries = msgspec.msgpack.Decoder(SummariesReply)
SHOWN_CANDIDATES = 8
TENANTS_EVERY_S = 30.0  # how often the tenants API keys name are looked up (their feeds started)


class InsecureBind(ValueError):
    """Refusing to serve the API beyond loopback without a token."""




class WebService(BusService):
    name: ClassVar[str] = "web"
    description: ClassVar[str] = "HTTP API over the stack's sessions, reports and alerts"

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *, port: int | None = None,
                 default_port: int = 0, metrics_port: int | None = None) -> None:
        super().__init__(settings, nats_url, redis_url, metrics_port=metrics_port)
        self.requested_port = port if port is not None else (
            settings.web_port if settings.web_port is not None else default_port)
        self.host = settings.http_host
        self.port = 0
        self.keyed = False  # whether API keys existed at start (the start-up log says so)
        self.hub: Hub | None = None  # the live feeds (stream.py), made once connected
        self.hub_options: dict[str, Any] = {}  # Hub limits (tests lower them)

    @property
    def url(self) -> str:
        """``http://host:port`` once started (the real port when it was 0)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def prepare(self, stack: AsyncExitStack) -> None:
        # Before listening: a configuration that would expose the API to anyone is refused.
        self.keyed = await apikeys.any_keys(self.redis, self.keys)
        if not is_loopback(self.host) and not self.settings.http_token and not self.keyed:
            raise InsecureBind(f"the web API would listen on {self.host}, beyond loopback, without keys: create "
                               "one with 'buildtel keys create --tenant T --scope read' (or set "
                               "BUILDER_TELEMETRY_HTTP_TOKEN), or bind to 127.0.0.1")
        hub = self.hub = Hub(self.js, self.log, **self.hub_options)
        hub.feed(self.settings.namespace)  # its figures count from the start, client or not
        stack.push_async_callback(hub.stop)  # its feeds stop even if the server below fails to start
        app = create_app(self, log=self.log, max_body_bytes=DEFAULT_LIMITS.max_body_bytes)
        artifacts.register(app)  # flame graphs, diffs, recordings
        tests_api.register(app)  # test results, flaky tests
        failures_api.register(app)  # failures by signature and class
        runner = await start_site(app, self.host, self.requested_port)
        stack.push_async_callback(runner.cleanup)
        stack.push_async_callback(hub.stop)  # streams end (with a comment) before the server closes
        self.port = runner.addresses[0][1]

    def workers(self) -> list[Worker]:
        return [Worker("tenants", self._follow_tenants)]

    async def _follow_tenants(self) -> None:
        """Start the feed of every tenant an API key names (their build figures), now and then."""
        while not self.stopping.is_set():
            try:
                for key in await apikeys.list_keys(self.redis, self.keys):
                    if self.hub is not None and key.tenant not in self.hub.feeds:
                        self.hub.feed(key.tenant)
            except TooMany:
                pass  # logged by the hub
            except Exception as exc:  # noqa: BLE001 - Redis away: the next round tries again
                self.log.warning("web.tenants_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), TENANTS_EVERY_S)

    def counters(self) -> dict[str, float]:
        hub = self.hub
        if hub is None:
            return {}
        return {"sse_clients": hub.clients, "sse_events_sent_total": hub.events_sent,
                "sse_slow_clients_dropped_total": hub.clients_dropped["slow"],
                "sse_streams_stopped_total": hub.clients_dropped["shutdown"],
                "feed_undecodable_total": hub.undecodable, "feeds": len(hub.feeds)}

    async def metric_families(self, tenant: str | None = None) -> list[Any]:
        """The build figures (``figures.py``) of every followed tenant, or of ``tenant`` only."""
        hub = self.hub
        if hub is None:
            return []
        figures = {t: f.figures for t, f in hub.feeds.items() if tenant is None or t == tenant}
        active: dict[str, float] = {}
        for t in figures:
            try:
                # Sharded (shared/keys.py): the sum of every shard's set, in one round trip.
                pipe = self.redis.pipeline(transaction=False)
                for n in range(SHARDS):
                    pipe.zcard(Keys(t).active(n))
                active[t] = float(sum(await pipe.execute()))
            except Exception:  # noqa: BLE001 - Redis away: unknown, not zero
                active[t] = float("nan")
        return list(families(figures, active))

    # -- the live stream and /metrics of app.py ------------------------------------------------
    async def open_stream(self, tenant: str, start: tuple[int, int] | None) -> Stream:
        if self.hub is None:
            raise Unavailable("the web service is not started")
        try:
            return await self.hub.open(tenant, start)
        except TooMany as exc:
            if exc.per_tenant:
                raise RateLimited(str(exc), 5.0) from None
            raise Unavailable(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - NATS away: the client learns it, the service goes on
            raise Unavailable(f"the streams could not be read from NATS: {type(exc).__name__}") from None

    async def serve_stream(self, stream: Any, write: Any, closed: Any, abort: Any) -> None:
        if self.hub is not None:
            await self.hub.serve(stream, write, closed, abort)

    async def metrics_text(self, tenant: str) -> bytes:
        """The tenant's build figures only: a key sees nothing of other tenants, and the service's
        own counters stay on the operator's metrics port."""
        return metrics_http.render_families(await self.metric_families(tenant))

    async def started_fields(self) -> dict[str, Any]:
        auth = "api keys" if self.keyed else "token" if self.settings.http_token else \
            "open: no API key or token configured (loopback only)"
        return {"url": self.url, "auth": auth}

    # -- the Backend of app.py -----------------------------------------------------------------
    async def authorize(self, header: str | None, need: apikeys.Scope = "read") -> Caller:
        """Who asks, for which tenant.  The service's own token (``http_token``) may do anything in
        this namespace; with no key and no token at all, a loopback API is open on this namespace.
        A key acts on its tenant only, so another tenant's session is simply not found (404)."""
        given = header[7:].strip() if header and header[:7].lower() == "bearer " else ""
        token = self.settings.http_token
        if token and hmac.compare_digest(given.encode(), token.encode()):
            return Caller(tenant=self.settings.namespace, who="token")
        try:
            keyed = await apikeys.any_keys(self.redis, self.keys)
            record = await apikeys.verify(self.redis, self.keys, given) if keyed and given else None
            if record is not None and apikeys.allows(record.scope, need):
                wait = await apikeys.over_limit(self.redis, self.keys, record.id, self.settings.web_rate_limit)
            else:
                wait = None
        except Exception as exc:  # noqa: BLE001 - Redis away: refuse (never open), say why
            raise Unavailable(f"API keys cannot be checked: {type(exc).__name__}") from None
        if not keyed and not token and is_loopback(self.host):
            return Caller(tenant=self.settings.namespace, who="open")  # on loopback, while no key exists
        if record is None:
            raise Unauthorized("missing, unknown or revoked API key (send 'Authorization: Bearer <key>')")
        if not apikeys.allows(record.scope, need):
            wanted = {"write": "'write' or 'admin'", "admin": "'admin'"}.get(need, f"{need!r} or 'admin'")
            raise Forbidden(f"key {record.id} has scope {record.scope!r}; this request needs {wanted}")
        if wait is not None:
            raise RateLimited(f"key {record.id} made more than {self.settings.web_rate_limit} requests this "
                              "minute", wait)
        return Caller(tenant=record.tenant, who=record.id)

    def health(self) -> Health:
        up = bool(self.nc is not None and self.nc.is_connected)
        return Health(status="ok" if up else "degraded", nats=up)

    async def sessions(self, tenant: str, q: SessionsQuery, since: float | None, until: float | None) -> SessionPage:
        cursor = decode_cursor(q.cursor)
        out: list[SessionSummary] = []
        partial: set[str] = set()
        while True:  # one storage reply holds what fits in a NATS message: ask until the page is full
            req = SummariesRequest(outcome=q.outcome, branch=q.branch, agent=q.agent, name=q.name, label=q.label,
                                   target=q.target, since=since, until=until, order=q.order,
                                   limit=q.limit - len(out), cursor=cursor)
            reply = _summaries.decode(await self._storage_request(tenant, "summaries", req))
            out.extend(reply.summaries)
            partial.update(reply.partial)
            cursor = reply.cursor
            if cursor is None or not reply.summaries or len(out) >= q.limit:
                break
        return SessionPage(sessions=out, next_cursor=encode_cursor(cursor), partial=sorted(partial))

    async def session(self, tenant: str, id_or_prefix: str) -> Any:
        return keyed(await self.session_struct(tenant, id_or_prefix))

    async def session_struct(self, tenant: str, id_or_prefix: str) -> BuildSession:
        sid = id_or_prefix if len(id_or_prefix) == FULL_LEN else await self._resolve_prefix(tenant, id_or_prefix)
        try:
            return await StorageClient(self.nc, Subjects(tenant)).get(sid)
        except StorageError as exc:
            raise self._storage_failure(exc, f"no session {sid} is stored") from None

    async def build_log(self, tenant: str, id_or_prefix: str) -> bytes:
        """The stored session's console log, decompressed (``docs/failures.md``)."""
        from buildtel.shared.bigmsg import ObjectUnusable
        from buildtel.shared.buildlog import decompress
        from buildtel.shared.logstore import get_log

        s = await self.session_struct(tenant, id_or_prefix)
        if s.log is None or not s.log.object:
            why = s.log.error if s.log is not None and s.log.error else "the build ran without log capture"
            raise NotFound(f"session {s.id} has no build log: {why}")
        try:
            data = await get_log(self.js, Subjects(tenant), s.log.object)
        except ObjectUnusable as exc:
            raise NotFound(f"the build log of session {s.id} is damaged: {exc.reason}") from None
        if data is None:
            raise NotFound(f"the build log of session {s.id} is no longer stored")
        return decompress(data)

    async def session_id(self, tenant: str, word: str) -> str:
        """The full stored id a full id or a unique prefix names (``artifacts.py``)."""
        return word if len(word) == FULL_LEN else await self._resolve_prefix(tenant, word)

    async def trace_spans(self, tenant: str, id_or_prefix: str) -> list[Any]:
        """The spans of a stored session's trace, from the tracer."""
        from buildtel.services.tracer.query import QueryError, TraceClient
        from buildtel.services.tracer.subjects import TracerSubjects

        sid = id_or_prefix if len(id_or_prefix) == FULL_LEN else await self._resolve_prefix(tenant, id_or_prefix)
        try:
            return (await TraceClient(self.nc, TracerSubjects(Subjects(tenant))).session(sid)).spans
        except QueryError as exc:
            if exc.code == 404:
                raise NotFound(f"no trace is stored for session {sid}") from None
            if exc.code in (503, 504):
                raise Unavailable(f"the tracer did not answer: {exc}") from None
            raise BadGateway(f"the tracer failed the request: {exc}") from None

    async def _resolve_prefix(self, tenant: str, prefix: str) -> str:
        """The one stored id starting with ``prefix`` (the summaries carry ids without targets)."""
        matches: list[SessionSummary] = []
        cursor = None
        while True:
            reply = _summaries.decode(await self._storage_request(
                tenant, "summaries", SummariesRequest(limit=MAX_ITEMS, cursor=cursor)))
            matches.extend(s for s in reply.summaries if s.id.startswith(prefix))
            cursor = reply.cursor
            if cursor is None or not reply.summaries:
                break
        ids = sorted({s.id for s in matches})
        if not ids:
            raise NotFound(f"no stored session id starts with {prefix}")
        if len(ids) > 1:
            shown = ", ".join(i[:12] + "…" for i in ids[:SHOWN_CANDIDATES])
            raise BadInput(f"prefix {prefix} is ambiguous: {len(ids)} session ids start with it ({shown}); "
                           "give more digits")
        return ids[0]

    async def report(self, tenant: str, q: ReportQuery, since: float | None, until: float | None) -> Any:
        req = ReportRequest(last=q.last, since=since, until=until, branch=q.branch, outcome=q.outcome,
                            name=q.name, target=q.target)
        try:
            return keyed(await AnalyzerClient(self.nc, tenant, attempts=1).report(req))
        except AnalyzerError as exc:
            if exc.code == 400:
                raise BadInput(exc.description) from None
            if exc.code in (503, 504):
                raise Unavailable(f"the analyzer did not answer: {exc.description}") from None
            raise BadGateway(f"the analyzer failed the report: {exc.description}") from None

    async def alerts(self, tenant: str, q: AlertsQuery) -> AlertPage:
        found = list(reversed(await self._read_alerts(tenant, branch=q.branch, target=q.target, kind=q.kind)))
        out: list[AlertWithState] = []
        mutes = await self.redis_call(alertstate.mutes(self.redis, Keys(tenant)))
        for start in range(0, len(found), 500):  # states in pages: one MGET each
            chunk = found[start:start + 500]
            out.extend(a for a in await self._with_states(tenant, chunk, mutes)
                       if q.status is None or a.state.status == q.status)
            if len(out) >= q.limit:
                break
        return AlertPage(alerts=out[:q.limit])

    async def alert(self, tenant: str, alert_id: str) -> AlertWithState:
        return (await self._with_states(tenant, [await self._find_alert(tenant, alert_id)]))[0]

    async def _find_alert(self, tenant: str, alert_id: str) -> Alert:
        for a in await self._read_alerts(tenant):
            if a.id == alert_id:
                return a
        raise NotFound(f"no alert {alert_id}")

    async def change_alert(self, caller: Caller, alert_id: str, action: str, body: Any) -> AlertWithState:
        """Acknowledge, unacknowledge, mute or unmute (``action``) the alert, as ``caller``."""
        found = await self._find_alert(caller.tenant, alert_id)
        keys = Keys(caller.tenant)
        series = alertstate.series_key(found.kind, found.branch, found.target)
        match action:
            case "acknowledge":
                await self.redis_call(alertstate.acknowledge(self.redis, keys, alert_id, by=caller.who,
                                                              note=body.note))
            case "unacknowledge":
                await self.redis_call(alertstate.unacknowledge(self.redis, keys, alert_id))
            case "mute":
                seconds = parse_duration(body.duration)
                try:
                    await alertstate.mute(self.redis, keys, series, seconds=seconds, by=caller.who, note=body.note)
                except ValueError as exc:
                    raise BadInput(f"field 'duration': {exc}") from None
                except Exception as exc:  # noqa: BLE001 - Redis away
                    raise Unavailable(f"Redis did not answer: {type(exc).__name__}") from None
            case "unmute":
                await self.redis_call(alertstate.unmute(self.redis, keys, series))
        self.log.info("web.alert_changed", tenant=caller.tenant, alert_id=alert_id, action=action, by=caller.who)
        return (await self._with_states(caller.tenant, [found]))[0]

    async def _read_alerts(self, tenant: str, **filters: str | None) -> list[Alert]:
        try:
            return await read_alerts(self.js, tenant, idle=1.0, **filters)
        except Exception as exc:  # noqa: BLE001 - NATS away: the client learns it, the service goes on
            raise Unavailable(f"alerts could not be read from NATS: {type(exc).__name__}") from None

    async def _with_states(self, tenant: str, alerts: list[Alert],
                           mutes: dict[str, alertstate.Mute] | None = None) -> list[AlertWithState]:
        got = await self.redis_call(alertstate.states(
            self.redis, Keys(tenant),
            [(a.id, alertstate.series_key(a.kind, a.branch, a.target), a.detected_at) for a in alerts], mutes))
        return [AlertWithState(**msgspec.structs.asdict(a), state=st) for a, st in zip(alerts, got, strict=True)]

    async def redis_call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except Exception as exc:  # noqa: BLE001 - Redis away: the client learns it, the service goes on
            raise Unavailable(f"Redis did not answer: {type(exc).__name__}") from None

    async def trends(self, tenant: str, q: TrendsQuery, since: float | None, until: float | None) -> TrendReply:
        req = TrendRequest(since=since, until=until, bucket_s=BUCKETS[q.bucket], branch=q.branch, agent=q.agent,
                           name=q.name, label=q.label, target=q.target)
        try:
            return await history.trend(self.nc, Subjects(tenant), req)
        except StorageError as exc:
            raise self._storage_failure(exc, exc.description) from None

    async def target_history(self, tenant: str, q: TargetHistoryQuery, since: float | None,
                             until: float | None) -> TargetHistory:
        req = TargetHistoryRequest(target=q.target, since=since, until=until, branch=q.branch, outcome=q.outcome,
                                   agent=q.agent, label=q.label, limit=q.limit, cursor=decode_cursor(q.cursor))
        try:
            got = await history.target_history(self.nc, Subjects(tenant), req)
        except StorageError as exc:
            raise self._storage_failure(exc, exc.description) from None
        alerts = await self.alerts(tenant, AlertsQuery(target=q.target, limit=MAX_LIMIT))
        return TargetHistory(target=q.target, runs=got.runs, next_cursor=encode_cursor(got.cursor),
                             change_points=alerts.alerts, partial=got.partial)

    async def _storage_request(self, tenant: str, endpoint: str, req: msgspec.Struct) -> bytes:
        try:
            return await micro.request(self.nc, endpoint_subject(Subjects(tenant), endpoint), encode(req),
                                       timeout=5.0, service="storage service", error=StorageError)
        except StorageError as exc:
            raise self._storage_failure(exc, exc.description) from None

    @staticmethod
    def _storage_failure(exc: StorageError, not_found: str) -> Exception:
        if exc.code == 404:
            return NotFound(not_found)
        if exc.code == 400:
            return BadInput(exc.description)
        if exc.code in (503, 504):
            return Unavailable(f"the storage service did not answer: {exc.description}")
        return BadGateway(f"the storage service failed the request: {exc.description}")
