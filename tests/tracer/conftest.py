"""Fixtures of the tracer tests: a running TracerService on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from buildtel.services.tracer.query import TraceClient
from buildtel.services.tracer.service import TracerService
from buildtel.services.tracer.subjects import TracerSubjects
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects


@pytest.fixture
def tracer_settings(settings: Settings) -> Settings:
    # fsync off: these tests are about behaviour, not power-loss durability.
    return settings.with_(fsync=False)


@pytest.fixture
async def tracer(tracer_settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[TracerService]:
    svc = TracerService(tracer_settings, tracer_settings.nats_url or "", tracer_settings.redis_url or "",
                        otlp_port=0)
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
def client(nc: Any, settings: Settings) -> TraceClient:
    return TraceClient(nc, TracerSubjects(Subjects(settings.namespace)), timeout=5.0)
