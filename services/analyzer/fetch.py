"""Where the analyzer's reports and flame graphs get their sessions: the storage service, only.

The analyzer keeps no copy of history (Redis holds its hot state: detector series, the alert
outbox, counters).  A report reads storage's report rows (``storage/columns.py``: compact
per-session facts and per-target columns, paged, each page its own short request) and
whole sessions only for the few most recent ones its critical-path analysis needs; a flame
graph reads whole sessions (``StorageClient``).  When storage does not answer, the request
fails with :class:`SourceError` saying so (503 when no storage service is running): a report
is never computed from part of the history without saying it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from buildtel.services.analyzer.analytics import ReportFilter, select
from buildtel.services.analyzer.columns import gc_paused
from buildtel.services.analyzer.rowreport import Frame, FrameBuilder
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.services.storage.columns import ColumnsError, ColumnsRequest, column_pages
from buildtel.shared.protocol import BuildSession
from buildtel.shared.subjects import Subjects


class SourceError(Exception):
    """Storage could not supply what was asked: ``code`` 503 (no storage service), 404, else 502."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


def _source_error(exc: StorageError | ColumnsError) -> SourceError:
    if exc.code == 503:
        return SourceError(503, f"the storage service is not answering ({exc.description}); reports and flame "
                                "graphs are computed from what it stores")
    return SourceError(404 if exc.code == 404 else 502, f"storage service: {exc.description}")


async def load_frame(nc: Any, namespace: str, f: ReportFilter, timeout: float) -> Frame:
    """The report rows of ``f``'s window, every page of them (``timeout`` is per page)."""
    builder = FrameBuilder()
    if f.last is not None and f.last <= 0:
        return builder.frame()
    req = ColumnsRequest(since=f.since, until=f.until, branch=f.branch, outcome=f.outcome, name=f.name,
                         target=f.target)
    try:
        async for page in column_pages(nc, Subjects(namespace), req, limit=f.last, timeout=timeout):
            builder.add(page)
    except ColumnsError as exc:
        raise _source_error(exc) from None
    except ValueError as exc:
        raise SourceError(502, f"storage service: {exc}") from None
    return await asyncio.to_thread(builder.frame)


async def sessions_by_id(nc: Any, namespace: str, ids: list[str], timeout: float
                         ) -> tuple[list[BuildSession], list[str]]:
    """The whole sessions of ``ids`` in that order, and the ids storage no longer has (retention
    dropped them since their rows were read)."""
    client = StorageClient(nc, Subjects(namespace), timeout=timeout)

    async def one(sid: str) -> BuildSession | None:
        try:
            return await client.get(sid)
        except StorageError as exc:
            if exc.not_found:
                return None
            raise _source_error(exc) from None

    got = await asyncio.gather(*(one(i) for i in ids))
    return [s for s in got if s is not None], [i for i, s in zip(ids, got, strict=True) if s is None]


async def session(nc: Any, namespace: str, session_id: str, timeout: float) -> BuildSession:
    try:
        return await StorageClient(nc, Subjects(namespace), timeout=timeout).get(session_id)
    except StorageError as exc:
        raise _source_error(exc) from None


async def window(nc: Any, namespace: str, f: ReportFilter, timeout: float) -> list[BuildSession]:
    """Whole sessions of ``f``'s window (flame graphs: they read every target's phases)."""
    from buildtel.services.storage.api import MAX_ITEMS

    client = StorageClient(nc, Subjects(namespace), timeout=timeout)
    try:
        if f.last is not None:
            got = await client.query(outcome=f.outcome, branch=f.branch, target=f.target, since=f.since,
                                     until=f.until, limit=min(f.last, 10 * MAX_ITEMS))
        else:
            got = await client.range(f.since or 0.0, f.until if f.until is not None else time.time() + 86400.0)
    except StorageError as exc:
        raise _source_error(exc) from None
    with gc_paused():
        return select(got, f)
