"""Service metrics over HTTP: ``/metrics`` (Prometheus text) and ``/healthz``, one endpoint per process.

Design (``docs/metrics.md``):

* every service keeps plain integer counters and exposes them through
  ``metrics() -> dict[str, float]`` (may be ``async``, e.g. to ask JetStream for its
  consumer's ``num_pending``); names ending in ``_total`` are counters, the others
  gauges;
* one :class:`MetricsServer` per process (aiohttp, bound to ``settings.http_host``,
  port 0 allowed): services :func:`attach` themselves when they start and
  :func:`detach` when they stop, so ``buildtel up`` serves every service of the
  process from one endpoint, each series labelled ``service=…`` (and
  ``namespace=…``); ``buildtel serve NAME`` serves one;
* counters are read at scrape time (a custom prometheus-client collector over a
  snapshot taken just before), so services pay nothing between scrapes and no
  global prometheus registry is involved;
* ``Authorization: Bearer <settings.http_token>`` is required on both paths when
  the token is set (constant-time comparison).

A service may also offer whole metric families (labels of its own, histograms) through an async
``metric_families() -> list[Metric]`` (the web service's per-tenant build figures); they are
served beside the counters.

``/healthz`` answers 200 with the attached services while the process serves, 503
while it is stopping (a service's ``healthy()`` may also say no).

The endpoint runs with :mod:`buildtel.shared.httpserver`'s limits: a connection that has not
sent a complete request head within ``idle_timeout`` (15 s) is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from buildtel.shared.httpserver import DEFAULT_LIMITS, HttpLimits, start_site

PREFIX = "buildtel_"
_HELP = {
    "events_in_total": "Events folded into sessions (new, not redelivered).",
    "batches_in_total": "Event batches consumed.",
    "sessions_completed_total": "Sessions completed and published by the collector.",
    "sessions_stored_total": "Sessions written to the store (duplicates excluded).",
    "sessions_in_total": "Completed sessions consumed.",
    "dead_letters_total": "Messages sent to the dead-letter subject.",
    "alerts_total": "Regression alerts published.",
    "consumer_lag": "Messages the service's JetStream consumer has not been delivered yet (num_pending).",
    "up": "1 while the service is attached to this endpoint.",
}

Snapshot = dict[str, tuple[str, dict[str, float]]]  # service key -> (namespace, values)


def _name(svc: Any) -> str:
    return str(getattr(svc, "name", type(svc).__name__.lower()))


def _namespace(svc: Any) -> str:
    settings = getattr(svc, "settings", None)
    return str(getattr(settings, "namespace", ""))


class _SnapshotCollector:
    """A prometheus-client collector over one snapshot (so ``generate_latest`` stays sync)."""

    def __init__(self, snapshot: Snapshot, errors: int, extra: list[Metric] | None = None) -> None:
        self.snapshot, self.errors, self.extra = snapshot, errors, extra or []

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for service, (ns, values) in sorted(self.snapshot.items()):
            for key, value in sorted({**values, "up": 1.0}.items()):
                counter = key.endswith("_total")
                base = key[:-6] if counter else key
                fam = families.get(base)
                if fam is None:
                    cls = CounterMetricFamily if counter else GaugeMetricFamily
                    fam = families[base] = cls(PREFIX + base, _HELP.get(key, key.replace("_", " ")),
                                               labels=["service", "namespace"])
                fam.add_metric([service, ns], float(value))
        fam = CounterMetricFamily(PREFIX + "metrics_scrape_errors", "Services whose metrics() failed at a scrape.")
        fam.add_metric([], float(self.errors))
        families["metrics_scrape_errors"] = fam
        yield from families.values()
        yield from self.extra


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def render_families(families: list[Metric]) -> bytes:
    """Prometheus text of ready-made families (no service counters)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


class MetricsServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 limits: HttpLimits = DEFAULT_LIMITS) -> None:
        self.host, self.requested_port, self.token, self.limits = host, port, token, limits
        self.services: dict[int, Any] = {}
        self.scrape_errors = 0
        self.stopping = False
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> MetricsServer:
        self.loop = asyncio.get_running_loop()
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        runner = await start_site(app, self.host, self.requested_port, self.limits)
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self.stopping = True
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def add(self, svc: Any) -> None:
        self.services[id(svc)] = svc

    def remove(self, svc: Any) -> None:
        self.services.pop(id(svc), None)

    async def snapshot(self) -> Snapshot:
        out: Snapshot = {}
        seen: dict[str, int] = {}
        for svc in list(self.services.values()):
            key = _name(svc)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:  # two replicas of one service in a process: keep both, same label
                key = f"{key}#{seen[key]}"
            try:
                values = svc.metrics()
                if inspect.isawaitable(values):
                    values = await asyncio.wait_for(values, 5.0)
                out[key] = (_namespace(svc), {str(k): float(v) for k, v in dict(values).items()})
            except Exception:  # noqa: BLE001 - one broken service must not hide the others
                self.scrape_errors += 1
        return out

    async def render(self) -> bytes:
        from prometheus_client import CollectorRegistry

        snap = await self.snapshot()
        extra: list[Metric] = []
        for svc in list(self.services.values()):
            get = getattr(svc, "metric_families", None)
            if get is None:
                continue
            try:
                extra.extend(await asyncio.wait_for(get(), 5.0))
            except Exception:  # noqa: BLE001 - one broken service must not hide the others
                self.scrape_errors += 1
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SnapshotCollector(snap, self.scrape_errors, extra))
        return generate_latest(registry)

    def _authorised(self, request: web.Request) -> bool:
        if not self.token:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    def _denied(self) -> web.Response:
        return web.Response(status=401, text="missing or wrong bearer token\n",
                            headers={"WWW-Authenticate": 'Bearer realm="buildtel-metrics"'})

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._denied()
        body = await self.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def _healthz(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._denied()
        states = {}
        for svc in list(self.services.values()):
            ok = True
            check = getattr(svc, "healthy", None)
            if callable(check):
                with contextlib.suppress(Exception):
                    ok = bool(check())
            states[_name(svc)] = "ok" if ok else "unhealthy"
        good = not self.stopping and all(v == "ok" for v in states.values())
        return web.Response(status=200 if good else 503, content_type="application/json",
                            text=json.dumps({"status": "ok" if good else "unavailable", "services": states}))


# -- the process's endpoint ---------------------------------------------------------------------
_server: MetricsServer | None = None
_starting: asyncio.Future[MetricsServer] | None = None


def current() -> MetricsServer | None:
    """The process's metrics endpoint, when one is running."""
    return _server


async def attach(svc: Any, settings: Any, *, port: int | None = None) -> MetricsServer | None:
    """Serve ``svc``'s ``metrics()`` from the process's endpoint, starting it on ``port``
    (else ``settings.metrics_port`` when that setting exists) if none runs yet.  No port:
    no endpoint, and nothing happens.  A running endpoint is shared whatever port is asked."""
    global _server, _starting
    if port is None:
        port = getattr(settings, "metrics_port", None)
    loop = asyncio.get_running_loop()
    if _server is not None and _server.loop is not loop:  # left over from a finished event loop
        _server = None
    if _server is None:
        if port is None:
            return None
        if _starting is not None and _starting.get_loop() is loop:
            server = await asyncio.shield(_starting)
        else:
            _starting = loop.create_future()
            try:
                server = await MetricsServer(settings.http_host, port, settings.http_token).start()
            except BaseException as exc:
                _starting.set_exception(exc)
                _starting.exception()  # retrieved: a failed start is reported to the caller only
                _starting = None
                raise
            _starting.set_result(server)
            _starting = None
            _server = server
        svc_server = server
    else:
        svc_server = _server
    svc_server.add(svc)
    return svc_server


async def detach(svc: Any) -> None:
    """Stop serving ``svc``; the endpoint stops with its last service."""
    global _server
    server = _server
    if server is None or id(svc) not in server.services:
        return
    server.remove(svc)
    if not server.services:
        _server = None
        await server.stop()


async def consumer_lag(js: Any, stream: str, durable: str) -> float:
    """Messages a durable JetStream consumer has not finished: not yet delivered (``num_pending``)
    plus delivered and not acknowledged (``num_ack_pending``).  The second part matters: a message
    handed to a pull request of an instance that then stopped is not pending any more, but it is not
    processed either until its ack wait sends it again."""
    try:
        info = await asyncio.wait_for(js.consumer_info(stream, durable), 2.0)
    except Exception:  # noqa: BLE001 - bus away: report NaN rather than fail the scrape
        return float("nan")
    return float((info.num_pending or 0) + (info.num_ack_pending or 0))
