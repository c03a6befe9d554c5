"""The in-memory index of the session store: one compact summary per stored session, and postings.

Full sessions stay on disk; the index keeps what lists, filters and reports of
whole builds need (:class:`Summary`: id, times, outcome, name, branch, commit,
agents, labels, totals, cache figures, completeness, and where the record is).

Structure, chosen so that an append never copies the index and a filter that
matches little costs little (docs/storage-format.md "In-memory index"):

* every summary gets an *ordinal* (``ord``), its arrival number, never reused;
* ``order`` is a list of summaries ascending by (t, id) that only grows at its
  end; a session older than the newest one goes to ``late``, a small sorted list
  merged into ``order`` once it grows past ~sqrt(n) (amortised O(sqrt n) a session);
* postings: for each outcome, branch, agent (and the machine part of
  ``machine/pid.start`` agents), name and label ``k=v``, an ``array('I')`` of
  ordinals in arrival order (so ascending); target names are hashed into flat
  numpy columns instead (``targets.py``), scanned vectorised;
* retention drops a prefix of the (t, id) order: the index moves ``lo`` (and
  clears the dropped ordinals); the memory is given back when half the list is dead.

A :class:`Snapshot` is what readers (worker threads) use: the list objects and
bounds at the moment it was taken.  Writers only append past those bounds or
publish new lists, so a reader never needs a lock and never sees a session
before it is durable.  Target names are hashed (crc32); a query by target
verifies the name in the record, so collisions never produce wrong answers.
"""

from __future__ import annotations

import heapq
import math
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np

from buildtel.services.storage import postings
from buildtel.services.storage.summary import HashArray, Summary, target_hash
from buildtel.services.storage.targets import Chunk, TargetHashes

# Cursor of keyset pagination: the (time, id) of the last item a page returned.
Key = tuple[float, str]
MIN_KEY: Key = (-math.inf, "")


COMPACT_POSTINGS_AFTER = 4096  # dropped sessions before dead ordinals leave the postings (and their count)
_key: Any = attrgetter("t", "id")  # (t, id): the order of the index, at C speed


class Filters(msgspec.Struct, frozen=True, kw_only=True):
    outcome: str | None = None
    branch: str | None = None
    agent: str | None = None  # an agent id, or a machine: its "machine/pid.start" agents too
    name: str | None = None
    label: str | None = None  # "key=value"
    target: str | None = None
    since: float | None = None  # inclusive, on Summary.t
    until: float | None = None  # exclusive

    def postings(self) -> list[Any]:
        """The posting keys of the equality filters given."""
        keys: list[Any] = []
        for kind in ("outcome", "branch", "agent", "name", "label"):
            value = getattr(self, kind)
            if value is not None:
                keys.append((kind, value))
        return keys

    def matches(self, s: Summary) -> bool:
        """Every filter but the target and the times (which the callers apply)."""
        if self.outcome is not None and s.outcome != self.outcome:
            return False
        if self.branch is not None and s.branch != self.branch:
            return False
        if self.name is not None and s.name != self.name:
            return False
        if self.label is not None and self.label not in s.labels:
            return False
        if self.agent is not None and self.agent not in s.agents:
            prefix = self.agent + "/"  # a machine selects its "machine/pid.start" agents
            if not any(a.startswith(prefix) for a in s.agents):
                return False
        return True


