"""Every endpoint of the served OpenAPI document against a real farm: ``buildtel up`` serving two
tenants, ``buildtel demo`` builds (with its injected regression and alert) and real ``buildtel run``
make builds, one of them failing.

The endpoints are read from ``/api/v1/openapi.json`` itself, so an endpoint added to the API is
checked here without editing this file (an id parameter this file cannot fill fails the test).
For each: the answer with a right key validates against the document; no key, a malformed key, a
revoked key get 401; another tenant's key gets 404 for this tenant's ids and never sees its data; a
read key may not POST or DELETE (403), a write key may.
"""

from __future__ import annotations

import json
from typing import Any
from xml.etree import ElementTree

import aiohttp
import jsonschema
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.web.farm import FARM_TIMEOUT_S, PUBLIC, Farm, get_json, ready

# The module's first test also pays for its farm (farm.py: a stack, 30 demo builds, make builds,
# keys), which next to other load took over the suite's 120 s; a test's own steps stay well inside.
pytestmark = pytest.mark.timeout(FARM_TIMEOUT_S)


def _fill(path: str, ids: dict[str, str], mine: bool = True) -> str:
    """``path`` with its parameters filled: this tenant's ids (or, ``mine=False``, teamb's)."""
    session = ids["session"] if mine else ids["teamb"]
    if path.startswith("/api/v1/alerts/{id}"):
        return path.replace("{id}", ids["alert"])
    if path.startswith(("/api/v1/sessions/{id}", "/sessions/{id}")):
        return path.replace("{id}", session)
    if path == "/api/v1/keys/{id}":
        return path.replace("{id}", ids["key"])
    if path == "/api/v1/subscriptions/{id}":
        return path.replace("{id}", ids["subscription"])
    if path.startswith("/api/v1/recordings/{"):
        return path.replace("{id}", ids["rec_b"]).replace("{a}", ids["rec_a"]).replace("{b}", ids["rec_b"])
    if path.startswith("/api/v1/diff/{a}/{b}"):
        return path.replace("{a}", ids["other"] if mine else session).replace("{b}", session)
    assert "{" not in path, f"tests/web/test_endpoints.py cannot fill the parameters of {path}: add it to _fill"
    return path


def _query(op: dict[str, Any], ids: dict[str, str]) -> dict[str, str]:
    """Values for the operation's required query parameters."""
    out = {}
    for p in op.get("parameters", []):
        if p["in"] == "query" and p.get("required"):
            assert p["name"] in ("target", "name"), f"no value for required parameter {p['name']}: add it to _query"
            # name: a test's id (/api/v1/tests/history); a test that never ran has no runs, still a 200
            out[p["name"]] = ids["target"] if p["name"] == "target" else "suite::test"
    return out


def _validate(doc: dict[str, Any], op: dict[str, Any], ctype: str, body: bytes, status: int = 200) -> None:
    """The body as the document says the answer of ``status`` looks."""
    content = op["responses"][str(status)].get("content", {})
    assert ctype in content or not content, (ctype, list(content))
    if ctype == "application/json":
        schema = content[ctype].get("schema")
        if schema:
            registry: Registry[Any] = Registry().with_resource("urn:api", DRAFT202012.create_resource(doc))
            ref = schema["$ref"].replace("#", "urn:api#") if "$ref" in schema else None
            jsonschema.Draft202012Validator({"$ref": ref} if ref else schema, registry=registry).validate(
                json.loads(body))
    elif ctype == "image/svg+xml":
        assert ElementTree.fromstring(body).tag.endswith("svg")


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method.upper(), op) for path, item in doc["paths"].items() for method, op in item.items()]


async def test_every_documented_endpoint_answers_a_key_and_validates(farm: Farm) -> None:
    async with aiohttp.ClientSession() as http:
        doc = await ready(farm, http)
        assert len(doc["paths"]) >= 12
        read = {"Authorization": f"Bearer {farm.keys['read']}"}
        for path, method, op in _operations(doc):
            if method != "GET":
                continue
            url = farm.web + _fill(path, farm.ids)
            headers = {"Authorization": f"Bearer {farm.keys['admin']}"} if path.startswith("/api/v1/keys") else read
            async with http.get(url, headers=headers, params=_query(op, farm.ids)) as resp:
                assert resp.status == 200, (path, await resp.text())
                if resp.content_type == "text/event-stream":
                    continue  # a live stream: its events are checked by its own tests
                _validate(doc, op, resp.content_type, await resp.read())


