"""The client tests run the SDK without the services, which declare the streams in a stack: an
agent's role may not (docs/protocol.md), so each test declares them as the operator would."""

from __future__ import annotations

import pytest

from buildtel.shared.bus import connect_nats, ensure_streams
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects


@pytest.fixture(autouse=True)
async def streams(settings: Settings) -> None:
    nc = await connect_nats(settings, settings.nats_url or "", name="test-operator", role="operator")
    try:
        await ensure_streams(nc.jetstream(), Subjects(settings.namespace))
    finally:
        await nc.close()