class Snapshot:
    """What a reader sees: the summaries with ord < ``max_ord`` that were not dropped, in (t, id)
    order as ``order[lo:hi]`` merged with ``late``.  Never mutated by writers."""

    __slots__ = ("by_id", "by_ord", "count", "hi", "late", "lo", "max_ord", "order", "post", "targets")

    def __init__(self, index: Index) -> None:
        self.order, self.lo, self.hi = index.order, index.lo, len(index.order)
        self.late = index.late
        self.by_id, self.by_ord, self.post = index.by_id, index.by_ord, index.post
        self.max_ord, self.count = index.next_ord, index.count
        self.targets = index.targets

    def get(self, session_id: str) -> Summary | None:
        s = self.by_id.get(session_id)
        return s if s is not None and s.ord < self.max_ord else None

    def oldest(self) -> Summary | None:
        a = self.order[self.lo] if self.lo < self.hi else None
        b = self.late[0] if self.late else None
        return min((x for x in (a, b) if x is not None), key=_key, default=None)

    def newest(self) -> Summary | None:
        a = self.order[self.hi - 1] if self.lo < self.hi else None
        b = self.late[-1] if self.late else None
        return max((x for x in (a, b) if x is not None), key=_key, default=None)

    def posting(self, key: Any) -> tuple[Any, int]:
        """The posting array for ``key`` and how many of its ordinals this snapshot sees."""
        arr = self.post.get(key)
        if arr is None:
            return array("I"), 0
        return arr, bisect_left(arr, self.max_ord)

    def target_posting(self, name: str) -> tuple[Any, int]:
        ords = self.targets.ords(target_hash(name), self.max_ord)
        return ords, len(ords)

    def select(self, filters: Filters, *, desc: bool, cursor: Key | None = None,
               selective: float = 1 / 8) -> Iterator[Summary]:
        """Summaries matching ``filters`` (the target by hash) in (t, id) order after ``cursor``.

        With an equality filter whose posting holds under ``selective`` of the sessions, only
        its sessions are looked at (sorted by key: O(m log m) for m matches); otherwise the time
        bounds and the cursor are bisections and the rest is a scan.  (Both give the same
        answer; tests force each with 0 and 1.)"""
        lo_key: Key = (filters.since, "") if filters.since is not None else MIN_KEY
        hi_key: Key | None = (filters.until, "") if filters.until is not None else None
        if cursor is not None:
            if desc:
                hi_key = cursor if hi_key is None or cursor < hi_key else hi_key
            elif cursor >= lo_key:
                lo_key = (cursor[0], cursor[1] + "\0")  # strictly after the cursor
        keys = filters.postings()
        postings = [self.posting(k) for k in keys]
        target_post = self.target_posting(filters.target) if filters.target is not None else None
        if target_post is not None:
            postings.append(target_post)
        if postings:
            arr, n = min(postings, key=lambda p: p[1])
            if n < selective * max(self.count, 1):
                yield from self._from_posting(arr, n, filters, target_post, lo_key, hi_key, desc)
                return
        for s in self._range(lo_key, hi_key, desc):
            if filters.matches(s) and (target_post is None or _has(target_post, s.ord)):
                yield s

    def _from_posting(self, arr: Any, n: int, filters: Filters, target_post: tuple[Any, int] | None,
                      lo_key: Key, hi_key: Key | None, desc: bool) -> Iterator[Summary]:
        by_ord = self.by_ord
        found = []
        for o in (arr[:n].tolist() if hasattr(arr, "tolist") else arr[:n]):
            s = by_ord[o] if o < len(by_ord) else None
            if s is None:
                continue
            k = _key(s)
            if k < lo_key or (hi_key is not None and k >= hi_key):
                continue
            if filters.matches(s) and (target_post is None or _has(target_post, o)):
                found.append(s)
        found.sort(key=_key, reverse=desc)
        yield from found

    def _range(self, lo_key: Key, hi_key: Key | None, desc: bool) -> Iterator[Summary]:
        order, late = self.order, self.late
        a_lo = max(self.lo, bisect_left(order, lo_key, lo=self.lo, hi=self.hi, key=_key))
        a_hi = self.hi if hi_key is None else bisect_left(order, hi_key, lo=self.lo, hi=self.hi, key=_key)
        b_lo = bisect_left(late, lo_key, key=_key)
        b_hi = len(late) if hi_key is None else bisect_left(late, hi_key, key=_key)
        max_ord = self.max_ord
        if desc:
            main: Iterable[Summary] = (order[i] for i in range(a_hi - 1, a_lo - 1, -1))
            extra: Iterable[Summary] = (late[i] for i in range(b_hi - 1, b_lo - 1, -1))
        else:
            main = (order[i] for i in range(a_lo, a_hi))
            extra = (late[i] for i in range(b_lo, b_hi))
        merged = heapq.merge(main, extra, key=_key, reverse=desc) if b_hi > b_lo else main
        for s in merged:
            if s.ord < max_ord:
                yield s


def _has(post: tuple[Any, int], o: int) -> bool:
    arr, n = post
    i = bisect_left(arr, o, 0, n)
    return i < n and arr[i] == o