async def test_every_endpoint_refuses_no_key_a_bad_key_and_a_revoked_key(farm: Farm) -> None:
    async with aiohttp.ClientSession() as http:
        doc = await ready(farm, http)
        for path, method, op in _operations(doc):
            url = farm.web + _fill(path, farm.ids)
            for key in (None, "btk_0123456789ab_" + "x" * 43, farm.keys["revoked"]):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                async with http.request(method, url, headers=headers, params=_query(op, farm.ids),
                                        json={} if method == "POST" else None) as resp:
                    if path in PUBLIC:
                        assert resp.status == 200, path
                        continue
                    body = await resp.json(content_type=None)
                    assert (resp.status, resp.content_type) == (401, "application/problem+json"), (path, key, body)
                    assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_another_tenants_key_finds_none_of_this_tenants_builds(farm: Farm) -> None:
    async with aiohttp.ClientSession() as http:
        doc = await ready(farm, http)
        theirs = {"Authorization": f"Bearer {farm.keys['teamb']}"}
        mine = {farm.ids["ok"], farm.ids["failed"], farm.ids["alert"]}
        for path, method, op in _operations(doc):
            if method != "GET" or path in PUBLIC:
                continue
            url = farm.web + _fill(path, farm.ids)
            async with http.get(url, headers=theirs, params=_query(op, farm.ids)) as resp:
                if "{" in path:
                    assert resp.status == 404, (path, await resp.text())
                    continue
                if path.startswith("/api/v1/keys"):
                    assert resp.status == 403, path  # a read key manages no keys, of any tenant
                    continue
                assert resp.status == 200, (path, await resp.text())
                if resp.content_type == "text/event-stream":
                    continue
                text = await resp.text()
                assert not [i for i in mine if i in text], path  # nothing of this tenant leaks
        # Its own build, through its own key, is there.
        own = await get_json(http, f"{farm.web}/api/v1/sessions/{farm.ids['teamb']}", farm.keys["teamb"])
        assert own["id"] == farm.ids["teamb"]


async def test_changes_need_a_write_key_and_keys_an_admin_key(farm: Farm) -> None:
    async with aiohttp.ClientSession() as http:
        doc = await ready(farm, http)
        changes = [(p, m, op) for p, m, op in _operations(doc) if m in ("POST", "DELETE")]
        assert changes
        bodies = {"mute": {"duration": "1h"}, "subscriptions": {"id": "from-the-sweep", "kind": "nats", "subject": "s"}}
        for path, method, op in changes:
            url = farm.web + _fill(path, farm.ids)
            body = next((b for word, b in bodies.items() if path.endswith(word)), {}) if method == "POST" else None
            admin = path.startswith(("/api/v1/keys", "/api/v1/subscriptions"))
            ok = 201 if (admin and method == "POST") else 204 if admin else 200
            tries = (("read", 403), ("teamb", 403), ("write", 403), ("teamb_admin", 404 if "{" in path else 201),
                     ("admin", ok)) if admin else (("read", 403), ("teamb", 403), ("write", 200))
            for key, expected in tries:
                if admin and key == "teamb_admin" and method == "POST":
                    continue  # it may create keys, for its own tenant: test_keys_over_http
                async with http.request(method, url, json=body,
                                        headers={"Authorization": f"Bearer {farm.keys[key]}"}) as resp:
                    got = await resp.read()
                    assert resp.status == expected, (path, method, key, got[:500])
                    if expected in (200, 201):
                        _validate(doc, op, resp.content_type, got, expected)


async def test_a_failed_make_build_is_stored_as_failed_with_its_failing_target(farm: Farm) -> None:
    async with aiohttp.ClientSession() as http:
        await ready(farm, http)
        failed = await get_json(http, f"{farm.web}/api/v1/sessions/{farm.ids['failed']}", farm.keys["read"])
        assert failed["outcome"] == "failed" and failed["exit_code"] != 0
        assert [t["name"].rsplit("/", 1)[-1] for t in failed["targets"] if t["status"] == "failed"] == ["broken"]
        page = await get_json(http, f"{farm.web}/api/v1/sessions?outcome=failed", farm.keys["read"])
        assert farm.ids["failed"] in {s["id"] for s in page["sessions"]}
        assert farm.ids["ok"] not in {s["id"] for s in page["sessions"]}


