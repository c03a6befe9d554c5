"""Run services until a signal: the signal handler only sets an Event (as nats.py micro does).

Every service object has ``async start()`` and idempotent ``async stop()``;
shutdown stops taking work, lets in-flight work finish within a timeout, then
cancels the rest (arq's graceful shutdown).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from typing import Protocol


class Service(Protocol):
    # Read-only: a service names itself with a class attribute (BusService.name is a ClassVar).
    @property
    def name(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def finish_tasks(tasks: Sequence[asyncio.Task[None]], timeout: float = 5.0) -> None:
    """A service's worker tasks, once told to stop: wait up to ``timeout`` for them to finish
    their current work, then cancel what is left and wait for the cancellations."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def run_until_signal(services: Sequence[Service], *, stop_event: asyncio.Event | None = None,
                           shutdown_timeout: float = 10.0,
                           on_started: Callable[[], None] | None = None) -> None:
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread / Windows
            pass
    started: list[Service] = []

    async def start_all() -> None:
        for svc in services:
            started.append(svc)  # before start(): one cancelled half-way is stopped too
            await svc.start()

    try:
        # A signal during start-up (a service still waiting for an unreachable NATS) stops too:
        # the start is cancelled instead of the signal being ignored until it succeeds.
        starting = asyncio.ensure_future(start_all())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (starting, stopping):
                t.cancel()
            await asyncio.gather(starting, stopping, return_exceptions=True)
        if not starting.cancelled() and starting.exception() is not None:
            raise starting.exception()  # type: ignore[misc]
        if stop.is_set():
            return
        if on_started is not None:
            on_started()
        await stop.wait()
    finally:
        for svc in reversed(started):
            try:
                await asyncio.wait_for(svc.stop(), shutdown_timeout)
            except (TimeoutError, Exception):  # noqa: BLE001 - keep stopping the others
                pass
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover
                pass
