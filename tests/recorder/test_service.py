"""The recorder service against real NATS and Redis, and republishing a recorded stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from buildtel.cli.main import main
from buildtel.services.recorder.service import RecorderService
from buildtel.shared.codec import decode_batch
from buildtel.shared.protocol import BuildStarted
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import publish_events, stack_env, synthetic_build


def flagged_build(targets: int, seed: int, agents: tuple[str, ...] = ("agent-a",), record: bool = True):
    sid, per_agent, expected = synthetic_build(targets=targets, seed=seed, agents=agents)
    owner = agents[0]
    per_agent[owner][0] = msgspec.structs.replace(per_agent[owner][0], record=record)
    assert isinstance(per_agent[owner][0], BuildStarted)
    return sid, per_agent, expected


@pytest.fixture
async def recorder(settings: Settings, nc: object, redis_client: object) -> AsyncIterator[RecorderService]:
    svc = RecorderService(settings, settings.nats_url or "", settings.redis_url or "", hold_s=2.0)
    await svc.start()
    yield svc
    await svc.stop()


def json_document(out: str) -> dict:  # type: ignore[type-arg]
    """The JSON a command printed; services started in-process may have logged lines before it."""
    return json.loads(out[out.index("{"):] if out.startswith("{") else out[out.index("\n{") + 1:])


async def wait_for(predicate, timeout: float = 15.0, what=None) -> None:
    """Poll ``predicate`` until true; ``what()``, when given, says what was there at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time" + (f": {what()}" if what else ""))
        await asyncio.sleep(0.05)


async def test_flagged_session_is_kept_and_unflagged_ignored(settings: Settings, nc, recorder) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    store = RecordingStore.from_settings(settings)
    sid, per_agent, expected = flagged_build(40, seed=5, agents=("agent-a", "agent-b"))
    plain_sid, plain, _ = flagged_build(25, seed=6, record=False)
    # agent-b's events arrive before the BuildStarted that flags the session: they must be held.
    await publish_events(js, subjects, sid, "agent-b", per_agent["agent-b"])
    await publish_events(js, subjects, plain_sid, "agent-a", plain["agent-a"])
    await asyncio.sleep(0.3)
    await publish_events(js, subjects, sid, "agent-a", per_agent["agent-a"])
    total = sum(len(v) for v in per_agent.values())
    await wait_for(lambda: len(store.load_events(sid)) == total)
    kept = store.load_events(sid)
    assert sorted((e.agent_id, e.seq) for e in kept) == sorted(
        (e.agent_id, e.seq) for evs in per_agent.values() for e in evs)
    await wait_for(lambda: recorder.events_ignored == len(plain["agent-a"]))
    assert not store.has_events(plain_sid)
    assert recorder.events_dropped_unflagged == 0
    # After BuildFinished (+ grace) the batch files are folded into one log.
    await wait_for(lambda: [p.name for p in (store.events / sid).iterdir() if p.name.endswith(".msgpack")]
                   == ["log.msgpack"], timeout=20.0)
    assert len(store.load_events(sid)) == total == expected["events"]


async def test_redelivery_is_stored_once_and_survives_a_restart(settings: Settings, nc, redis_client) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    store = RecordingStore.from_settings(settings)
    sid, per_agent, _ = flagged_build(30, seed=8)
    svc = RecorderService(settings, settings.nats_url or "", settings.redis_url or "", hold_s=2.0)
    await svc.start()
    await publish_events(js, subjects, sid, "agent-a", per_agent["agent-a"][:20])
    await wait_for(lambda: len(store.load_events(sid)) == 20)
    await svc.stop()
    await svc.stop()  # idempotent
    # Published while no recorder runs: the durable consumer delivers them to the next one.
    await publish_events(js, subjects, sid, "agent-a", per_agent["agent-a"][20:])
    svc2 = RecorderService(settings, settings.nats_url or "", settings.redis_url or "", hold_s=2.0)
    await svc2.start()
    try:
        await wait_for(lambda: len(store.load_events(sid)) == len(per_agent["agent-a"]))
        # svc2 never saw this session's BuildStarted: it learnt the flag from Redis.  (Counted
        # just after its file is written: waited for, not read at once.)
        await wait_for(lambda: svc2.events_persisted == len(per_agent["agent-a"]) - 20,
                       what=lambda: f"{svc2.events_persisted} events persisted")
        assert svc2.events_dropped_unflagged == 0
    finally:
        await svc2.stop()


