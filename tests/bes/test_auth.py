"""The BES endpoint takes the project's API keys (docs/bazel.md#auth-and-tenants): a call with
``authorization: Bearer <key>`` (Bazel's ``--bes_header=Authorization=Bearer <key>``) lands in the
key's tenant; a revoked key, a key of the wrong scope or none at all is refused (a real Bazel
without a key too, its build unharmed); beyond loopback without keys it never starts."""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from buildtel.services.bes.auth import InsecureBind
from buildtel.services.bes.service import BesService
from buildtel.services.collector.service import CollectorService
from buildtel.shared import apikeys
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.bes.client import read_bep_json, replay
from tests.bes.test_bazel import _bazel, _workspace
from tests.bes.test_replay import KAHLYS
from tests.util import completed_sessions, running


@pytest.fixture
async def tenant_stack(bes_settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[tuple[Settings, str]]:
    """The stack's collector, a tenant's collector and one BES endpoint serving both."""
    tenant = f"{bes_settings.namespace}_b"
    settings = dataclasses.replace(bes_settings, tenants=tenant)
    urls = (settings.nats_url or "", settings.redis_url or "")
    async with running(CollectorService(settings, *urls), CollectorService(settings.for_tenant(tenant), *urls)):
        yield settings, tenant


async def _endpoint(settings: Settings) -> BesService:
    svc = BesService(settings, settings.nats_url or "", settings.redis_url or "", port=0)
    await svc.start()
    return svc


async def test_real_bazel_without_a_key_is_refused_and_its_actions_still_run(
        tenant_stack: tuple[Settings, str], redis_client: Any, tmp_path: Path) -> None:
    # Bazel 4.2.3 (Debian's, the one here) has no --bes_header (Bazel >= 5 sends it as the
    # `authorization` metadata the next test sends) and does not send --remote_header to BES: it
    # can only be the caller without a key.  Once a key exists, loopback is no longer open.
    assert shutil.which("bazel"), "no bazel on PATH: apt-get install bazel-bootstrap (.ci/run does)"
    settings, tenant = tenant_stack
    await apikeys.create(redis_client, Keys(settings.namespace), tenant=tenant, scope="ingest")
    bes = await _endpoint(settings)
    try:
        ws = _workspace(tmp_path)
        # In Bazel's default upload mode every action runs, then Bazel reports the refusal with its own
        # exit code 38 (with --bes_upload_mode=fully_async it says nothing and exits 0: docs/bazel.md).
        rc, printed = await _bazel(ws, tmp_path, "//:b", f"--bes_backend={bes.url}")
        assert rc == 38, printed
        assert (ws / "bazel-bin" / "b.txt").read_text() == "b\n"
        assert bes.stream_calls == 0 and bes.refused >= 1  # no stream was taken
        assert "UNAUTHENTICATED" in printed and "revoked API key" in printed, printed
    finally:
        await bes.stop()


async def test_bearer_key_lands_in_its_tenant_until_revoked(tenant_stack: tuple[Settings, str], redis_client: Any,
                                                             nc: Any) -> None:
    settings, tenant = tenant_stack
    keys = Keys(settings.namespace)
    key, record = await apikeys.create(redis_client, keys, tenant=tenant, scope="ingest", name="farm")
    # Another key stays: with none at all a loopback endpoint is open again, as the web API.
    await apikeys.create(redis_client, keys, tenant=tenant, scope="read", name="dashboard")
    bes = await _endpoint(settings)
    try:
        events = read_bep_json(KAHLYS)
        target = bes.url.removeprefix("grpc://")
        bearer = (("authorization", f"Bearer {key}"),)  # what --bes_header=Authorization=Bearer <key> sends
        invocation = str(uuid.uuid4())
        result = await replay(target, events, invocation, metadata=bearer)
        assert result.acks == list(range(1, len(events) + 2))
        [live] = await completed_sessions(nc.jetstream(), Subjects(tenant), 1)  # the key's tenant
        assert live.id == invocation.replace("-", "") and live.outcome == "success"

        assert await apikeys.revoke(redis_client, keys, record.id)
        calls = bes.stream_calls
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await replay(target, events, str(uuid.uuid4()), metadata=bearer)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (err.value.details() or "")
        assert bes.stream_calls == calls
    finally:
        await bes.stop()


async def test_calls_without_a_live_ingest_key_are_refused(tenant_stack: tuple[Settings, str], redis_client: Any,
                                                           nc: Any) -> None:
    settings, _tenant = tenant_stack
    keys = Keys(settings.namespace)
    ingest, _ = await apikeys.create(redis_client, keys, tenant=settings.namespace, scope="ingest")
    read, _ = await apikeys.create(redis_client, keys, tenant=settings.namespace, scope="read")
    bes = await _endpoint(settings)
    try:
        events = read_bep_json(KAHLYS)
        target = bes.url.removeprefix("grpc://")
        refusals = [((), grpc.StatusCode.UNAUTHENTICATED),  # keys exist: loopback is no longer open
                    ((("authorization", "Bearer btk_000000000000_" + "x" * 43),), grpc.StatusCode.UNAUTHENTICATED),
                    ((("x-buildtel-api-key", read),), grpc.StatusCode.PERMISSION_DENIED)]
        for metadata, code in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await replay(target, events, str(uuid.uuid4()), metadata=metadata)
            assert err.value.code() == code, (metadata, err.value)
        assert bes.stream_calls == 0
        # The other header, a live ingest key of the stack's own namespace.
        invocation = str(uuid.uuid4())
        result = await replay(target, events, invocation, metadata=(("x-buildtel-api-key", ingest),))
        assert result.acks == list(range(1, len(events) + 2))
        [live] = await completed_sessions(nc.jetstream(), Subjects(settings.namespace), 1)
        assert live.id == invocation.replace("-", "")
    finally:
        await bes.stop()


async def test_beyond_loopback_without_keys_it_refuses_to_start(bes_settings: Settings, nc: Any,
                                                                redis_client: Any) -> None:
    svc = BesService(dataclasses.replace(bes_settings, http_host="0.0.0.0"), bes_settings.nats_url or "",
                     bes_settings.redis_url or "", port=0)
    with pytest.raises(InsecureBind, match="buildtel keys create --scope ingest"):
        await svc.start()
    await svc.stop()  # idempotent: nothing was left listening
    assert svc.bound_port == 0


async def test_a_taken_port_is_refused_not_shared(bes: BesService, bes_settings: Settings) -> None:
    # grpcio would share it (SO_REUSEPORT) and split the builds between two endpoints.
    second = BesService(bes_settings, bes_settings.nats_url or "", bes_settings.redis_url or "",
                        port=int(bes.url.rsplit(":", 1)[1]))
    with pytest.raises(OSError, match="BUILDER_TELEMETRY_BES_PORT"):
        await second.start()
    await second.stop()
