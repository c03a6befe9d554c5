"""Shared fixtures: real NATS (JetStream) and Redis for every test that needs a bus.

When ``BUILDER_TELEMETRY_NATS_URL`` / ``BUILDER_TELEMETRY_REDIS_URL`` are set the
tests join those servers; otherwise one embedded nats-server and redis-server are
started on free loopback ports for the session (with ``BUILDER_TELEMETRY_TEST_REDIS=cluster``
a 3-master Redis Cluster instead of the single redis-server).  Each test gets its own
namespace (subjects, streams, Redis keys) and data directory, so tests never see
each other's data even on a shared server.  Fault tests start their own engines
through ``tests/engines.py`` so they can kill them.
"""

from __future__ import annotations

import os
import sysconfig
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from buildtel.shared.auth import StackAuth
from buildtel.shared.engines import NatsEngine, RedisEngine
from buildtel.shared.rediscluster import RedisClusterEngine
from buildtel.shared.settings import Settings

# Before any test imports grpc (tests/bes/client.py does, ahead of the product's services.bes):
# a worker that has served gRPC then forks nats-server for a fault test; gRPC core's fork support
# restarted its poller in the forked child, which aborted before exec (seen once in a loaded run,
# "nats-server exited with code -6": grpc/grpc#43055).  The product sets the same in services/bes.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# The per-user data directory (XDG) of anything started without BUILDER_TELEMETRY_CACHE_DIR: a
# temporary one for the test session, never the real user's history.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="buildtel-test-xdg-")

# Tools the test extras install (ninja, cmake) live next to this interpreter; put them first on
# PATH so the tests and the builds they run use them on a machine that has none of its own.
_scripts = sysconfig.get_path("scripts")
if _scripts and _scripts not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _scripts + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def stack_auth() -> StackAuth | None:
    """Role credentials of the embedded test engines (None when joining servers by URL, which
    carry their own)."""
    return None if os.environ.get("BUILDER_TELEMETRY_NATS_URL") else StackAuth.generate()


@pytest.fixture(scope="session")
def nats_url(engines_dir: Path, stack_auth: StackAuth | None) -> Iterator[str]:
    url = os.environ.get("BUILDER_TELEMETRY_NATS_URL")
    if url:
        yield url
        return
    # Roles scoped to any namespace: every test has a namespace of its own.
    with NatsEngine(engines_dir / "nats", auth=stack_auth, namespace="*") as eng:
        yield eng.url


@pytest.fixture(scope="session")
def redis_url(engines_dir: Path) -> Iterator[str]:
    url = os.environ.get("BUILDER_TELEMETRY_REDIS_URL")
    if url:
        yield url
        return
    mode = os.environ.get("BUILDER_TELEMETRY_TEST_REDIS", "single")
    if mode == "cluster":
        # The cluster pass (.ci/run, docs/scaling.md): a real 3-master Redis Cluster; a script or
        # MULTI touching two slots fails there, so passing tests prove the keys are tagged right.
        with RedisClusterEngine(engines_dir / "redis-cluster", masters=3) as cluster:
            yield cluster.url
        return
    if mode != "single":
        raise pytest.UsageError(f"BUILDER_TELEMETRY_TEST_REDIS={mode!r}: choose 'single' (default) or 'cluster'")
    with RedisEngine(engines_dir / "redis") as eng:
        yield eng.url  # carries the generated password


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def settings(tmp_path: Path, nats_url: str, redis_url: str, namespace: str,
             stack_auth: StackAuth | None) -> Settings:
    """Settings pointing at the test servers, an isolated namespace and data directory; each
    service connects with its own role's credentials."""
    return Settings(
        stack_auth=stack_auth,
        cache_dir=tmp_path / ".builder-cache",
        namespace=namespace,
        nats_url=nats_url,
        redis_url=redis_url,
        session_timeout_s=30.0,
        finish_grace_s=0.5,
        flush_interval_s=0.05,
        log_format="json",
    )


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[object]:
    from buildtel.shared.bus import connect_nats

    conn = await connect_nats(settings, settings.nats_url or "", name="test", role="operator")
    yield conn
    # Drop this test's streams so a shared NATS does not accumulate them.
    js = conn.jetstream()
    prefix = settings.namespace.upper()
    try:
        for name in await js.streams_info():
            if name.config.name.startswith((prefix, f"OBJ_{prefix}")):  # OBJ_: its object store bucket
                await js.delete_stream(name.config.name)
    except Exception:  # noqa: BLE001 - cleanup is best effort
        pass
    await conn.close()


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[object]:
    from buildtel.shared.bus import connect_redis

    r = connect_redis(settings.redis_url or "")
    yield r
    # Remove what this test's namespace wrote on a shared Redis.
    async for key in r.scan_iter(match=f"{settings.namespace}:*", count=1000):
        await r.delete(key)
    await r.aclose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The cluster pass runs only the tests that reach Redis through the ``redis_url`` fixture and
    are not marked ``single_redis``: the others (pure logic, or a stack of their own with its own
    Redis) would run the same as in the first pass, and CI's time is better spent elsewhere
    (docs/testing.md)."""
    if os.environ.get("BUILDER_TELEMETRY_TEST_REDIS") != "cluster":
        return
    def wanted(i: pytest.Item) -> bool:
        return "redis_url" in getattr(i, "fixturenames", ()) and i.get_closest_marker("single_redis") is None

    keep = [i for i in items if wanted(i)]
    dropped = [i for i in items if not wanted(i)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
async def storage(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[Settings]:
    """A storage service on the test's stack (no fsync: the tests do not pull the plug); yields the
    settings a client or ``buildtel`` uses to reach it.  Stopped in teardown."""
    from buildtel.services.storage.service import StorageService

    quick = settings.with_(fsync=False)
    async with StorageService(quick, quick.nats_url or "", quick.redis_url or ""):
        yield quick