async def test_keys_over_http_an_admin_manages_its_tenants_keys(farm: Farm) -> None:
    async with aiohttp.ClientSession() as http:
        await ready(farm, http)
        admin = {"Authorization": f"Bearer {farm.keys['admin']}"}
        async with http.post(f"{farm.web}/api/v1/keys", json={"scope": "read", "name": "grafana"},
                             headers=admin) as resp:
            assert resp.status == 201
            made = await resp.json()
        key, rec = made["key"], made["record"]
        assert key.startswith("btk_") and (rec["tenant"], rec["scope"], rec["name"]) == ("buildtel", "read", "grafana")
        listed = await get_json(http, f"{farm.web}/api/v1/keys", farm.keys["admin"])
        assert rec["id"] in {k["id"] for k in listed["keys"]} and key not in json.dumps(listed)
        assert {k["tenant"] for k in listed["keys"]} == {"buildtel"}  # teamb's keys are not shown
        assert (await get_json(http, f"{farm.web}/api/v1/sessions", key))["sessions"]
        theirs = await get_json(http, f"{farm.web}/api/v1/keys", farm.keys["teamb_admin"])
        assert rec["id"] not in {k["id"] for k in theirs["keys"]}
        async with http.post(f"{farm.web}/api/v1/keys", json={"tenant": "teamb"}, headers=admin) as resp:
            assert resp.status == 403  # an admin of one tenant makes no keys for another
        async with http.delete(f"{farm.web}/api/v1/keys/{rec['id']}", headers=admin) as resp:
            assert resp.status == 204
        async with http.get(f"{farm.web}/api/v1/sessions", headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 401  # revoked: at once


async def test_subscriptions_over_http_an_admin_makes_them_and_no_one_reads_a_secret(farm: Farm) -> None:
    async with aiohttp.ClientSession() as http:
        await ready(farm, http)
        admin = {"Authorization": f"Bearer {farm.keys['admin']}"}
        url = f"{farm.web}/api/v1/subscriptions"
        hook = {"id": "ci-hook", "kind": "webhook", "url": "https://ci.example.com/hooks/build?token=t0k3n",
                "branches": ["release/*"], "min_confidence": 0.9}
        async with http.post(url, json=hook, headers=admin) as resp:
            assert resp.status == 201, await resp.text()
            made = await resp.json()
        secret = made["secret"]
        assert len(secret) >= 40 and made["subscription"]["secret_hint"] == "…" + secret[-4:]
        assert made["subscription"]["url"] == "https://ci.example.com/…" and made["subscription"]["source"] == "api"
        listed = await get_json(http, url, farm.keys["read"])  # a read key lists them
        mine = next(s for s in listed["subscriptions"] if s["id"] == "ci-hook")
        assert mine["branches"] == ["release/*"] and mine["tenants"] == ["buildtel"]
        assert secret not in json.dumps(listed) and "t0k3n" not in json.dumps(listed)
        theirs = await get_json(http, url, farm.keys["teamb_admin"])
        assert "ci-hook" not in {s["id"] for s in theirs["subscriptions"]}  # another tenant's are not shown
        for body, status, words in (({**hook}, 409, "exists already"),
                                    ({**hook, "id": "x", "url": "ftp://nope"}, 400, "url"),
                                    ({**hook, "id": "x", "tenants": ["teamb"]}, 400, "tenants"),
                                    ({**hook, "id": "x", "colour": "red"}, 400, "colour")):
            async with http.post(url, json=body, headers=admin) as resp:
                problem = await resp.json(content_type=None)
                assert resp.status == status and words in problem["detail"], (body, problem)
        async with http.delete(f"{url}/ci-hook", headers={"Authorization": f"Bearer {farm.keys['teamb_admin']}"}) \
                as resp:
            assert resp.status == 404  # another tenant's admin cannot delete it
        async with http.delete(f"{url}/ci-hook", headers=admin) as resp:
            assert resp.status == 204
        assert "ci-hook" not in {s["id"] for s in (await get_json(http, url, farm.keys["read"]))["subscriptions"]}
