"""The web API end to end: storage, analyzer and web services on real NATS and Redis, asked by a
real HTTP client; every answer validated against the OpenAPI document the service serves."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
from openapi_spec_validator import validate

from buildtel.services.web.service import WebService
from buildtel.shared.settings import Settings
from tests.web.conftest import Api, eventually, publish, stored


async def test_openapi_document_is_valid_openapi_3_1(api: Api) -> None:
    validate(api.doc)
    assert api.doc["openapi"] == "3.1.0"
    assert {"/api/v1/sessions", "/api/v1/sessions/{id}", "/api/v1/report", "/api/v1/alerts"} <= set(api.doc["paths"])


async def test_sessions_list_filters_and_pages_with_a_cursor(api: Api, settings: Settings, nc: Any,
                                                             make_session: Any) -> None:
    now = time.time()
    sessions = [make_session(i, finish=now - 100 + i, outcome="failed" if i % 3 == 0 else "success",
                             branch="main" if i % 2 else "dev") for i in range(9)]
    await publish(nc, settings, sessions)
    await stored(nc, settings, 9)

    status, ctype, body = await api.get("/api/v1/sessions")
    assert (status, ctype) == (200, "application/json")
    api.check(body, "SessionPage")
    assert [s["id"] for s in body["sessions"]] == [s.id for s in reversed(sessions)]
    assert body["next_cursor"] is None

    _, _, failed = await api.get("/api/v1/sessions", outcome="failed", branch="dev")
    assert {s["id"] for s in failed["sessions"]} == {s.id for s in sessions if s.outcome == "failed"
                                                     and s.environment.vcs.branch == "dev"}  # type: ignore[union-attr]

    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        status, _, page = await api.get("/api/v1/sessions", **params)
        assert status == 200 and len(page["sessions"]) <= 4
        api.check(page, "SessionPage")
        seen += [s["id"] for s in page["sessions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [s.id for s in reversed(sessions)]

    iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(sessions[6].finish))
    _, _, recent = await api.get("/api/v1/sessions", since=iso, order="oldest")
    assert [s["id"] for s in recent["sessions"]][-3:] == [s.id for s in sessions[6:]]


async def test_one_session_by_full_id_and_by_prefix_with_keyed_targets(api: Api, settings: Settings, nc: Any,
                                                                       make_session: Any) -> None:
    s = make_session(0, targets=4)
    await publish(nc, settings, [s])
    await stored(nc, settings, 1)
    for ref in (s.id, s.id[:8], s.id.upper()):
        status, _, body = await api.get(f"/api/v1/sessions/{ref}")
        assert status == 200, body
        api.check(body, "BuildSession")
        assert body["id"] == s.id and body["exit_code"] == 0
        assert [t["name"] for t in body["targets"]] == [t.name for t in s.targets]
        assert body["targets"][0]["phases"][0] == {"name": "compile", "duration_s": 0.3}
    # The link `buildtel run` prints: the build's page, or its JSON for a client that asks for JSON.
    async with api.http.get(f"{api.web.url}/sessions/{s.id[:10]}", headers={"Accept": "application/json"}) as resp:
        assert (resp.status, (await resp.json())["id"]) == (200, s.id)
    async with api.http.get(f"{api.web.url}/sessions/{s.id[:10]}") as resp:
        assert (resp.status, resp.content_type) == (200, "text/html")
        assert s.id[:12] in await resp.text()


async def test_bad_input_is_a_problem_never_a_500(api: Api, settings: Settings, nc: Any, make_session: Any) -> None:
    a, b = make_session(0, session_id="abcdef" + "0" * 26), make_session(1, session_id="abcdef" + "1" * 26)
    await publish(nc, settings, [a, b])
    await stored(nc, settings, 2)
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/api/v1/sessions/xyz-not-hex", {}, 400, "not a session id"),
        ("/api/v1/sessions/abc", {}, 400, "too short"),
        ("/api/v1/sessions/abcdef", {}, 400, "ambiguous"),
        ("/api/v1/sessions/" + "f" * 32, {}, 404, "no session"),
        ("/api/v1/sessions/fedcba98", {}, 404, "no stored session id starts with fedcba98"),
        ("/api/v1/sessions", {"limit": 100000}, 400, "limit"),
        ("/api/v1/sessions", {"limit": "many"}, 400, "limit"),
        ("/api/v1/sessions", {"outcome": "exploded"}, 400, "outcome"),
        ("/api/v1/sessions", {"since": "yesterday-ish"}, 400, "since"),
        ("/api/v1/sessions", {"cursor": "!!!"}, 400, "cursor"),
        ("/api/v1/sessions", {"colour": "red"}, 400, "unknown parameter 'colour'"),
        ("/api/v1/report", {"last": -1}, 400, "last"),
        ("/api/v1/alerts", {"kind": "../../etc"}, 400, "kind"),
        ("/api/v1/nothing-here", {}, 404, "no such endpoint"),
    ]
    for path, params, expected, says in cases:
        status, ctype, body = await api.get(path, **params)
        api.check_problem(status, ctype, body, expected)
        assert says in body["detail"], (path, params, body)
    async with api.http.post(api.web.url + "/api/v1/sessions", data=b"{") as resp:
        assert (resp.status, resp.content_type) == (405, "application/problem+json")


async def test_report_and_alerts(api: Api, settings: Settings, nc: Any, make_session: Any) -> None:
    now = time.time()
    sessions = [make_session(i, finish=now - 50 + i, outcome="failed" if i == 0 else "success") for i in range(5)]
    await publish(nc, settings, sessions)
    await stored(nc, settings, 5)
    status, _, report = await api.get("/api/v1/report")
    assert status == 200, report
    api.check(report, "AnalyticsReport")
    assert (report["sessions"], report["failed"], report["succeeded"]) == (5, 1, 4)
    _, _, last2 = await api.get("/api/v1/report", last=2)
    assert last2["sessions"] == 2
    status, _, alerts = await api.get("/api/v1/alerts")
    assert status == 200
    api.check(alerts, "AlertPage")
    assert alerts["alerts"] == []  # five steady builds: no change point


async def test_a_backend_that_does_not_answer_is_a_503(settings: Settings, nc: Any) -> None:
    web = WebService(settings, settings.nats_url or "", settings.redis_url or "")  # no storage, no analyzer
    await web.start()
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/api/v1/sessions", "/api/v1/sessions/" + "a" * 32, "/api/v1/report"):
                async with http.get(web.url + path) as resp:
                    body = await resp.json(content_type=None)
                    assert (resp.status, resp.content_type) == (503, "application/problem+json"), body
                    assert "did not answer" in body["detail"]
            async with http.get(web.url + "/healthz") as resp:
                assert resp.status == 200 and (await resp.json())["nats"] is True
    finally:
        await web.stop()


async def test_a_token_is_required_when_set_and_beyond_loopback_without_one_it_refuses(settings: Settings,
                                                                                         stack: Any) -> None:
    exposed = WebService(settings.with_(http_host="0.0.0.0"), settings.nats_url or "", settings.redis_url or "")
    try:
        await exposed.start()
    except ValueError as exc:
        assert "BUILDER_TELEMETRY_HTTP_TOKEN" in str(exc)
    else:
        await exposed.stop()
        raise AssertionError("the web API started beyond loopback without a token")

    web = WebService(settings.with_(http_token="s3cret-token"), settings.nats_url or "", settings.redis_url or "")
    await web.start()
    try:
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with http.get(web.url + "/api/v1/sessions", headers=headers) as resp:
                    assert (resp.status, resp.content_type) == (401, "application/problem+json")
            async with http.get(web.url + "/api/v1/sessions",
                                headers={"Authorization": "Bearer s3cret-token"}) as resp:
                assert resp.status == 200
    finally:
        await web.stop()


async def test_trends_and_one_targets_history(api: Api, settings: Settings, nc: Any, make_session: Any) -> None:
    """Daily buckets a chart can draw (empty days listed), and one target's runs with the
    analyzer's change points for it, both valid against the OpenAPI document."""
    day = 86_400.0
    today = time.time() // day * day
    sessions = [make_session(i, finish=today - 2 * day + 3600 * (i + 1), outcome="failed" if i == 0 else "success")
                for i in range(4)]  # all four two days ago; yesterday has none
    await publish(nc, settings, sessions)
    await stored(nc, settings, 4)

    status, _, trend = await api.get("/api/v1/trends", since=str(today - 2 * day), until=str(today + day))
    assert status == 200
    api.check(trend, "TrendReply")
    assert [b["builds"] for b in trend["buckets"]] == [4, 0, 0] and trend["builds"] == 4
    first = trend["buckets"][0]
    assert (first["succeeded"], first["failed"], first["success_rate"]) == (3, 1, 0.75)
    assert trend["buckets"][1]["success_rate"] is None  # no builds: no rate, not 0 %
    _, _, hourly = await api.get("/api/v1/trends", bucket="hour", since=str(today - 2 * day),
                                 until=str(today - day))
    assert len(hourly["buckets"]) == 24 and sum(b["builds"] for b in hourly["buckets"]) == 4

    target = sessions[0].targets[1].name
    status, _, hist = await api.get("/api/v1/targets/history", target=target, limit=3)
    assert status == 200
    api.check(hist, "TargetHistory")
    assert [r["session_id"] for r in hist["runs"]] == [s.id for s in reversed(sessions)][:3]
    assert hist["next_cursor"] is not None and hist["change_points"] == []
    run = hist["runs"][0]
    mine = sessions[-1].targets[1]
    assert (run["duration_s"], run["status"], run["worker"]) == (mine.duration_s, mine.status, mine.worker)
    _, _, rest = await api.get("/api/v1/targets/history", target=target, limit=3, cursor=hist["next_cursor"])
    assert [r["session_id"] for r in rest["runs"]] == [sessions[0].id] and rest["next_cursor"] is None

    for path, params, words in (("/api/v1/trends", {"bucket": "month"}, "bucket"),
                                ("/api/v1/targets/history", {}, "target"),
                                ("/api/v1/targets/history", {"target": "x", "limit": "0"}, "limit")):
        status, ctype, body = await api.get(path, **params)
        api.check_problem(status, ctype, body, 400)
        assert words in body["detail"]


