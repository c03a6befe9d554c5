"""Recordings for tests of the recorder's endpoints and the web API: made as ``buildtel run
--record`` makes them (a ``BuildRecorder`` capturing files, the build's events stored with it),
and event streams kept by the recorder service from flagged sessions on the bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from buildtel.services.recorder.service import RecorderService
from buildtel.shared.protocol import BuildStarted, TargetFinished
from buildtel.shared.recording.recorder import BuildRecorder
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import publish_events, synthetic_build


@pytest.fixture
async def recorder(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[RecorderService]:
    """The recorder service on the test NATS and Redis (a fixture: import it by name)."""
    svc = RecorderService(settings, settings.nats_url or "", settings.redis_url or "", hold_s=2.0)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


def make_recording(settings: Settings, work: Path, source: str, durations: dict[str, float],
                   cache: str = "miss", targets: int = 3) -> str:
    """A recording of a build in ``work`` reading ``main.c`` (``source``) and a Makefile; target
    ``t<i>`` takes ``durations['t<i>']`` seconds (1.0 when not given), ``t1`` has cache result
    ``cache``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "main.c").write_text(source)
    (work / "Makefile").write_text("all:\n\ttrue\n")
    sid, per_agent, _ = synthetic_build(targets=targets, seed=1)
    events = []
    for e in (e for evs in per_agent.values() for e in evs):
        if isinstance(e, TargetFinished):
            key = e.target.rsplit(":", 1)[-1]
            e = msgspec.structs.replace(e, duration_s=durations.get(key, 1.0), cache=cache if key == "t1" else e.cache)
        events.append(e)
    rec = BuildRecorder(store=RecordingStore.from_settings(settings))
    rec.start_recording(["make"], cwd=work, tools=(), env={"PATH": "/usr/bin", "CC": "gcc"}, session_id=sid)
    rec.record_input("main.c")
    rec.record_input("Makefile")
    return rec.stop_recording(0, events=events)


async def flagged_stream(js: Any, settings: Settings, targets: int = 12, seed: int = 3, *,
                         newer_than: str | None = None) -> tuple[str, int]:
    """Publish a build that asks to be recorded, as agents do; (its session id, its event count).

    ``newer_than`` (a recording id): first wait until the clock is past that recording's time by
    more than a file-time tick, so the stream's directory (timed by its mtime, which the kernel
    keeps at a coarse, jiffy granularity) sorts after it."""
    if newer_than is not None:
        created = RecordingStore.from_settings(settings).load_manifest(newer_than).created
        deadline = time.monotonic() + 5.0
        while time.time() <= created + 0.05:
            assert time.monotonic() < deadline, "the clock did not move"
            await asyncio.sleep(0.01)
    sid, per_agent, _ = synthetic_build(targets=targets, seed=seed)
    events = per_agent["agent-a"]
    events[0] = msgspec.structs.replace(events[0], record=True)
    assert isinstance(events[0], BuildStarted)
    await publish_events(js, Subjects(settings.namespace), sid, "agent-a", events)
    return sid, len(events)
