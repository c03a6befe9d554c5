"""The web service's per-tenant build figures: exact values after known sessions and alerts, on the
API port (key-checked, the key's tenant only) and on the metrics port; the example Grafana
dashboard names only series a running web service serves."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from buildtel.services.collector.service import CollectorService
from buildtel.services.web.service import WebService
from buildtel.shared import apikeys
from buildtel.shared import metrics as metrics_http
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import publish_events, synthetic_build
from tests.web.conftest import eventually, publish
from tests.web.test_stream import ensure_alerts, make_alert, publish_alert

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "buildtel-builds.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def web(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[WebService]:
    svc = WebService(settings, settings.nats_url or "", settings.redis_url or "", metrics_port=0)
    await svc.start()
    assert svc.hub is not None
    feed = svc.hub.feeds[settings.namespace]

    async def ready() -> bool:
        return feed.ready.is_set()

    await eventually(ready)  # its starting point is known: whatever is published now is counted
    yield svc
    await svc.stop()


async def scrape(url: str, key: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


async def test_figures_are_exactly_what_was_published(settings: Settings, nc: Any, redis_client: Any,
                                                      web: WebService, make_session: Any) -> None:
    ns = settings.namespace
    key, _ = await apikeys.create(redis_client, Keys(ns), tenant=ns, scope="read")
    other_key, _ = await apikeys.create(redis_client, Keys(ns), tenant="t" + uuid.uuid4().hex[:12], scope="read")
    await ensure_alerts(nc, ns)
    # (outcome, duration, targets): targets // 3 of each are cache hits, the rest misses.
    plan = [("success", 4.0, 3), ("success", 40.0, 6), ("success", 400.0, 9), ("failed", 2.0, 3),
            ("failed", 7000.0, 12), ("abandoned", 100_000.0, 3)]
    sessions = []
    for i, (outcome, duration, targets) in enumerate(plan):
        s = make_session(i, outcome=outcome, targets=targets)
        s.duration_s = duration
        sessions.append(s)
    await publish(nc, settings, sessions)
    for i, (kind, direction) in enumerate([("target", "regression"), ("target", "regression"),
                                           ("build", "improvement")]):
        await publish_alert(nc, ns, make_alert(i, kind=kind, direction=direction))
    url = web.url + "/metrics"

    async def counted() -> bool:
        got = samples((await scrape(url, key))[1])
        runs = sum(v for (n, _), v in got.items() if n == "cicd_pipeline_runs_total")
        alerts = sum(v for (n, _), v in got.items() if n == "buildtel_build_alerts_total")
        return runs == len(plan) and alerts == 3

    await eventually(counted)
    status, text = await scrape(url, key)
    assert status == 200
    got = samples(text)
    t = {"tenant": ns}
    assert value(got, "cicd_pipeline_runs_total", **t, cicd_pipeline_result="success") == 3
    assert value(got, "cicd_pipeline_runs_total", **t, cicd_pipeline_result="failure") == 2
    assert value(got, "cicd_pipeline_runs_total", **t, cicd_pipeline_result="error") == 1
    hist = "cicd_pipeline_run_duration_seconds"
    assert value(got, hist + "_count", **t, cicd_pipeline_result="success") == 3
    assert value(got, hist + "_sum", **t, cicd_pipeline_result="success") == 444.0
    assert value(got, hist + "_bucket", **t, cicd_pipeline_result="success", le="5.0") == 1
    assert value(got, hist + "_bucket", **t, cicd_pipeline_result="success", le="60.0") == 2
    assert value(got, hist + "_bucket", **t, cicd_pipeline_result="failure", le="7200.0") == 2
    assert value(got, hist + "_bucket", **t, cicd_pipeline_result="error", le="7200.0") == 0
    assert value(got, hist + "_bucket", **t, cicd_pipeline_result="error", le="+Inf") == 1
    hits = sum(n // 3 for _, _, n in plan)
    lookups = sum(n for _, _, n in plan)
    assert value(got, "buildtel_cache_hits_total", **t) == hits == 12
    assert value(got, "buildtel_cache_lookups_total", **t) == lookups == 36
    assert value(got, "buildtel_build_alerts_total", **t, kind="target", direction="regression") == 2
    assert value(got, "buildtel_build_alerts_total", **t, kind="build", direction="improvement") == 1
    assert value(got, "cicd_pipeline_run_active", **t) == 0
    # Only the key's tenant: the other key's scrape has none of these series, and no key is a 401.
    _, theirs = await scrape(url, other_key)
    assert ns not in theirs
    status, body = await scrape(url, None)
    assert status == 401 and "key" in json.loads(body)["detail"]
    # The operator's metrics port serves the same figures beside the service's counters.
    server = metrics_http.current()
    assert server is not None
    _, op_text = await scrape(server.url + "/metrics", None)
    op = samples(op_text)
    assert value(op, "cicd_pipeline_runs_total", **t, cicd_pipeline_result="success") == 3
    assert value(op, "buildtel_feeds", service="web", namespace=ns) >= 1  # its own (key tenants: every 30 s)
    assert value(op, "buildtel_feed_undecodable_total", service="web", namespace=ns) == 0


async def test_running_builds_are_the_collectors_active_sessions(settings: Settings, nc: Any, redis_client: Any,
                                                                 web: WebService) -> None:
    collector = CollectorService(settings, settings.nats_url or "", settings.redis_url or "")
    await collector.start()
    try:
        key, _ = await apikeys.create(redis_client, Keys(settings.namespace), tenant=settings.namespace,
                                      scope="read")
        js, subjects = nc.jetstream(), Subjects(settings.namespace)
        running = []
        for seed in (1, 2):
            sid, per_agent, _ = synthetic_build(targets=5, seed=seed, finish=False)
            await publish_events(js, subjects, sid, "agent-a", per_agent["agent-a"])
            running.append(sid)

        async def active(n: int) -> bool:
            got = samples((await scrape(web.url + "/metrics", key))[1])
            return value(got, "cicd_pipeline_run_active", tenant=settings.namespace) == n

        await eventually(lambda: active(2))
        assert web.hub is not None
        await eventually(lambda: _started(web, settings, 2))  # the feed saw both announced too
    finally:
        await collector.stop()


async def _started(web: WebService, settings: Settings, n: int) -> bool:
    assert web.hub is not None
    return web.hub.feeds[settings.namespace].figures.started == n


PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "le", "label_values", "tenant",
                "cicd_pipeline_result", "kind", "direction", "without", "max", "avg", "count"}


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return exprs


def names_in(expr: str) -> set[str]:
    """The series an expression names: its identifiers, less label matchers, variables, durations
    and PromQL's own words."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+|\"[^\"]*\"", " ", expr)
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr) if w not in PROMQL_WORDS}