async def test_a_sessions_trace_as_otlp_json_and_as_a_chrome_trace(api: Api, settings: Settings, nc: Any,
                                                                   make_session: Any) -> None:
    from buildtel.services.tracer.query import TraceClient
    from buildtel.services.tracer.subjects import TracerSubjects
    from buildtel.shared.subjects import Subjects

    s = make_session(1, targets=3)
    await publish(nc, settings, [s])
    client = TraceClient(nc, TracerSubjects(Subjects(settings.namespace)))

    async def traced() -> bool:
        try:
            return bool((await client.session(s.id)).spans)
        except Exception:  # noqa: BLE001 - 404 until the tracer has it
            return False

    await eventually(traced)
    await stored(nc, settings, 1)  # a prefix is resolved by storage, which may store it after the tracer
    status, ctype, otlp = await api.get(f"/api/v1/sessions/{s.id[:8]}/trace")
    assert (status, ctype) == (200, "application/json")
    spans = [sp for rs in otlp["resourceSpans"] for ss in rs["scopeSpans"] for sp in ss["spans"]]
    assert {sp["name"] for sp in spans} >= {t.name for t in s.targets} and all(sp["traceId"] for sp in spans)
    status, _, chrome = await api.get(f"/api/v1/sessions/{s.id}/chrome-trace")
    assert status == 200
    events = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert len(events) == len(spans) and chrome["displayTimeUnit"] == "ms"
    tracks = {e["args"]["name"] for e in chrome["traceEvents"] if e["name"] == "thread_name"}
    assert "build" in tracks and any(t.startswith("worker ") for t in tracks)
    status, ctype, body = await api.get("/api/v1/sessions/" + "e" * 32 + "/chrome-trace")
    api.check_problem(status, ctype, body, 404)


async def test_reading_alerts_that_match_nothing_does_not_wait_for_the_idle_timeout(api: Api, settings: Settings,
                                                                                   nc: Any) -> None:
    """No stored alert matches: the answer is an empty list at once, not after ``idle`` (a target's
    history asks for its alerts on every request)."""
    import asyncio

    from buildtel.services.analyzer.api import read_alerts

    got = await asyncio.wait_for(read_alerts(nc.jetstream(), settings.namespace, target="//no:such", idle=600),
                                 timeout=60)
    assert got == []
    status, _, body = await api.get("/api/v1/alerts", target="//no:such")
    assert status == 200 and body["alerts"] == []
