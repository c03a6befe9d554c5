"""Sessions larger than one NATS message, end to end on real NATS and Redis.

They travel through the namespace's object store bucket (``shared/bigmsg.py``), are stored
whole, and read back through ``StorageClient.get`` (in parts), lists and ``buildtel show``.
A reference whose object is missing or damaged is dead-lettered with its reason and counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.services.storage.service import StorageService
from buildtel.shared import bigmsg
from buildtel.shared.bus import dead_letter_decoder
from buildtel.shared.codec import encode
from buildtel.shared.protocol import TargetFinished
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import publish_events, synthetic_build

OVER = 8 * 1024 * 1024  # the test server's max_payload: every session here is larger


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := await check()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)
    return got


@pytest.fixture
async def storage(settings: Settings, nc: Any) -> AsyncIterator[StorageService]:
    async with StorageService(settings, settings.nats_url or "", settings.redis_url or "") as svc:
        yield svc


async def stored(client: StorageClient, sid: str) -> Any:
    try:
        return await client.get(sid)
    except StorageError as exc:
        if exc.not_found:
            return None
        raise


@pytest.mark.timeout(120)
async def test_collector_session_over_the_limit_is_stored_whole(settings: Settings, nc: Any, redis_client: Any,
                                                                storage: StorageService) -> None:
    collector = CollectorService(settings, settings.nats_url or "", settings.redis_url or "")
    await collector.start()
    try:
        js, subjects = nc.jetstream(), Subjects(settings.namespace)
        sid, per_agent, expected = synthetic_build(targets=3000, seed=3)
        events = per_agent["agent-a"]
        for ev in events:  # ~3.5 KiB of dependencies per target: ~11 MB in all
            if isinstance(ev, TargetFinished):
                ev.deps = [f"//third_party/library{k:03d}/src/main/component:target_{k}_" + "x" * 30
                           for k in range(40)]
        await publish_events(js, subjects, sid, "agent-a", events, size=50)
        client = StorageClient(nc, subjects, timeout=30.0)
        session = await eventually(lambda: stored(client, sid), timeout=90.0)
    finally:
        await collector.stop()
    # Whole: every target with every dependency (nothing was trimmed to fit a message).
    assert len(session.targets) == expected["targets"] == session.totals.targets
    assert all(len(t.deps) == 40 for t in session.targets)
    assert len(encode(session)) > OVER
    # It travelled as a reference to an object of the namespace's bucket.
    # (The stream's first message is the collector's SessionStarted announcement.)
    msg = await js.get_msg(subjects.sessions_stream, subject=subjects.sessions_completed)
    assert msg.data in (None, b"") and msg.headers["Nats-Msg-Id"] == sid
    assert msg.headers[bigmsg.OBJECT_HEADER].startswith(subjects.sessions_bucket + "/")
    assert int(msg.headers[bigmsg.SIZE_HEADER]) > OVER
    assert storage.dead_letters == 0 and storage.stored == 1


@pytest.mark.timeout(180)
async def test_import_over_the_limit_reads_back_whole_in_show_and_lists(
        settings: Settings, nc: Any, storage: StorageService, make_session: Any, tmp_path: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    from buildtel.cli import cmd_import, cmd_sessions
    from tests.importers.big_ninja import write_ninja_log

    edges = 100_000  # ~10.6 MB encoded
    log = write_ninja_log(tmp_path / "big.ninja_log", edges)
    subjects = Subjects(settings.namespace)
    small = [make_session(i, finish=time.time() - 100 + i * 50) for i in range(2)]
    js = nc.jetstream()
    await js.publish(subjects.sessions_completed, encode(small[0]), headers={"Nats-Msg-Id": small[0].id})
    args = argparse.Namespace(importer="ninja", files=[str(log)], base_time=str(time.time() - 3600),
                              dry_run=False)  # recent: inside the store's retention
    assert await cmd_import.run_import(args, settings) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("stored ")]  # (logs aside)
    sid = line.split()[1]
    await js.publish(subjects.sessions_completed, encode(small[1]), headers={"Nats-Msg-Id": small[1].id})
    client = StorageClient(nc, subjects, timeout=30.0)
    big = await eventually(lambda: stored(client, sid))
    assert len(big.targets) == big.totals.targets == edges
    assert len(encode(big)) > OVER
    # A second import of the same file is a duplicate: nothing is written again.
    before = (await js.stream_info(bigmsg.object_stream(subjects.sessions_bucket))).state.bytes
    assert await cmd_import.run_import(args, settings) == 0
    assert f"\nalready stored {sid} " in "\n" + capsys.readouterr().out
    assert (await js.stream_info(bigmsg.object_stream(subjects.sessions_bucket))).state.bytes == before

    # Lists: a session larger than any page comes through in its place.
    await eventually(lambda: _count(client, 3))
    listed = await client.range(0.0, time.time() + 86400)
    assert [s.id for s in listed] == sorted([s.id for s in small] + [sid],
                                            key=lambda i: next(s.finish for s in [*small, big] if s.id == i))
    assert next(s for s in listed if s.id == sid) == big
    assert {s.id for s in await client.recent(10)} == {sid, *(s.id for s in small)}
    assert [s.id for s in await client.query(target=big.targets[-1].name)] == [sid]

    # buildtel show, as text and as JSON.
    assert await cmd_sessions.cmd_show(argparse.Namespace(id=sid, json=False, top=3), settings) == 0
    text = capsys.readouterr().out
    assert f"targets   {edges} ({edges} ok" in text
    assert await cmd_sessions.cmd_show(argparse.Namespace(id=sid, json=True, top=3), settings) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["id"] == sid and len(doc["targets"]) == edges
    assert await cmd_sessions.cmd_sessions(argparse.Namespace(limit=10, outcome=None, branch=None, agent=None,
                                                              target=None, json=False), settings) == 0
    assert sid in capsys.readouterr().out


async def _count(client: StorageClient, n: int) -> bool:
    return (await client.stats()).sessions >= n


async def test_missing_and_damaged_objects_are_dead_lettered_with_their_reason(
        settings: Settings, nc: Any, redis_client: Any, storage: StorageService, make_session: Any) -> None:
    js, subjects = nc.jetstream(), Subjects(settings.namespace)
    bucket = subjects.sessions_bucket
    payload = encode(make_session(0, targets=500))
    # 1. a reference to an object that was never written (or expired)
    name, digest = bigmsg.digest_of(payload)
    missing = bigmsg.Reference(bucket, name, len(payload), digest)
    await js.publish(subjects.sessions_completed, b"", headers={"Nats-Msg-Id": "m1",
                                                                 **bigmsg.reference_headers(missing)})
    # 2. a reference whose digest is not the object's
    other = encode(make_session(1, targets=500))
    ref = await bigmsg.put(js, bucket, other)
    wrong = bigmsg.Reference(bucket, ref.name, ref.size, missing.digest)
    await js.publish(subjects.sessions_completed, b"", headers={"Nats-Msg-Id": "m2",
                                                                 **bigmsg.reference_headers(wrong)})
    # 3. an object whose chunks are gone
    third = encode(make_session(2, targets=9000))
    gone = await bigmsg.put(js, bucket, third)
    meta = json.loads((await js.get_msg(bigmsg.object_stream(bucket),
                                        subject=bigmsg.meta_subject(bucket, gone.name))).data)
    assert meta["chunks"] > 1
    await js.purge_stream(bigmsg.object_stream(bucket), subject=bigmsg.chunk_subject(bucket, meta["nuid"]))
    await js.publish(subjects.sessions_completed, b"", headers={"Nats-Msg-Id": "m3",
                                                                 **bigmsg.reference_headers(gone)})
    # 4. malformed headers
    await js.publish(subjects.sessions_completed, b"", headers={"Nats-Msg-Id": "m4", bigmsg.OBJECT_HEADER: "x"})
    # and a good session after them: the service goes on
    good = make_session(3)
    await js.publish(subjects.sessions_completed, encode(good), headers={"Nats-Msg-Id": good.id})
    client = StorageClient(nc, subjects)
    assert (await eventually(lambda: stored(client, good.id))).id == good.id

    assert storage.rejected == {"object_missing": 1, "object_corrupt": 2, "bad_reference": 1}
    for code, n in storage.rejected.items():
        assert int(await redis_client.get(storage.keys.dead_letters("storage", code)) or 0) == n
    sub = await js.pull_subscribe(subjects.dead_letter("storage"), durable=None, stream=subjects.dead_letter_stream)
    letters = [dead_letter_decoder.decode(m.data) for m in await sub.fetch(4, timeout=5)]
    by_id = {d.headers["Nats-Msg-Id"]: d for d in letters}
    assert "is not in the bucket" in by_id["m1"].reason
    assert "the reference says" in by_id["m2"].reason
    assert f"only 0 of {meta['chunks']} chunks" in by_id["m3"].reason
    assert "malformed object reference" in by_id["m4"].reason
    # The letter keeps the reference, so an operator can see which object it was.
    assert by_id["m1"].headers[bigmsg.OBJECT_HEADER] == f"{bucket}/{name}"
    assert storage.stored == 1


# The real case of issue 14: a 638,000-edge ninja build (a 64 MB session).  It runs the real CLI
# in child processes and prints its figures (docs/performance.md keeps them).
WRAP = ("import atexit, resource, runpy, sys; atexit.register(lambda: sys.stderr.write("
        "f'\\nmaxrss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n')); "
        "runpy.run_module('buildtel.cli.main', run_name='__main__')")


async def _cli(settings: Settings, *args: str) -> tuple[str, float, float]:
    """Run ``buildtel ARGS``; (stdout, seconds, peak RSS in MB)."""
    import os
    import re
    import sys

    from tests.util import stack_env

    env = dict(os.environ, **stack_env(settings))
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRAP, "--nats-url", settings.nats_url or "", "--redis-url", settings.redis_url or "",
        "--namespace", settings.namespace, "--cache-dir", str(settings.cache_dir), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, limit=1 << 30)
    out, err = await proc.communicate()
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, err.decode()[-2000:]
    rss = re.search(r"maxrss_kb=(\d+)", err.decode())
    return out.decode(), seconds, int(rss.group(1)) / 1024 if rss else float("nan")


@pytest.mark.timeout(900)
async def test_a_638000_edge_ninja_build_imports_is_stored_and_reads_back(
        settings: Settings, nc: Any, storage: StorageService, tmp_path: Any) -> None:
    from tests.importers.big_ninja import write_ninja_log

    edges = 638_000
    log = write_ninja_log(tmp_path / "huge.ninja_log", edges)
    subjects = Subjects(settings.namespace)
    out, import_s, import_mb = await _cli(settings, "import", "ninja", "--base-time",
                                            str(int(time.time()) - 3600), str(log))
    [line] = [x for x in out.splitlines() if x.startswith("stored ")]
    sid = line.split()[1]
    t0 = time.monotonic()
    client = StorageClient(nc, subjects, timeout=60.0)
    await eventually(lambda: _count(client, 1), timeout=300.0)
    stored_s = time.monotonic() - t0
    record = (await client.stats()).disk_bytes
    t0 = time.monotonic()
    session = await client.get(sid)
    get_s = time.monotonic() - t0
    assert len(session.targets) == session.totals.targets == edges
    size = len(encode(session))
    del session
    text, show_s, show_mb = await _cli(settings, "show", sid)
    assert f"targets   {edges} ({edges} ok" in text
    doc, json_s, json_mb = await _cli(settings, "show", "--json", sid)
    assert len(json.loads(doc)["targets"]) == edges
    listed, list_s, _ = await _cli(settings, "sessions")
    assert sid in listed
    print(f"\nhuge build: {edges} edges, session {size} bytes, store {record} bytes on disk; "
          f"import {import_s:.1f} s ({import_mb:.0f} MB RSS), stored {stored_s:.1f} s after, "
          f"StorageClient.get {get_s:.2f} s, show {show_s:.1f} s ({show_mb:.0f} MB), "
          f"show --json {json_s:.1f} s ({json_mb:.0f} MB, {len(doc)} bytes), sessions {list_s:.1f} s")
