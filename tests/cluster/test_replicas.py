"""Every stream, object store and durable consumer has BUILDER_TELEMETRY_REPLICAS copies."""

from __future__ import annotations

import pytest

from buildtel.services import registry
from buildtel.shared.bus import StreamReplicasError, connect_nats, ensure_streams
from buildtel.shared.natscluster import NatsCluster
from buildtel.shared.settings import Settings, SettingsError
from buildtel.shared.subjects import Subjects
from tests.cluster.conftest import eventually


async def _streams(js, namespace: str) -> dict[str, object]:
    prefix = namespace.upper()
    return {i.config.name: i for i in await js.streams_info() if i.config.name.startswith((prefix, f"OBJ_{prefix}"))}


async def test_services_on_a_cluster_declare_streams_and_consumers_with_three_replicas(
        cluster: NatsCluster, cluster_settings: Settings) -> None:
    s = cluster_settings
    services = [registry.create(n, s, cluster.url, s.redis_url or "") for n in ("collector", "storage", "analyzer")]
    started = []
    try:
        for svc in services:
            await svc.start()
            started.append(svc)
        nc = await connect_nats(s, cluster.url, name="test", role="operator")
        try:
            js = nc.jetstream()
            streams = await _streams(js, s.namespace)
            subjects = Subjects(s.namespace)
            # The shared five, the analyzer's alerts stream; the object stores are streams too.
            assert {subjects.events_stream, subjects.sessions_stream, subjects.dead_letter_stream,
                    f"OBJ_{subjects.sessions_bucket}", f"OBJ_{subjects.logs_bucket}"} <= set(streams)
            assert any(name.endswith("_ALERTS") for name in streams)
            for name, info in streams.items():
                assert info.config.num_replicas == 3, name
                assert info.cluster is not None and len(info.cluster.replicas or []) == 2, name  # leader + 2
            durables = 0
            for name in streams:
                for ci in await js.consumers_info(name):
                    if ci.config.durable_name:
                        durables += 1
                        assert ci.config.num_replicas == 3, (name, ci.name)
                        assert ci.cluster is not None and len(ci.cluster.replicas or []) == 2, (name, ci.name)
            assert durables >= 3  # collector (events), storage and analyzer (sessions)
        finally:
            await nc.close()
    finally:
        for svc in reversed(started):
            await svc.stop()


async def test_an_existing_stream_keeps_its_count_unless_one_is_asked_then_it_is_updated(
        cluster: NatsCluster, cluster_settings: Settings) -> None:
    s = cluster_settings
    subjects = Subjects(s.namespace)
    nc = await connect_nats(s, cluster.url, name="test", role="operator")
    try:
        js = nc.jetstream()
        await ensure_streams(js, subjects, replicas=1)  # as a single-node deployment made them
        await ensure_streams(js, subjects)  # a client with the setting unset: no change
        assert {i.config.num_replicas for i in (await _streams(js, s.namespace)).values()} == {1}
        names = set(await _streams(js, s.namespace))
        await ensure_streams(js, subjects, replicas=3)  # BUILDER_TELEMETRY_REPLICAS=3: scaled up

        async def scaled() -> bool:  # each stream's two new copies catch up with its leader
            for name in names:
                info = await js.stream_info(name)
                peers = info.cluster.replicas or [] if info.cluster else []
                if info.config.num_replicas != 3 or len(peers) != 2 or not all(p.current for p in peers):
                    return False
            return True

        await eventually(scaled, what="every stream with 3 current replicas")
        with pytest.raises(StreamReplicasError) as err:  # more copies than servers: said, not hidden
            await ensure_streams(js, subjects, replicas=5)
        assert subjects.events_stream in str(err.value) and "BUILDER_TELEMETRY_REPLICAS asks for 5" in str(err.value)
    finally:
        await nc.close()


async def test_replicas_on_a_single_server_is_a_clear_error(settings: Settings, nc) -> None:
    with pytest.raises(StreamReplicasError) as err:
        await ensure_streams(nc.jetstream(), Subjects(settings.namespace), replicas=3)
    text = str(err.value)
    assert Subjects(settings.namespace).events_stream in text and "3 replicas" in text
    assert "BUILDER_TELEMETRY_REPLICAS" in text and "non-clustered" in text


def test_the_setting_is_read_and_checked() -> None:
    assert Settings.from_env({"BUILDER_TELEMETRY_REPLICAS": "3"}).replicas == 3
    assert Settings.from_env({}).replicas is None
    with pytest.raises(SettingsError, match="BUILDER_TELEMETRY_REPLICAS"):
        Settings.from_env({"BUILDER_TELEMETRY_REPLICAS": "7"})


async def test_raising_the_setting_converges_a_running_farms_streams_and_durable_consumers(
        cluster: NatsCluster, cluster_settings: Settings) -> None:
    """A farm first run with 1 replica, restarted with BUILDER_TELEMETRY_REPLICAS=3: its stream and
    its durable consumer (which JetStream does not scale with the stream) get 3 copies."""
    subjects = Subjects(cluster_settings.namespace)
    for replicas in (1, 3):
        s = cluster_settings.with_(replicas=replicas)
        svc = registry.create("storage", s, cluster.url, s.redis_url or "")
        await svc.start()
        await svc.stop()
    nc = await connect_nats(cluster_settings, cluster.url, name="test", role="operator")
    try:
        js = nc.jetstream()

        async def converged() -> bool:
            stream = await js.stream_info(subjects.sessions_stream)
            durables = [c for c in await js.consumers_info(subjects.sessions_stream) if c.config.durable_name]
            return stream.config.num_replicas == 3 and len(durables) == 1 and all(
                c.config.num_replicas == 3 and c.cluster is not None and len(c.cluster.replicas or []) == 2
                for c in durables)

        await eventually(converged, what="the sessions stream and storage's consumer at 3 replicas")
    finally:
        await nc.close()
