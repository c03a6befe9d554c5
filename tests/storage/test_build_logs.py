"""A build's console log lives as long as its session: when retention drops a session, storage
deletes its log from the logs bucket (shared/logstore.py, docs/failures.md); a log is written and
read back exactly, with the object store's layout."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from buildtel.services.storage.service import StorageService
from buildtel.shared.bus import ensure_streams
from buildtel.shared.codec import encode
from buildtel.shared.logstore import delete_log, get_log, put_log
from buildtel.shared.protocol import BuildLog
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.storage.conftest import build_session


async def _until(check: Any, what: str) -> None:
    for _ in range(400):  # bounded polling: at most ~20 s
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached: {what}")


async def test_a_log_is_written_read_and_deleted(settings: Settings, nc: Any) -> None:
    js, subjects = nc.jetstream(), Subjects(settings.namespace)
    await ensure_streams(js, subjects)
    data = bytes(range(256)) * 3000  # over two chunks
    await put_log(js, subjects, "a" * 32, data)
    assert await get_log(js, subjects, "a" * 32) == data
    await put_log(js, subjects, "b" * 32, b"")
    assert await get_log(js, subjects, "b" * 32) == b""
    assert await delete_log(js, subjects, "a" * 32)
    assert await get_log(js, subjects, "a" * 32) is None and not await delete_log(js, subjects, "a" * 32)


async def test_retention_deletes_the_log_of_a_dropped_session(settings: Settings, nc: Any, redis_client: Any) -> None:
    svc = StorageService(settings.with_(max_sessions=1, fsync=False), settings.nats_url or "",
                         settings.redis_url or "")
    await svc.start()
    try:
        js, subjects = nc.jetstream(), Subjects(settings.namespace)
        old, new = build_session(0), build_session(1)
        for s in (old, new):
            s = msgspec.structs.replace(s, log=BuildLog(object=s.id, bytes=5, kept_bytes=5, compressed_bytes=13))
            await put_log(js, subjects, s.id, b"log of " + s.id.encode())
            await js.publish(subjects.sessions_completed, encode(s), headers={"Nats-Msg-Id": s.id})

        async def old_log_gone() -> bool:
            return await get_log(js, subjects, old.id) is None

        await _until(old_log_gone, "the dropped session's log deleted")
        assert await get_log(js, subjects, new.id) == b"log of " + new.id.encode()
    finally:
        await svc.stop()
