"""The web service: the HTTP API of ``app.py`` on ``settings.http_host``, answered over NATS.

It keeps no history of its own: a list is a storage ``summaries`` request, a session a storage
``get`` (a prefix is resolved against the stored ids first), a report the analyzer's ``report``
and alerts are read from the alerts stream.  It connects to NATS as its own role ``web``
(``shared/auth.py``): query requests and reading alerts, nothing that changes history.

Binding beyond loopback needs ``BUILDER_TELEMETRY_HTTP_TOKEN`` (every API request must then
carry it as a bearer token); on loopback without one the API is open, and the start-up log says
so.  The port is ``port``, else ``settings.web_port``, else ``default_port`` (``buildtel up``:
any free port, recorded in ``stack.json``; ``buildtel serve web``: 8480).
"""

from __future__ import annotations

import ipaddress
from contextlib import AsyncExitStack
from typing import Any, ClassVar

import msgspec

from buildtel.services.analyzer.api import AnalyzerClient, AnalyzerError, ReportRequest, read_alerts
from buildtel.services.storage.api import (
    MAX_ITEMS,
    SessionSummary,
    StorageClient,
    StorageError,
    SummariesReply,
    SummariesRequest,
    endpoint_subject,
)
from buildtel.services.web.app import NotFound, Unavailable, create_app
from buildtel.services.web.query import (
    FULL_LEN,
    AlertsQuery,
    BadInput,
    ReportQuery,
    SessionsQuery,
    decode_cursor,
    encode_cursor,
)
from buildtel.services.web.schema import AlertPage, Health, SessionPage
from buildtel.shared import micro
from buildtel.shared.codec import encode
from buildtel.shared.httpserver import DEFAULT_LIMITS, start_site
from buildtel.shared.keyed import keyed
from buildtel.shared.service import BusService
from buildtel.shared.settings import Settings

_summaries = msgspec.msgpack.Decoder(SummariesReply)
SHOWN_CANDIDATES = 8


class InsecureBind(ValueError):
    """Refusing to serve the API beyond loopback without a token."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


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
        self.storage: StorageClient | None = None
        self.analyzer: AnalyzerClient | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` once started (the real port when it was 0)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def open(self, stack: AsyncExitStack) -> None:
        # Before connecting anything: a configuration that would expose the API is refused at once.
        if not is_loopback(self.host) and not self.settings.http_token:
            raise InsecureBind(f"the web API would listen on {self.host}, beyond loopback, without a key: set "
                               "BUILDER_TELEMETRY_HTTP_TOKEN (clients send it as 'Authorization: Bearer …') or "
                               "bind to 127.0.0.1")

    async def prepare(self, stack: AsyncExitStack) -> None:
        self.storage = StorageClient(self.nc, self.subjects)
        self.analyzer = AnalyzerClient(self.nc, self.settings.namespace, attempts=1)
        app = create_app(self, token=self.settings.http_token, log=self.log,
                         max_body_bytes=DEFAULT_LIMITS.max_body_bytes)
        runner = await start_site(app, self.host, self.requested_port)
        stack.push_async_callback(runner.cleanup)
        self.port = runner.addresses[0][1]

    async def started_fields(self) -> dict[str, Any]:
        open_note = {} if self.settings.http_token else {"auth": "open: no token configured (loopback only)"}
        return {"url": self.url, **open_note}

    # -- the Backend of app.py -----------------------------------------------------------------
    def health(self) -> Health:
        up = bool(self.nc is not None and self.nc.is_connected)
        return Health(status="ok" if up else "degraded", nats=up)

    async def sessions(self, q: SessionsQuery, since: float | None, until: float | None) -> SessionPage:
        cursor = decode_cursor(q.cursor)
        out: list[SessionSummary] = []
        while True:  # one storage reply holds what fits in a NATS message: ask until the page is full
            req = SummariesRequest(outcome=q.outcome, branch=q.branch, agent=q.agent, name=q.name, label=q.label,
                                   target=q.target, since=since, until=until, order=q.order,
                                   limit=q.limit - len(out), cursor=cursor)
            reply = _summaries.decode(await self._storage_request("summaries", req))
            out.extend(reply.summaries)
            cursor = reply.cursor
            if cursor is None or not reply.summaries or len(out) >= q.limit:
                break
        return SessionPage(sessions=out, next_cursor=encode_cursor(cursor))

    async def session(self, id_or_prefix: str) -> Any:
        assert self.storage is not None
        sid = id_or_prefix if len(id_or_prefix) == FULL_LEN else await self._resolve_prefix(id_or_prefix)
        try:
            return keyed(await self.storage.get(sid))
        except StorageError as exc:
            raise self._storage_failure(exc, f"no session {sid} is stored") from None

    async def _resolve_prefix(self, prefix: str) -> str:
        """The one stored id starting with ``prefix`` (the summaries carry ids without targets)."""
        matches: list[SessionSummary] = []
        cursor = None
        while True:
            reply = _summaries.decode(await self._storage_request(
                "summaries", SummariesRequest(limit=MAX_ITEMS, cursor=cursor)))
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

    async def report(self, q: ReportQuery, since: float | None, until: float | None) -> Any:
        assert self.analyzer is not None
        req = ReportRequest(last=q.last, since=since, until=until, branch=q.branch, outcome=q.outcome,
                            name=q.name, target=q.target)
        try:
            return keyed(await self.analyzer.report(req))
        except AnalyzerError as exc:
            if exc.code == 400:
                raise BadInput(exc.description) from None
            if exc.code in (503, 504):
                raise Unavailable(f"the analyzer did not answer: {exc.description}") from None
            raise

    async def alerts(self, q: AlertsQuery) -> AlertPage:
        try:
            found = await read_alerts(self.js, self.settings.namespace, branch=q.branch, target=q.target,
                                      kind=q.kind, idle=1.0)
        except Exception as exc:  # noqa: BLE001 - NATS away: the client learns it, the service goes on
            raise Unavailable(f"alerts could not be read from NATS: {type(exc).__name__}") from None
        return AlertPage(alerts=list(reversed(found))[:q.limit])

    async def _storage_request(self, endpoint: str, req: msgspec.Struct) -> bytes:
        try:
            return await micro.request(self.nc, endpoint_subject(self.subjects, endpoint), encode(req),
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
        return exc
