"""Which sessions ran a target: every session's target-name hashes in flat numpy columns.

A posting list per target name would cost a Python append per target of every session,
at open and on every append (26 million for a million 20-target sessions: tens of seconds).
Instead the hashes of the sessions with ordinals ``first .. first + n`` are kept as one
``uint32`` column ``hashes`` with ``offsets`` (session ``first + i`` has
``hashes[offsets[i]:offsets[i + 1]]``), in *chunks*: one per segment index file at open
(``numpy.frombuffer`` on the file's bytes, no per-session work) and one per ~64 k sessions
appended.  A query compares a whole column with one hash (vectorised: ~1 GB/s) and maps the
matching positions back to ordinals with a binary search.

Chunks are immutable once sealed; the growing tail is an ``array('I')`` that readers copy
(one memcpy) up to what their snapshot sees.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

    Ords = npt.NDArray[np.int64]

TAIL_SESSIONS = 65536  # sessions per appended chunk
TAIL_HASHES = 1 << 21  # or this many hashes, whichever comes first
MEMO_BYTES = 64 * 1024  # remembered answers per chunk: ~26 MB in all for 100k x 200 or 1M x 20 at most


class Chunk:
    """Sealed columns (immutable).  ``memo`` keeps the answers for the names asked last, as
    chunk-local ordinals (uint16 where the chunk allows, ~2 bytes a session), within ``MEMO_BYTES``
    a chunk: a dashboard asks for the same targets again and again, and each answer would
    otherwise cost a compare of every hash of the chunk."""

    __slots__ = ("first", "hashes", "memo", "memo_bytes", "n", "offsets")

    def __init__(self, first: int, offsets: Any, hashes: Any) -> None:
        self.first = first
        self.n = len(offsets) - 1
        self.offsets = offsets  # int64, n + 1 entries, offsets[0] == 0
        self.hashes = hashes  # uint32
        self.memo: dict[int, Any] = {}
        self.memo_bytes = 0

    def ords_of(self, h: int, limit: int) -> Ords:
        """Ordinals below ``limit`` whose sessions have hash ``h``."""
        if limit - self.first < self.n:  # part of the chunk (a snapshot taken while it filled)
            return self._ords_of(h, limit - self.first) + self.first
        got = self.memo.get(h)
        if got is None:
            got = self._ords_of(h, self.n).astype(np.uint16 if self.n <= 65536 else np.uint32)
            self._remember(h, got)
        return got.astype(np.int64) + self.first

    def _remember(self, h: int, local: Any) -> None:
        if local.nbytes > MEMO_BYTES:
            return
        try:  # oldest first; reader threads racing here may forget one more than needed
            while self.memo and self.memo_bytes + local.nbytes > MEMO_BYTES:
                self.memo_bytes -= self.memo.pop(next(iter(self.memo))).nbytes
        except (RuntimeError, StopIteration, KeyError):
            return
        self.memo[h] = local
        self.memo_bytes += local.nbytes

    def _ords_of(self, h: int, n: int) -> Ords:
        """Chunk-local ordinals (below ``n``) of the sessions with hash ``h``."""
        n = min(self.n, n)
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        end = int(self.offsets[n])
        pos = np.flatnonzero(self.hashes[:end] == np.uint32(h))
        if not len(pos):
            return np.empty(0, dtype=np.int64)
        local = np.searchsorted(self.offsets, pos, side="right") - 1
        return _distinct_sorted(local)  # chunk-local; a name twice in one session counts once


def _distinct_sorted(a: Ords) -> Ords:
    # np.unique hashes in numpy 2 (slow for this); a sorted array only needs neighbours compared.
    if len(a) < 2:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def chunk_from_bytes(first: int, counts: bytes, hashes: bytes) -> Chunk:
    """A chunk straight from an index file's columns (little-endian u32 counts and hashes)."""
    c = np.frombuffer(counts, dtype="<u4")
    offsets = np.zeros(len(c) + 1, dtype=np.int64)
    np.cumsum(c, out=offsets[1:])
    return Chunk(first, offsets, np.frombuffer(hashes, dtype="<u4").astype(np.uint32, copy=False))


def chunk_from_lists(first: int, per_session: Iterable[array[int]]) -> Chunk:
    counts = array("I")
    flat = array("I")
    for h in per_session:
        counts.append(len(h))
        flat.extend(h)
    return chunk_from_bytes(first, counts.tobytes(), flat.tobytes())


class TargetHashes:
    """The writer's columns (sealed chunks and the growing tail); see the module docstring."""

    __slots__ = ("chunks", "tail_first", "tail_hashes", "tail_offsets")

    def __init__(self, first: int = 0) -> None:
        self.chunks: list[Chunk] = []
        self._new_tail(first)

    def _new_tail(self, first: int) -> None:
        self.tail_first = first
        self.tail_offsets = array("q", [0])
        self.tail_hashes = array("I")

    def add_chunk(self, chunk: Chunk) -> None:
        """Columns for the ordinals right after everything added so far (the tail must be empty)."""
        assert len(self.tail_offsets) == 1 and chunk.first == self.tail_first
        if chunk.n:
            self.chunks.append(chunk)
        self._new_tail(chunk.first + chunk.n)

    def append(self, ord_: int, hashes: array[int]) -> None:
        assert ord_ == self.tail_first + len(self.tail_offsets) - 1, "ordinals arrive in order"
        self.tail_hashes.extend(hashes)
        self.tail_offsets.append(len(self.tail_hashes))
        if len(self.tail_offsets) > TAIL_SESSIONS or len(self.tail_hashes) > TAIL_HASHES:
            self.chunks = [*self.chunks, self._tail_chunk(len(self.tail_offsets) - 1)]  # new list: snapshots
            self._new_tail(ord_ + 1)

    def ords(self, h: int, max_ord: int) -> Ords:
        """Sorted ordinals below ``max_ord`` (a snapshot's) of the sessions with target hash ``h``.

        Safe from a reader thread while the writer appends: the tail is read first (a seal
        replaces the tail arrays rather than clearing them), then the chunk list; a session
        in both is counted once."""
        first, offsets, hashes = self.tail_first, self.tail_offsets, self.tail_hashes
        chunks = self.chunks
        parts = [c.ords_of(h, max_ord) for c in chunks]
        n = min(max_ord - first, len(offsets) - 1)
        if n > 0:
            offs = np.array(offsets[: n + 1], dtype=np.int64)
            tail = Chunk(first, offs, np.array(hashes[: int(offs[-1])], dtype=np.uint32))
            parts.append(tail.ords_of(h, max_ord))
        if not parts:
            return np.empty(0, dtype=np.int64)
        # Sorted: chunks are in ordinal order; a tail sealed meanwhile may repeat the last chunk.
        return _distinct_sorted(np.sort(np.concatenate(parts), kind="stable"))

    def _tail_chunk(self, n: int) -> Chunk:
        offsets = np.array(self.tail_offsets[: n + 1], dtype=np.int64)
        return Chunk(self.tail_first, offsets, np.array(self.tail_hashes[: int(offsets[-1])], dtype=np.uint32))
