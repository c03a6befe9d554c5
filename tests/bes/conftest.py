"""Fixtures of the BES tests: a collector and the BES endpoint in this process, on the test bus."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from buildtel.services.bes.service import BesService
from buildtel.services.collector.service import CollectorService
from buildtel.shared.settings import Settings


@pytest.fixture
def bes_settings(settings: Settings) -> Settings:
    # A short inactivity timeout: a broken stream's session is stored as abandoned within seconds.
    return dataclasses.replace(settings, session_timeout_s=3.0, finish_grace_s=0.2)


@pytest.fixture
async def collector(bes_settings: Settings, nc: object, redis_client: object) -> AsyncIterator[CollectorService]:
    svc = CollectorService(bes_settings, bes_settings.nats_url or "", bes_settings.redis_url or "")
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def bes(bes_settings: Settings, collector: CollectorService) -> AsyncIterator[BesService]:
    svc = BesService(bes_settings, bes_settings.nats_url or "", bes_settings.redis_url or "", port=0)
    await svc.start()
    yield svc
    await svc.stop()
