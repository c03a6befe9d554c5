"""The web service as a user meets it: ``buildtel up`` starts it and says where, ``buildtel run``
ends with the session's link, and the link answers with the session."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cli.test_stack import (
    buildtel,
    embedded_stack,  # noqa: F401 - a fixture the up fixture asks for by name
)


@pytest.fixture
def up(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[dict[str, str], dict[str, Any], Path]]:
    """``buildtel up`` running (tests/cli/test_stack.py's fixture): its environment, stack.json and log."""
    _cache, env, info, _proc = request.getfixturevalue("embedded_stack")
    yield env, info, tmp_path / "up.log"


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url, headers={"Accept": "application/json"}) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_up_serves_the_api_and_run_ends_with_a_link_that_answers(up: Any, tmp_path: Path) -> None:
    env, info, log = up
    web = info["web_url"]
    assert web.startswith("http://127.0.0.1:") and "web" in info["services"]
    assert f"dashboard {web}/ · web API {web}/api/v1/ (open: no API key or token set, loopback only)" \
        in log.read_text()
    status, health = await _get(web + "/healthz")
    assert (status, health["status"]) == (200, "ok")

    run = buildtel("run", "--json", "--", sys.executable, "-c", "pass", env=env)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    sid = summary["session_id"]
    assert summary["url"] == f"{web}/sessions/{sid}"
    last = run.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"buildtel: session {sid} success in ") and last.endswith(f"s — {web}/sessions/{sid}")

    deadline = time.monotonic() + 30
    while True:  # storage files the session moments after the run ends
        status, body = await _get(summary["url"])
        if status == 200 or time.monotonic() > deadline:
            break
        assert status == 404, body
        await _sleep_briefly()
    assert (status, body["id"], body["outcome"]) == (200, sid, "success")

    behind = buildtel("run", "--json", "--", sys.executable, "-c", "pass",
                      env={**env, "BUILDER_TELEMETRY_WEB_URL": "https://builds.example.com/"})
    summary = json.loads(behind.stdout)
    assert summary["url"] == f"https://builds.example.com/sessions/{summary['session_id']}"


async def _sleep_briefly() -> None:
    import asyncio

    await asyncio.sleep(0.1)


async def test_keys_create_list_revoke_close_and_reopen_the_api(up: Any) -> None:
    env, info, _ = up
    url = info["web_url"] + "/api/v1/sessions"
    listed = buildtel("keys", "list", env=env)
    assert listed.returncode == 0 and "no API keys" in listed.stderr
    created = buildtel("keys", "create", "--tenant", "buildtel", "--scope", "read", "--name", "grafana", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("btk_") and "shown only now" in created.stderr and key not in created.stderr
    key_id = key[4:16]
    listed = buildtel("keys", "list", "--json", env=env)
    [record] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert record == {"id": key_id, "tenant": "buildtel", "scope": "read", "name": "grafana",
                      "created": record["created"]}
    assert key not in listed.stdout

    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 401  # a key exists: the API is no longer open
        async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200
        revoked = buildtel("keys", "revoke", key_id, env=env)
        assert revoked.returncode == 0 and f"revoked key {key_id}" in revoked.stderr
        async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200  # no keys left: open again on loopback
    again = buildtel("keys", "revoke", key_id, env=env)
    assert again.returncode != 0 and "no API key has id" in again.stderr
    bad = buildtel("keys", "create", "--tenant", "no spaces please", env=env)
    assert bad.returncode != 0 and "is not a namespace" in bad.stderr


@pytest.fixture
def two_tenant_stack(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], dict[str, Any]]]:
    """``buildtel up`` serving two tenants: its own namespace and ``teamb``."""
    from tests.web.farm import running_stack

    with running_stack(tmp_path, BUILDER_TELEMETRY_TENANTS="teamb") as stack:
        yield stack


async def test_one_stack_serves_two_tenants_each_key_sees_its_own(two_tenant_stack: Any) -> None:
    cache, env, info = two_tenant_stack
    assert info["tenants"] == ["teamb"]
    # `up` prints its summary just after stack.json says running: read its log until the line is there.
    log, deadline = cache.parent / "up.log", time.monotonic() + 30
    while "tenants: buildtel, teamb" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        await asyncio.sleep(0.1)
    # teamb's tracer takes OTLP on a port of its own, not the stack's 4318.
    assert info["tenant_otlp"]["teamb"].startswith("http://127.0.0.1:") and ":4318/" not in info["tenant_otlp"]["teamb"]
    web = info["web_url"]
    ids = {}
    for ns in ("buildtel", "teamb"):
        run = buildtel("run", "--json", "--", sys.executable, "-c", "pass",
                       env={**env, "BUILDER_TELEMETRY_NAMESPACE": ns})
        assert run.returncode == 0, run.stderr
        ids[ns] = json.loads(run.stdout)["session_id"]
    assert (cache / "tenants" / "teamb" / "telemetry").is_dir()  # the tenant's own store
    keys = {}
    for ns in ("buildtel", "teamb"):
        made = buildtel("keys", "create", "--tenant", ns, env=env)
        assert made.returncode == 0, made.stderr
        keys[ns] = made.stdout.strip()
    async with aiohttp.ClientSession() as http:
        for ns, other in (("buildtel", "teamb"), ("teamb", "buildtel")):
            auth = {"Authorization": f"Bearer {keys[ns]}"}
            deadline = time.monotonic() + 60
            while True:  # storage files each session moments after its run ends
                async with http.get(f"{web}/api/v1/sessions", headers=auth) as resp:
                    assert resp.status == 200
                    page = await resp.json()
                if page["sessions"] or time.monotonic() > deadline:
                    break
                await _sleep_briefly()
            assert [s["id"] for s in page["sessions"]] == [ids[ns]]
            async with http.get(f"{web}/api/v1/sessions/{ids[ns]}", headers=auth) as resp:
                assert resp.status == 200
            async with http.get(f"{web}/api/v1/sessions/{ids[other]}", headers=auth) as resp:
                assert resp.status == 404  # another tenant's build does not exist for this key