async def test_the_grafana_dashboard_names_only_served_series(settings: Settings, nc: Any, redis_client: Any,
                                                              web: WebService, make_session: Any) -> None:
    key, _ = await apikeys.create(redis_client, Keys(settings.namespace), tenant=settings.namespace, scope="read")
    await publish(nc, settings, [make_session(0)])
    await ensure_alerts(nc, settings.namespace)
    await publish_alert(nc, settings.namespace, make_alert(0))

    async def seen() -> bool:
        got = samples((await scrape(web.url + "/metrics", key))[1])
        return any(n == "buildtel_build_alerts_total" for n, _ in got) and \
            any(n == "cicd_pipeline_runs_total" and v for (n, _), v in got.items())

    await eventually(seen)
    served = {n for n, _ in samples((await scrape(web.url + "/metrics", key))[1])}
    exprs = dashboard_exprs()
    assert len(exprs) >= 7
    named = set().union(*(names_in(e) for e in exprs))
    assert named >= {"cicd_pipeline_runs_total", "cicd_pipeline_run_duration_seconds_bucket",
                     "buildtel_cache_hits_total", "buildtel_cache_lookups_total", "cicd_pipeline_run_active",
                     "buildtel_build_alerts_total"}
    assert named <= served, f"the dashboard names series the web service does not serve: {named - served}"
