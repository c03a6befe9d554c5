"""What ``BuildFinished.expected_events`` counts: every event of the agent, its build_finished included.

docs/protocol.md ("What expected_events counts") says so; these tests hold the collector to it
against real NATS and Redis.  One event of the finishing agent is held back: with counts that
include build_finished the session waits for it; with counts one short it completes without it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from buildtel.services.collector.service import CollectorService
from buildtel.shared.keys import Keys
from buildtel.shared.protocol import BuildFinished, TargetFinished
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import completed_sessions, publish_events, synthetic_build

AGENTS = ("coord", "worker")


@pytest.fixture
async def collector(settings: Settings, redis_client: object) -> AsyncIterator[CollectorService]:
    # A long gap wait: a session lacking counted events waits for them instead of completing
    # incomplete while this test is still holding one back.
    cfg = dataclasses.replace(settings, gap_wait_s=600.0)
    svc = CollectorService(cfg, cfg.nats_url or "", cfg.redis_url or "")
    await svc.start()
    yield svc
    await svc.stop()


async def _folded(redis_client, settings: Settings, sid: str, agent: str, n: int) -> None:
    key = Keys(settings.namespace).session_meta(sid)
    for _ in range(600):  # the collector folds as fast as the machine lets it; bounded at ~60 s
        if int(await redis_client.hget(key, f"n:{agent}") or 0) >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the collector never folded {n} events of {agent}")


def _build(one_short: bool):
    sid, per_agent, expected = synthetic_build(agents=AGENTS, targets=20, seed=9)
    coord = per_agent["coord"]
    fin = coord[-1]
    assert isinstance(fin, BuildFinished) and fin.expected_events is not None
    # synthetic_build counts like an agent should: the coordinator's count includes build_finished.
    assert fin.expected_events == {"coord": len(coord), "worker": len(per_agent["worker"])}
    if one_short:
        fin.expected_events["coord"] -= 1
    held = next(i for i, e in enumerate(coord) if isinstance(e, TargetFinished))
    return sid, per_agent, expected, held


async def test_counts_including_build_finished_wait_for_a_held_back_event(settings, nc, redis_client,
                                                                          collector) -> None:
    js, subjects = nc.jetstream(), Subjects(settings.namespace)
    sid, per_agent, expected, held = _build(one_short=False)
    coord = per_agent["coord"]
    await publish_events(js, subjects, sid, "worker", per_agent["worker"])
    await publish_events(js, subjects, sid, "coord", coord[:held] + coord[held + 1:])
    await _folded(redis_client, settings, sid, "coord", len(coord) - 1)
    await _folded(redis_client, settings, sid, "worker", len(per_agent["worker"]))
    assert await completed_sessions(js, subjects, 1, timeout=2) == []  # still waiting for the held event
    await publish_events(js, subjects, sid, "coord", [coord[held]])
    [session] = await completed_sessions(js, subjects, 1, timeout=60)
    assert len(session.targets) == expected["targets"]
    assert session.totals.events == sum(coord[-1].expected_events.values())  # type: ignore[union-attr]
    assert session.completeness is not None and session.completeness.complete


async def test_counts_one_short_complete_without_the_last_event(settings, nc, redis_client, collector) -> None:
    js, subjects = nc.jetstream(), Subjects(settings.namespace)
    sid, per_agent, expected, held = _build(one_short=True)
    coord = per_agent["coord"]
    await publish_events(js, subjects, sid, "worker", per_agent["worker"])
    await publish_events(js, subjects, sid, "coord", coord[:held] + coord[held + 1:])
    [session] = await completed_sessions(js, subjects, 1, timeout=60)
    assert len(session.targets) == expected["targets"] - 1  # the held-back target is not in it
    assert session.completeness is not None and not session.completeness.complete
