"""Alerts through the API as a team acts on them: one alert by id, acknowledged and muted with a
write key (refused with a read key), filtered by status, every answer valid against the document."""

from __future__ import annotations

from typing import Any

import aiohttp

from buildtel.services.analyzer.api import read_alerts
from buildtel.shared import apikeys
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings
from tests.analyzer.helpers import step_history
from tests.web.conftest import Api, eventually, publish, stored


async def _alerts(api: Api, settings: Settings, nc: Any) -> list[Any]:
    """Sessions whose build time steps up: the analyzer's one build alert, once it is published."""
    sessions = step_history()
    await publish(nc, settings, sessions)
    await stored(nc, settings, len(sessions))
    js = nc.jetstream()

    async def published() -> bool:
        return bool(await read_alerts(js, settings.namespace, idle=0.2))

    await eventually(published, timeout=60)
    return await read_alerts(js, settings.namespace, idle=0.2)


async def _call(http: aiohttp.ClientSession, method: str, url: str, key: str | None,
                body: Any = None) -> tuple[int, str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.request(method, url, headers=headers, json=body) as resp:
        return resp.status, resp.content_type, await resp.json(content_type=None)


async def test_acknowledge_and_mute_an_alert_with_a_write_key(api: Api, settings: Settings, nc: Any,
                                                              redis_client: Any) -> None:
    found = await _alerts(api, settings, nc)
    alert = found[0]
    keys = Keys(settings.namespace)
    read_key, _ = await apikeys.create(redis_client, keys, tenant=settings.namespace, scope="read")
    write_key, write_rec = await apikeys.create(redis_client, keys, tenant=settings.namespace, scope="write")
    base = f"{api.web.url}/api/v1/alerts/{alert.id}"
    http = api.http

    status, _, one = await _call(http, "GET", base, read_key)
    assert status == 200, one
    api.check(one, "AlertWithState")
    assert (one["id"], one["kind"], one["state"]["status"]) == (alert.id, alert.kind, "open")
    assert one["first_session_id"] == alert.first_session_id

    # Reading is not enough to change anything; nothing changed.
    status, ctype, body = await _call(http, "POST", base + "/acknowledge", read_key, {"note": "mine"})
    api.check_problem(status, ctype, body, 403)
    assert "needs 'write' or 'admin'" in body["detail"]
    status, _, one = await _call(http, "GET", base, read_key)
    assert one["state"]["status"] == "open"

    status, _, acked = await _call(http, "POST", base + "/acknowledge", write_key, {"note": "looking at it"})
    assert status == 200, acked
    api.check(acked, "AlertWithState")
    assert acked["state"]["status"] == "acknowledged"
    assert (acked["state"]["acknowledged"]["by"], acked["state"]["acknowledged"]["note"]) == \
        (write_rec.id, "looking at it")
    _, _, page = await _call(http, "GET", f"{api.web.url}/api/v1/alerts?status=acknowledged", read_key)
    api.check(page, "AlertPage")
    assert [a["id"] for a in page["alerts"]] == [alert.id]
    _, _, page = await _call(http, "GET", f"{api.web.url}/api/v1/alerts?status=open", read_key)
    assert alert.id not in [a["id"] for a in page["alerts"]]

    # Taking the acknowledgement back, then muting the series for a day: muted until then.
    status, _, back = await _call(http, "DELETE", base + "/acknowledge", write_key)
    assert (status, back["state"]["status"]) == (200, "open")
    status, _, muted = await _call(http, "POST", base + "/mute", write_key, {"duration": "24h", "note": "infra"})
    assert status == 200, muted
    api.check(muted, "AlertWithState")
    m = muted["state"]["muted"]
    assert muted["state"]["status"] == "muted" and m["by"] == write_rec.id and m["note"] == "infra"
    assert 24 * 3600 - 60 < m["until"] - m["at"] <= 24 * 3600
    assert m["series"] == f"{alert.kind}|{alert.branch or '_'}|{alert.target or '_'}"
    status, _, unmuted = await _call(http, "DELETE", base + "/mute", write_key)
    assert (status, unmuted["state"]["status"], unmuted["state"]["muted"]) == (200, "open", None)


async def test_alert_ids_and_bodies_that_are_wrong_are_problems(api: Api, settings: Settings, nc: Any) -> None:
    found = await _alerts(api, settings, nc)
    base = f"{api.web.url}/api/v1/alerts"
    cases: list[tuple[str, str, Any, int, str]] = [
        ("GET", "/" + "0" * 32, None, 404, "no alert"),
        ("GET", "/xyz", None, 400, "not an alert id"),
        ("GET", "/" + "a" * 33, None, 400, "not an alert id"),
        ("POST", f"/{found[0].id}/mute", {}, 400, "duration"),
        ("POST", f"/{found[0].id}/mute", {"duration": "forever"}, 400, "duration"),
        ("POST", f"/{found[0].id}/mute", {"duration": "91d"}, 400, "90 days"),
        ("POST", f"/{found[0].id}/mute", {"duration": "0"}, 400, "more than 0 s"),
        ("POST", f"/{found[0].id}/acknowledge", {"note": "x", "extra": 1}, 400, "extra"),
        ("POST", f"/{found[0].id}/acknowledge", {"note": "x" * 501}, 400, "note"),
        ("POST", "/" + "0" * 32 + "/acknowledge", {}, 404, "no alert"),
        ("PUT", f"/{found[0].id}/mute", {"duration": "1h"}, 405, "no such endpoint"),
    ]
    for method, path, body, expected, says in cases:
        status, ctype, got = await _call(api.http, method, base + path, None, body)
        api.check_problem(status, ctype, got, expected)
        assert says in got["detail"], (method, path, got)
    async with api.http.post(f"{base}/{found[0].id}/mute", data=b"{not json") as resp:
        got = await resp.json(content_type=None)
        assert resp.status == 400 and "not JSON" in got["detail"]
    # None of it changed the alert.
    status, _, one = await _call(api.http, "GET", f"{base}/{found[0].id}", None)
    assert (status, one["state"]["status"]) == (200, "open")
