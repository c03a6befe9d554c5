"""Reading back what a client published: every message of the events stream, in stream order."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from buildtel.shared.codec import decode_batch
from buildtel.shared.protocol import EventBatch
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects


async def stream_batches(js: Any, settings: Settings, *, events: int | None = None,
                         timeout: float = 10.0) -> list[tuple[dict[str, str], EventBatch]]:
    """(headers, batch) for every stored message; waits until ``events`` events are stored."""
    stream = Subjects(settings.namespace).events_stream
    deadline = time.monotonic() + timeout
    while True:
        out: list[tuple[dict[str, str], EventBatch]] = []
        try:
            info = await js.stream_info(stream)
            if info.state.messages:
                for seq in range(info.state.first_seq, info.state.last_seq + 1):
                    msg = await js.get_msg(stream, seq)
                    out.append((dict(msg.headers or {}), decode_batch(msg.data)))
        except Exception:  # noqa: BLE001 - stream not there yet
            out = []
        got = sum(len(b.events) for _, b in out)
        if events is None or got >= events or time.monotonic() > deadline:
            return out
        await asyncio.sleep(0.05)


def seqs_of(batches: list[tuple[dict[str, str], EventBatch]]) -> list[int]:
    return [ev.seq for _, b in batches for ev in b.events]


def read_stream(settings: Settings, url: str, *, events: int | None = None,
                timeout: float = 10.0) -> list[tuple[dict[str, str], EventBatch]]:
    """Synchronous variant for tests of the synchronous client."""
    from buildtel.shared.bus import connect_nats

    async def main() -> list[tuple[dict[str, str], EventBatch]]:
        nc = await connect_nats(settings, url, name="test-reader", role="operator")
        try:
            return await stream_batches(nc.jetstream(), settings, events=events, timeout=timeout)
        finally:
            await nc.close()

    return asyncio.run(main())
