"""A running stack for the web API tests: storage, analyzer and web services on the test
NATS and Redis, sessions published as the collector publishes them, a real HTTP client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jsonschema
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from buildtel.services.analyzer.service import AnalyzerService
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.service import StorageService
from buildtel.services.tracer.service import TracerService
from buildtel.services.web.service import WebService
from buildtel.shared.codec import encode
from buildtel.shared.protocol import BuildSession
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.recorder.recordings import recorder  # noqa: F401 - a fixture: the recorder service
from tests.storage.conftest import build_session
from tests.web.farm import farm  # noqa: F401 - a fixture: a real farm for every module that asks (farm.py)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Wait (bounded) until ``check`` holds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


class Api:
    """The web service under test, a real HTTP client, and its OpenAPI document to check against."""

    def __init__(self, web: WebService, http: aiohttp.ClientSession) -> None:
        self.web, self.http = web, http
        self.doc: dict[str, Any] = {}

    async def get(self, path: str, **params: Any) -> tuple[int, str, Any]:
        async with self.http.get(self.web.url + path, params=params or None) as resp:
            return resp.status, resp.content_type, await resp.json(content_type=None)

    def check(self, body: Any, component: str) -> None:
        """``body`` validates against ``#/components/schemas/<component>`` of the served document."""
        registry: Registry[Any] = Registry().with_resource("urn:api", DRAFT202012.create_resource(self.doc))
        schema = {"$ref": f"urn:api#/components/schemas/{component}"}
        jsonschema.Draft202012Validator(schema, registry=registry).validate(body)

    def check_problem(self, status: int, ctype: str, body: Any, expected: int) -> None:
        assert (status, ctype) == (expected, "application/problem+json"), body
        self.check(body, "Problem")
        assert body["status"] == expected and body["detail"]


async def publish(nc: Any, settings: Settings, sessions: list[BuildSession]) -> None:
    js = nc.jetstream()
    for s in sessions:
        await js.publish(Subjects(settings.namespace).sessions_completed, encode(s), headers={"Nats-Msg-Id": s.id})


@pytest.fixture
def make_session() -> Callable[..., BuildSession]:
    return build_session


@pytest.fixture
async def stack(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[list[Any]]:
    services: list[Any] = []
    try:
        for cls in (StorageService, AnalyzerService):
            svc = cls(settings, settings.nats_url or "", settings.redis_url or "")
            await svc.start()
            services.append(svc)
        tracer = TracerService(settings, settings.nats_url or "", settings.redis_url or "", otlp_port=0)
        await tracer.start()
        services.append(tracer)
        yield services
    finally:
        for svc in reversed(services):
            await svc.stop()


@pytest.fixture
async def api(settings: Settings, stack: list[Any]) -> AsyncIterator[Api]:
    web = WebService(settings, settings.nats_url or "", settings.redis_url or "")
    await web.start()
    try:
        async with aiohttp.ClientSession() as http:
            client = Api(web, http)
            status, _, client.doc = await client.get("/api/v1/openapi.json")
            assert status == 200
            yield client
    finally:
        await web.stop()


async def stored(nc: Any, settings: Settings, count: int) -> None:
    client = StorageClient(nc, Subjects(settings.namespace))

    async def enough() -> bool:
        return (await client.stats()).sessions >= count

    await eventually(enough)
