"""SIGKILL the storage process in the middle of a burst: every session whose JetStream publish
was acknowledged ends up stored exactly once (in the index and on disk) after a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from buildtel.services.storage import format as fmt
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.services.storage.summary import view_decoder
from buildtel.shared.codec import encode
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import stack_env


def spawn(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **stack_env(settings),
        "BUILDER_TELEMETRY_NATS_URL": settings.nats_url or "",
        "BUILDER_TELEMETRY_REDIS_URL": settings.redis_url or "",
        "BUILDER_TELEMETRY_NAMESPACE": settings.namespace,
        "BUILDER_TELEMETRY_CACHE_DIR": str(settings.cache_dir),
        "BUILDER_TELEMETRY_LOG_FORMAT": "json",
    }
    # A short ack wait so what the killed process had fetched but not acked comes back quickly.
    cmd = [sys.executable, "-m", "buildtel.services.storage", "--ack-wait-s", "1", "--batch-size", "16"]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def wait_ready(client: StorageClient, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            await client.stats()
            return
        except StorageError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"storage did not come up: {log.read_text()}")


async def test_sigkill_mid_burst_then_restart_stores_each_acked_session_once(settings: Settings, nc, tmp_path: Path,
                                                                            make_session) -> None:
    subjects = Subjects(settings.namespace)
    client = StorageClient(nc, subjects, timeout=1.0)
    log = tmp_path / "storage.log"
    proc = spawn(settings, log)
    try:
        await wait_ready(client, proc, log)
        js = nc.jetstream()
        sessions = [make_session(i, targets=10) for i in range(500)]
        acked: list[str] = []

        async def burst() -> None:
            for i, s in enumerate(sessions):
                await js.publish(subjects.sessions_completed, encode(s), headers={"Nats-Msg-Id": s.id})
                acked.append(s.id)  # JetStream acknowledged: the stream has it
                if i % 25 == 0:
                    await asyncio.sleep(0.02)  # a burst that lasts a while, not one syscall

        publisher = asyncio.create_task(burst())
        while (await client.stats()).sessions < 60:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        published_at_kill = len(acked)
        assert published_at_kill < len(sessions)  # killed mid-burst
        await publisher

        proc = spawn(settings, log)
        await wait_ready(client, proc, log)
        deadline = time.monotonic() + 8
        while (await client.stats()).sessions < len(acked) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stored = [s.id for s in await client.recent(1000)]
        assert len(stored) == len(set(stored)) == len(acked)
        assert set(stored) == set(acked)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0  # graceful stop after a signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # On disk too: one intact record per session, whatever the kill left behind was cut off.
    on_disk: Counter[str] = Counter()
    for _, path in fmt.list_segments(settings.telemetry_dir):
        data = path.read_bytes()
        for ref in fmt.scan(data, str(path)).records:
            on_disk[view_decoder.decode(fmt.payload_of(data, ref)).id] += 1
    assert set(on_disk) == set(acked) and max(on_disk.values()) == 1
    assert '"event": "storage.started"' in log.read_text()
