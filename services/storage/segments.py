"""The pieces of the store that opening and retention (``maintenance.py``) work on: one segment
file, and the reports of an open and of a retention run.

Kept apart from ``store.py`` so that ``store -> maintenance -> segments`` points one way
(``store.py`` re-exports these names).
"""

from __future__ import annotations

import os
import threading
from array import array
from pathlib import Path
from typing import Any

import msgspec

from buildtel.services.storage import format as fmt

# Guards taking a descriptor out of a Segment, so that it is closed exactly once: ``__del__`` can
# run in a worker thread (the last reference to an old snapshot dropped there) while the store's
# close() finds the same object through its WeakSet (a weak reference still answers during
# ``__del__``).  A second os.close of the number would close whatever file reused it meanwhile.
# Reentrant: a finalizer may run inside the critical section of the same thread.
_FD_LOCK = threading.RLock()


class DamageReport(msgspec.Struct, kw_only=True):
    """What :meth:`TelemetryStorage.open` found: every damaged region, and what was kept."""

    damages: list[fmt.Damage] = []
    segments: int = 0
    records: int = 0  # intact records read (from index files or by scanning)
    sessions: int = 0  # indexed after de-duplication (before retention)
    superseded: int = 0  # intact records of an id with a later record (that one is indexed)
    indexed_from_sidecars: int = 0  # segments whose records came from a verified index file
    scanned_bytes: int = 0  # segment bytes read and checksummed at open (the rest: see verify())

    @property
    def ok(self) -> bool:
        return not self.damages


class RetentionReport(msgspec.Struct, kw_only=True):
    dropped: int = 0
    segments_deleted: int = 0
    segments_compacted: int = 0
    dropped_ids: list[str] = []  # sessions dropped: their build logs are deleted too (service.py)


class Segment:
    """One segment file: a read descriptor for everyone, a write descriptor while active.

    Summaries reference their Segment, so the descriptor lives exactly as long as
    something can still read through it (closed in ``__del__`` or by ``close()``).
    ``rows``/``hashes``: while the segment takes appends, the index rows of its records so far,
    for its index file (``sidecar.py``) when it is sealed; None once sealed.
    """

    __slots__ = ("__weakref__", "created", "fd", "hashes", "header_len", "number", "path", "rows", "size",
                 "verified", "wfd")

    def __init__(self, number: int, path: Path, size: int, header_len: int, *, writable: bool = False,
                 created: float = 0.0) -> None:
        self.number = number
        self.path = path
        self.fd = self.wfd = -1
        self.fd = os.open(path, os.O_RDONLY)
        self.wfd = os.open(path, os.O_WRONLY | os.O_APPEND) if writable else -1  # __del__ closes fd on error
        self.size = size
        self.header_len = header_len
        self.created = created
        self.rows: list[Any] | None = None
        self.hashes: list[array[int]] | None = None
        self.verified = False  # every record checksummed since open (a scan, or verify())

    def close_writer(self) -> None:
        with _FD_LOCK:
            wfd, self.wfd = self.wfd, -1
        if wfd >= 0:
            os.close(wfd)

    def close(self) -> None:
        with _FD_LOCK:
            wfd, fd, self.wfd, self.fd = self.wfd, self.fd, -1, -1
        for d in (wfd, fd):
            if d >= 0:
                os.close(d)

    def __del__(self) -> None:
        self.close()
