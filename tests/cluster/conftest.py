"""A real 3-node NATS JetStream cluster per test (its own, so a test may kill its nodes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from buildtel.shared.auth import StackAuth
from buildtel.shared.natscluster import NatsCluster
from buildtel.shared.settings import Settings


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60.0, what: str = "condition") -> None:
    """Wait for ``check`` with a generous deadline (a loaded machine elects leaders slowly)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s")
        await asyncio.sleep(0.1)


@pytest.fixture
async def cluster(tmp_path: Path, namespace: str) -> AsyncIterator[NatsCluster]:
    c = NatsCluster(tmp_path / "nats-cluster", 3, auth=StackAuth.generate(), namespace=namespace)
    try:
        await asyncio.to_thread(c.start)
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster_settings(settings: Settings, cluster: NatsCluster) -> Settings:
    """The test's settings on the cluster: every node's URL, its credentials, R3."""
    return settings.with_(nats_url=cluster.url, stack_auth=cluster.auth, replicas=3)