async def test_bad_input_is_left_to_the_collector_and_unknown_sessions_expire(settings: Settings, nc, recorder) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    # Bad input is the collector's to dead-letter (it reads the same stream): counted here, not kept.
    await js.publish(subjects.events("a" * 32), b"\xc1 not msgpack")
    await wait_for(lambda: recorder.batches_invalid == 1, timeout=10.0)
    # A session whose BuildStarted never comes is held for hold_s, then let go.
    sid, per_agent, _ = flagged_build(5, seed=9)
    await publish_events(js, subjects, sid, "agent-a", per_agent["agent-a"][1:])
    await wait_for(lambda: recorder.events_dropped_unflagged == len(per_agent["agent-a"]) - 1, timeout=10.0)
    assert recorder.dead_letters == 0


async def test_republish_feeds_a_new_session_with_the_same_events(settings: Settings, nc, recorder,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    store = RecordingStore.from_settings(settings)
    sid, per_agent, _ = flagged_build(35, seed=11, agents=("agent-a", "agent-b"))
    for agent, evs in per_agent.items():
        await publish_events(js, subjects, sid, agent, evs)
    total = sum(len(v) for v in per_agent.values())
    await wait_for(lambda: len(store.load_events(sid)) == total)

    for key, value in (("CACHE_DIR", str(settings.cache_dir)), ("NAMESPACE", settings.namespace),
                       ("NATS_URL", settings.nats_url), ("REDIS_URL", settings.redis_url)):
        monkeypatch.setenv(f"BUILDER_TELEMETRY_{key}", str(value))
    for key, value in stack_env(settings).items():
        monkeypatch.setenv(key, value)
    assert await asyncio.to_thread(main, ["replay", sid, "--republish", "--json"]) == 0
    out = json_document(capsys.readouterr().out)
    new_sid = out["session_id"]
    assert new_sid != sid and len(new_sid) == 32 and out["events"] == total

    info = await js.stream_info(subjects.events_stream)
    assert info.state.messages > 0
    sub = await js.subscribe(subjects.events(new_sid), ordered_consumer=True)
    got = []
    try:
        while len(got) < total:
            batch = decode_batch((await sub.next_msg(timeout=10)).data)
            assert batch.session_id == new_sid
            got.extend(batch.events)
    finally:
        await sub.unsubscribe()
    assert len(got) == total and {e.session_id for e in got} == {new_sid}
    started = next(e for e in got if isinstance(e, BuildStarted))
    assert started.labels["republished_from"] == sid and started.record is False
    # Not flagged, so the recorder does not keep the copy a second time.
    await wait_for(lambda: recorder.events_ignored >= total)
    assert not store.has_events(new_sid)



async def test_diff_of_two_stored_sessions_goes_through_the_storage_service(
        settings: Settings, nc, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from buildtel.services.storage.service import StorageService
    from buildtel.shared.codec import encode
    from tests.storage.conftest import build_session

    svc = StorageService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    try:
        a = build_session(1, targets=4)
        b = build_session(2, targets=4)
        b.targets[2] = msgspec.structs.replace(b.targets[2], duration_s=2.5, cache="remote_hit")
        b.environment.env["CC"] = "clang"  # type: ignore[union-attr]
        js = nc.jetstream()
        for s in (a, b):
            await js.publish(Subjects(settings.namespace).sessions_completed, encode(s), headers={"Nats-Msg-Id": s.id})
        for key, value in (("CACHE_DIR", str(settings.cache_dir)), ("NAMESPACE", settings.namespace),
                           ("NATS_URL", settings.nats_url), ("REDIS_URL", settings.redis_url)):
            monkeypatch.setenv(f"BUILDER_TELEMETRY_{key}", str(value))
        for key, value in stack_env(settings).items():
            monkeypatch.setenv(key, value)
        await wait_for(lambda: svc.stored >= 2)
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["diff", a.id, b.id, "--json"]) == 0
        d = json_document(capsys.readouterr().out)
    finally:
        await svc.stop()
    assert d["a"]["kind"] == d["b"]["kind"] == "session"
    assert d["env"]["added"] == {"CC": "clang"}
    assert d["targets"]["timing"] == [{"target": "//pkg:t2", "a": 0.5, "b": 2.5, "delta_s": 2.0}]
    assert d["targets"]["cache"] == [{"target": "//pkg:t2", "a": "local_hit" if 2 % 3 == 0 else "miss",
                                      "b": "remote_hit"}]
    assert d["inputs"] is None and d["first_divergence"] == "unavailable"


async def test_buildtel_run_record_captures_files_and_events_then_replays(
        settings: Settings, nc, recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from buildtel.shared.protocol import BuildFinished
    from buildtel.shared.recording.replay import ReplayEngine
    from tests.recorder.cproject import write_project

    root = write_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    for key, value in (("CACHE_DIR", str(settings.cache_dir)), ("NAMESPACE", settings.namespace),
                       ("NATS_URL", settings.nats_url), ("REDIS_URL", settings.redis_url)):
        monkeypatch.setenv(f"BUILDER_TELEMETRY_{key}", str(value))
    for key, value in stack_env(settings).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MY_API_TOKEN", "tok-9f8e7d6c5b4a-secret")
    # In a worker thread: `run` installs signal handlers only on the main thread.
    assert await asyncio.to_thread(main, ["run", "--record", "--", "make", "-j2"]) == 0
    err = capsys.readouterr().err
    store = RecordingStore.from_settings(settings)
    [m] = store.list_manifests()
    rid = m.id
    assert f"as {rid}" in err and m.session_id == rid  # one id: the session's
    assert m.input_method == "make" and "src/main.c" in {e.path for e in m.inputs}
    assert "build/app" in {e.path for e in m.outputs}
    assert m.environment is not None and m.environment.env["MY_API_TOKEN"] == "[REDACTED]"
    assert "BUILDER_TELEMETRY_SESSION_ID" not in m.environment.env
    # The recorder service kept the session's events under the same id: all of them, that is
    # BuildFinished and, per agent, every seq from 0 to the highest.  (Waiting for BuildFinished
    # alone failed once under load: a batch stored after it, redelivered late, held events that sort
    # before it, so stepping through the events counted then did not reach the end.)
    def recorded_whole() -> bool:
        evs = store.load_events(rid)
        seqs: dict[str, set[int]] = {}
        for e in evs:
            seqs.setdefault(e.agent_id, set()).add(e.seq)
        return any(isinstance(e, BuildFinished) for e in evs) and all(
            s == set(range(max(s) + 1)) for s in seqs.values())

    def recorded() -> str:
        evs = store.load_events(rid)
        seqs: dict[str, list[int]] = {}
        for e in evs:
            seqs.setdefault(e.agent_id, []).append(e.seq)
        return f"{len(evs)} events, seqs per agent {seqs}, kinds {sorted({type(e).__name__ for e in evs})}"

    await wait_for(recorded_whole, timeout=60, what=recorded)
    events = store.load_events(rid)
    assert isinstance(events[0], BuildStarted) and events[0].record and events[0].command == ["make", "-j2"]

    result = await asyncio.to_thread(ReplayEngine(store=store).replay, rid)
    assert result.reproducible, (result.differing, result.log)
    assert await asyncio.to_thread(main, ["replay", rid[:8], "--execute"]) == 0
    assert "reproducible" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["replay", rid, "--step", str(len(events)), "--json"]) == 0
    assert json_document(capsys.readouterr().out)["finished"] is True
    for path in settings.recordings_dir.rglob("*"):
        if path.is_file():
            assert b"tok-9f8e7d6c5b4a-secret" not in path.read_bytes(), path
