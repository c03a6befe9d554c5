"""Cancelled and unknown builds through the web service: the API filters by them (and its OpenAPI
document lists every outcome), trends count them apart, and the dashboard writes them out."""

from __future__ import annotations

import time
from typing import Any

from buildtel.shared.protocol import OUTCOMES
from buildtel.shared.settings import Settings
from tests.web.conftest import Api, publish, stored


async def test_new_outcomes_in_the_api_the_trends_and_the_dashboard(api: Api, settings: Settings, nc: Any,
                                                                    make_session: Any) -> None:
    (param,) = [p for p in api.doc["paths"]["/api/v1/sessions"]["get"]["parameters"] if p["name"] == "outcome"]
    assert param["schema"]["enum"] == list(OUTCOMES)
    now = time.time()
    sessions = [make_session(i, finish=now - 100 + i, outcome=o) for i, o in
                enumerate(["success", "cancelled", "unknown", "unknown", "failed"])]
    await publish(nc, settings, sessions)
    await stored(nc, settings, len(sessions))

    for outcome in ("cancelled", "unknown"):
        status, _, body = await api.get("/api/v1/sessions", outcome=outcome)
        assert status == 200
        api.check(body, "SessionPage")
        assert [s["id"] for s in body["sessions"]] == [s.id for s in reversed(sessions) if s.outcome == outcome]

    status, _, trend = await api.get("/api/v1/trends", since=str(now - 200), until=str(now + 1), bucket="day")
    assert status == 200
    api.check(trend, "TrendReply")
    totals = {k: sum(b[k] for b in trend["buckets"]) for k in ("succeeded", "failed", "cancelled", "unknown")}
    assert totals == {"succeeded": 1, "failed": 1, "cancelled": 1, "unknown": 2}
    (rated,) = [b for b in trend["buckets"] if b["builds"]]
    assert rated["success_rate"] == 0.5  # of the success and the failure; the others are neither

    async with api.http.get(api.web.url + "/sessions", params={"outcome": "unknown"}) as resp:
        assert resp.status == 200
        html = await resp.text()
    assert html.count('<span class="outcome unknown">unknown</span>') == 2
    assert "<option selected>unknown</option>" in html and "<option >cancelled</option>" in html
    async with api.http.get(api.web.url + "/static/app.css") as resp:
        css = await resp.text()
    assert '.outcome.cancelled::before { content: "⊘ "; }' in css and '.outcome.unknown::before' in css