class Index:
    """The writer's side of the index (the store's write lock serialises every mutation).

    Readers use :meth:`snapshot`; see the module docstring for why mutating in place is safe."""

    def __init__(self) -> None:
        self.order: list[Summary] = []
        self.lo = 0
        self.late: list[Summary] = []
        self.by_id: dict[str, Summary] = {}
        self.by_ord: list[Summary | None] = []
        self.post: dict[Any, HashArray] = {}
        self.targets = TargetHashes()
        self.next_ord = 0
        self.count = 0
        self.dead_postings = 0  # ordinals dropped since the postings were last compacted

    def snapshot(self) -> Snapshot:
        return Snapshot(self)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.by_id

    def add(self, new: Sequence[tuple[Summary, HashArray]]) -> None:
        """Index ``new`` (summary, its sorted target-name hashes); each summary's ``ord`` must be
        ``next_ord`` and up, in order (the writer assigns them)."""
        late: list[Summary] = []
        post = self.post
        for s, hashes in new:
            assert s.ord == self.next_ord, "ordinals are assigned in order"
            self.next_ord += 1
            self.by_ord.append(s)
            self.by_id[s.id] = s
            self.count += 1
            self.targets.append(s.ord, hashes)
            for k in postings.keys_of(s):
                arr = post.get(k)
                if arr is None:
                    post[k] = array("I", (s.ord,))
                else:
                    arr.append(s.ord)
            if self.lo < len(self.order) and _key(s) < _key(self.order[-1]):
                late.append(s)
            else:
                self.order.append(s)
        if late:
            merged = sorted(self.late + late, key=_key)  # a new list: snapshots keep theirs
            if len(merged) > max(256, math.isqrt(self.count)):
                self.order = list(heapq.merge(self.order[self.lo:], merged, key=_key))
                self.lo, merged = 0, []
            self.late = merged

    def drop_oldest(self, k: int) -> list[Summary]:
        """Drop the ``k`` oldest sessions by (t, id); returns them."""
        if k <= 0:
            return []
        gone: list[Summary] = []
        order, late = self.order, self.late
        i, j = self.lo, 0
        while len(gone) < k and (i < len(order) or j < len(late)):
            if j >= len(late) or (i < len(order) and _key(order[i]) < _key(late[j])):
                gone.append(order[i])
                i += 1
            else:
                gone.append(late[j])
                j += 1
        for s in gone:
            del self.by_id[s.id]
            self.by_ord[s.ord] = None
        self.lo = i
        if j:
            self.late = late[j:]
        self.count -= len(gone)
        self.dead_postings += len(gone)
        if self.lo > 4096 and self.lo * 2 > len(order):
            self.order, self.lo = order[self.lo:], 0  # give the memory back; snapshots keep the old list
        if self.dead_postings > max(COMPACT_POSTINGS_AFTER, self.count):
            self._compact_postings()
        return gone

    def count_older(self, cutoff: float) -> int:
        """Sessions with ``t < cutoff``: two bisections."""
        return (bisect_left(self.order, (cutoff, ""), lo=self.lo, key=_key) - self.lo
                + bisect_left(self.late, (cutoff, ""), key=_key))

    def replace(self, old: Summary, new: Summary) -> None:
        """Swap a summary for one at a new place on disk (compaction): same id, key and ord."""
        self.by_id[new.id] = new
        self.by_ord[new.ord] = new
        for lst, lo in ((self.order, self.lo), (self.late, 0)):
            i = bisect_left(lst, _key(old), lo=lo, key=_key)
            if i < len(lst) and lst[i] is old:
                lst[i] = new  # in place: a reader sees the old or the new summary, both readable
                return

    def _compact_postings(self) -> None:
        # Vectorised: one pass over the ordinals for a liveness mask, then numpy per posting (a
        # Python loop over every posting entry of a million sessions held the event loop seconds).
        alive = np.fromiter((s is not None for s in self.by_ord), dtype=bool, count=len(self.by_ord))
        post: dict[Any, HashArray] = {}
        for k, arr in self.post.items():
            ords = np.frombuffer(arr, dtype=np.uint32) if arr else np.empty(0, dtype=np.uint32)
            live = ords[alive[ords]]
            if len(live):
                kept = array("I")
                kept.frombytes(live.tobytes())
                post[k] = kept
        self.post = post  # a new dict: snapshots keep the old one
        self.dead_postings = 0

    @classmethod
    def from_segments(cls, parts: Iterable[tuple[list[Summary], Chunk]]) -> Index:
        """An index of sessions loaded segment by segment: each part's summaries in file order
        and its target-hash columns (``chunk.first`` must be the part's first ordinal)."""
        idx = cls()
        rows: list[Summary] = []
        for part, chunk in parts:
            for o, s in enumerate(part, idx.next_ord):
                s.ord = o  # not yet published: no reader can see it
            idx.targets.add_chunk(chunk)
            rows += part
            idx.next_ord += len(part)
        idx.post = postings.build(rows)
        idx.by_ord = list(rows)
        idx.by_id = {s.id: s for s in rows}
        rows.sort(key=_key)  # nearly sorted already (segments fill in time order): timsort is quick
        idx.order = rows
        idx.count = len(rows)
        return idx
