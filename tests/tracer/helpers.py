"""Helpers of the tracer tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from buildtel.services.tracer.query import QueryError

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], *, timeout: float = 15.0,
                     ok: Callable[[T], bool] = bool) -> T:
    """Poll ``probe`` until ``ok(result)``; a 404 from the tracer means "not yet", and so do 503
    and 504 (no instance answering yet, or none in time): transient on a loaded machine, and the
    wait is bounded by ``timeout`` all the same."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await probe()
            if ok(last):
                return last
        except QueryError as exc:
            if exc.code not in (404, 503, 504):
                raise
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last result: {last!r}"[:2000])
        await asyncio.sleep(0.1)
