"""API keys and tenants on a running web service: no key, a wrong key, a revoked key, a key of the
wrong scope and another tenant's key each get what a user expects; keys are rate limited."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from buildtel.services.storage.service import StorageService
from buildtel.services.web.service import WebService
from buildtel.shared import apikeys
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings
from tests.web.conftest import publish, stored

ENDPOINTS = ("/api/v1/sessions", "/api/v1/sessions/{sid}", "/api/v1/report", "/api/v1/alerts")


@pytest.fixture
async def other_tenant(settings: Settings, nc: Any, tmp_path: Any) -> AsyncIterator[Settings]:
    """A second namespace with its own storage service: another team on the same stack."""
    other = settings.with_(namespace="t" + uuid.uuid4().hex[:12], cache_dir=tmp_path / "other")
    svc = StorageService(other, other.nats_url or "", other.redis_url or "")
    await svc.start()
    try:
        yield other
    finally:
        await svc.stop()
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name.startswith((other.namespace.upper(), f"OBJ_{other.namespace.upper()}")):
                await js.delete_stream(info.config.name)


async def _status(http: aiohttp.ClientSession, url: str, key: str | None) -> tuple[int, str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with http.get(url, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.json(content_type=None)


async def test_keys_scopes_revocation_and_tenant_isolation(settings: Settings, stack: Any, other_tenant: Settings,
                                                           nc: Any, redis_client: Any, make_session: Any,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    mine, theirs = make_session(0), make_session(1)
    await publish(nc, settings, [mine])
    await publish(nc, other_tenant, [theirs])
    await stored(nc, settings, 1)
    await stored(nc, other_tenant, 1)
    keys = Keys(settings.namespace)
    read_key, read_rec = await apikeys.create(redis_client, keys, tenant=settings.namespace, scope="read")
    admin_key, _ = await apikeys.create(redis_client, keys, tenant=settings.namespace, scope="admin")
    ingest_key, _ = await apikeys.create(redis_client, keys, tenant=settings.namespace, scope="ingest")
    write_key, _ = await apikeys.create(redis_client, keys, tenant=settings.namespace, scope="write")
    other_key, _ = await apikeys.create(redis_client, keys, tenant=other_tenant.namespace, scope="read")
    assert read_key.startswith("btk_") and read_rec.id in read_key
    stored_fields = await redis_client.hgetall(keys.api_key(read_rec.id))
    assert read_key.encode() not in b"".join(stored_fields.values()), "the key itself is stored"

    web = WebService(settings, settings.nats_url or "", settings.redis_url or "")
    await web.start()
    try:
        async with aiohttp.ClientSession() as http:
            for path in ENDPOINTS:
                url = web.url + path.format(sid=mine.id)
                for key in (None, "btk_0123456789ab_" + "x" * 43, "not-a-key"):
                    status, ctype, body = await _status(http, url, key)
                    assert (status, ctype) == (401, "application/problem+json"), (path, key, body)
                status, _, body = await _status(http, url, ingest_key)
                assert status == 403 and "scope 'ingest'" in body["detail"]
                for key in (read_key, write_key, admin_key):
                    status, _, body = await _status(http, url, key)
                    assert status == 200, (path, body)
            # Each tenant sees its own sessions only; the other's id is not found, not forbidden.
            _, _, page = await _status(http, web.url + "/api/v1/sessions", other_key)
            assert [s["id"] for s in page["sessions"]] == [theirs.id]
            status, _, _ = await _status(http, web.url + f"/api/v1/sessions/{mine.id}", other_key)
            assert status == 404
            status, _, _ = await _status(http, web.url + f"/api/v1/sessions/{theirs.id}", read_key)
            assert status == 404
            status, _, _ = await _status(http, web.url + f"/api/v1/sessions/{theirs.id[:8]}", read_key)
            assert status == 404
            # Public without a key: the health check and the API's description.
            for path in ("/healthz", "/api/v1/openapi.json"):
                async with http.get(web.url + path) as resp:
                    assert resp.status == 200
            assert await apikeys.revoke(redis_client, keys, read_rec.id)
            status, _, _ = await _status(http, web.url + "/api/v1/sessions", read_key)
            assert status == 401
    finally:
        await web.stop()
    out = capfd.readouterr()
    for key in (read_key, admin_key, ingest_key, write_key, other_key):
        assert key not in out.out + out.err, "a key was logged"


async def test_a_key_past_its_rate_gets_429_with_retry_after(settings: Settings, stack: Any,
                                                             redis_client: Any) -> None:
    key, _ = await apikeys.create(redis_client, Keys(settings.namespace), tenant=settings.namespace, scope="read")
    web = WebService(settings.with_(web_rate_limit=3), settings.nats_url or "", settings.redis_url or "")
    await web.start()
    try:
        async with aiohttp.ClientSession() as http:
            # Eight requests within at most two one-minute windows: one window gets four or more,
            # so a 429 must come, after three that passed.
            statuses: list[int] = []
            while 429 not in statuses:
                assert len(statuses) < 8, statuses
                async with http.get(web.url + "/api/v1/alerts", headers={"Authorization": f"Bearer {key}"},
                                    params={"limit": 1}) as resp:
                    statuses.append(resp.status)
                    retry = resp.headers.get("Retry-After")
                    body = await resp.json(content_type=None)
            assert statuses[-4:] == [200, 200, 200, 429]
            assert retry is not None and 1 <= int(retry) <= 60
            assert body["status"] == 429 and "more than 3 requests" in body["detail"]
    finally:
        await web.stop()


async def test_beyond_loopback_it_starts_only_with_keys(settings: Settings, stack: Any, redis_client: Any) -> None:
    exposed = settings.with_(http_host="0.0.0.0")
    web = WebService(exposed, settings.nats_url or "", settings.redis_url or "")
    with pytest.raises(ValueError, match="beyond loopback, without keys"):
        await web.start()
    await apikeys.create(redis_client, Keys(settings.namespace), tenant=settings.namespace, scope="read")
    web = WebService(exposed, settings.nats_url or "", settings.redis_url or "")
    await web.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{web.port}/api/v1/sessions") as resp:
                assert resp.status == 401
            # Revoking the last key never opens an API that listens beyond loopback.
            for rec in await apikeys.list_keys(redis_client, Keys(settings.namespace)):
                await apikeys.revoke(redis_client, Keys(settings.namespace), rec.id)
            async with http.get(f"http://127.0.0.1:{web.port}/api/v1/sessions") as resp:
                assert resp.status == 401
    finally:
        await web.stop()


async def test_an_open_api_hands_out_no_keys(settings: Settings, stack: Any) -> None:
    """With no key at all the API is open on loopback, to anyone on the machine: it must not let
    them make the first (admin) key; that takes `buildtel keys create` and the stack's Redis."""
    web = WebService(settings, settings.nats_url or "", settings.redis_url or "")
    await web.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(web.url + "/api/v1/keys", json={"scope": "admin"}) as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 403 and "buildtel keys create" in body["detail"]
            async with http.get(web.url + "/api/v1/keys") as resp:
                assert resp.status == 403
            async with http.get(web.url + "/api/v1/sessions") as resp:
                assert resp.status == 200  # still open for reading
    finally:
        await web.stop()
