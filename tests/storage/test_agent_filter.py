"""``--agent MACHINE`` selects the machine's sessions, including those its tools joined as
``MACHINE/<pid>.<start>`` (shared/identity.py), and no machine whose name merely starts the same."""

from __future__ import annotations

import time
from pathlib import Path

from buildtel.services.storage.store import TelemetryStorage


async def test_agent_filter_selects_a_machine_and_its_tools(tmp_path: Path, make_session) -> None:
    store = TelemetryStorage(tmp_path / "t", fsync=False)
    await store.open()
    try:
        now = time.time()
        own = make_session(0, finish=now - 3, agents=["build-07"])
        joined = make_session(1, finish=now - 2, agents=["build-07/4121.lx8k2p3f", "build-08"])
        other = make_session(2, finish=now - 1, agents=["build-070", "build-08/77.abc"])
        await store.append_many([own, joined, other])
        assert {s.id for s in await store.query(agent="build-07")} == {own.id, joined.id}
        assert {s.id for s in await store.query(agent="build-07/4121.lx8k2p3f")} == {joined.id}
    finally:
        await store.close()
