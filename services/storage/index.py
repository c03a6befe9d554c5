"""The in-memory index of the session store: one small summary per stored session.

Full sessions stay on disk; the index keeps just what listing and filtering
need (id, times, outcome, branch, agents, a sorted array of 32-bit target-name
hashes, and where the record is), about 1 KB for a 200-target session.  A
:class:`Snapshot` is never mutated once published: writers build a new one and
swap a reference, so readers work on a consistent view without any lock.
"""

from __future__ import annotations

import sys
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

# Cursor of keyset pagination: the (time, id) of the last item a page returned.
Key = tuple[float, str]


class _VcsView(msgspec.Struct):
    branch: str | None = None


class _EnvView(msgspec.Struct):
    vcs: _VcsView | None = None


class _TargetView(msgspec.Struct, array_like=True):
    """A target encoded as an array (``TargetMetrics`` is ``array_like``): the name comes first."""

    name: str = ""


class SessionView(msgspec.Struct, tag="session", tag_field="type"):
    """The fields of ``BuildSession`` the index needs; decoding skips everything else.

    Same names, types and defaults as ``buildtel.shared.protocol.BuildSession`` so both decode
    the same bytes the same way (msgspec ignores the fields this view does not name).
    """

    id: str
    start: float = 0.0
    finish: float = 0.0
    outcome: str = "success"
    labels: dict[str, str] = {}
    agents: list[str] = []
    environment: _EnvView | None = None
    # Arrays as the protocol encodes targets now, maps as records written before TargetMetrics
    # became array_like: the index reads both, so no stored history becomes unsearchable.
    targets: list[_TargetView | dict[str, msgspec.Raw]] = []

    def target_names(self) -> list[str]:
        names = []
        for t in self.targets:
            if isinstance(t, _TargetView):
                names.append(t.name)
            elif "name" in t:
                names.append(msgspec.msgpack.decode(t["name"], type=str))
        return names


view_decoder = msgspec.msgpack.Decoder(SessionView)
if TYPE_CHECKING:
    HashArray = array[int]
else:  # array.array cannot be subscripted at run time before Python 3.12
    HashArray = array
_EMPTY_HASHES: HashArray = array("I")


def target_hash(name: str) -> int:
    # crc32 rather than hash(): stable across processes; collisions are verified on read.
    return zlib.crc32(name.encode("utf-8", "surrogatepass"))


class Summary(msgspec.Struct, frozen=True, gc=False):
    """What the index keeps per session.  ``gc=False``: no cycles, and 16 bytes less each."""

    id: str
    t: float  # ordering/retention time: finish, else start, else when it was stored
    start: float
    outcome: str
    branch: str | None
    agents: tuple[str, ...]
    target_hashes: HashArray  # sorted, 32-bit
    segment: Any  # store.Segment: holds the file descriptor reads use
    offset: int  # of the record header
    length: int  # payload bytes

    @property
    def key(self) -> Key:
        return (self.t, self.id)

    def has_target_hash(self, h: int) -> bool:
        arr = self.target_hashes
        i = bisect_left(arr, h)
        return i < len(arr) and arr[i] == h


def summarize(view: SessionView, stored_at: float, segment: Any, offset: int, length: int) -> Summary:
    branch = None
    if view.environment is not None and view.environment.vcs is not None:
        branch = view.environment.vcs.branch
    branch = branch or view.labels.get("branch")
    hashes = sorted({target_hash(name) for name in view.target_names()})
    # Interned: a farm has few outcomes, branches and agents, repeated across sessions.
    return Summary(
        id=view.id,
        t=view.finish if view.finish > 0 else (view.start if view.start > 0 else stored_at),
        start=view.start,
        outcome=sys.intern(view.outcome),
        branch=sys.intern(branch) if branch else None,
        agents=tuple(sys.intern(a) for a in view.agents),
        target_hashes=array("I", hashes) if hashes else _EMPTY_HASHES,
        segment=segment,
        offset=offset,
        length=length,
    )


def _key(s: Summary) -> Key:
    return (s.t, s.id)


def _agent_of_machine(machine: str, agents: tuple[str, ...]) -> bool:
    # A client that joined a session reports as "<machine>/<pid>.<start>" (shared/identity.py):
    # selecting the machine selects it too.
    prefix = machine + "/"
    return any(a.startswith(prefix) for a in agents)


class Filters(msgspec.Struct, frozen=True, kw_only=True):
    outcome: str | None = None
    branch: str | None = None
    agent: str | None = None
    target: str | None = None
    since: float | None = None  # inclusive, on Summary.t
    until: float | None = None  # exclusive

    def matches(self, s: Summary, target_h: int | None) -> bool:
        if self.outcome is not None and s.outcome != self.outcome:
            return False
        if self.branch is not None and s.branch != self.branch:
            return False
        if self.agent is not None and self.agent not in s.agents and not _agent_of_machine(self.agent, s.agents):
            return False
        return target_h is None or s.has_target_hash(target_h)


class Snapshot:
    """An immutable view: ``by_id`` and ``order`` (ascending by (t, id)) hold the same summaries."""

    __slots__ = ("by_id", "order")

    def __init__(self, by_id: dict[str, Summary], order: list[Summary]) -> None:
        self.by_id = by_id
        self.order = order

    @classmethod
    def empty(cls) -> Snapshot:
        return cls({}, [])

    @classmethod
    def build(cls, summaries: Iterable[Summary]) -> Snapshot:
        order = sorted(summaries, key=_key)
        return cls({s.id: s for s in order}, order)

    def with_added(self, new: Sequence[Summary]) -> Snapshot:
        order = list(self.order)
        by_id = dict(self.by_id)
        for s in new:
            by_id[s.id] = s
            if not order or _key(order[-1]) < _key(s):
                order.append(s)  # the common case: sessions arrive roughly in finish order
            else:
                order.insert(bisect_right(order, _key(s), key=_key), s)
        return Snapshot(by_id, order)

    @classmethod
    def from_ordered(cls, order: list[Summary]) -> Snapshot:
        """``order`` must already be ascending by (t, id)."""
        return cls({s.id: s for s in order}, order)

    def first_alive(self, cutoff: float) -> int:
        """Index of the first summary with ``t >= cutoff``."""
        return bisect_left(self.order, (cutoff, ""), key=_key)

    def select(self, filters: Filters, *, desc: bool, cursor: Key | None = None) -> Iterator[Summary]:
        """Summaries matching ``filters`` in order, starting after ``cursor``.

        Time bounds and the cursor are bisections, so a page costs O(log n + scanned).
        """
        order = self.order
        lo = 0 if filters.since is None else bisect_left(order, (filters.since, ""), key=_key)
        hi = len(order) if filters.until is None else bisect_left(order, (filters.until, ""), key=_key)
        if cursor is not None:
            if desc:
                hi = min(hi, bisect_left(order, cursor, key=_key))
            else:
                lo = max(lo, bisect_right(order, cursor, key=_key))
        target_h = target_hash(filters.target) if filters.target is not None else None
        indices = range(hi - 1, lo - 1, -1) if desc else range(lo, hi)
        for i in indices:
            s = order[i]
            if filters.matches(s, target_h):
                yield s
