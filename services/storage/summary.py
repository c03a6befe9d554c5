"""One stored session's compact summary (what the index keeps, lists and the API return), and
how it is taken from a record: a partial decode (:class:`SessionView`) that skips everything
else, or the decode the storage service made anyway (:class:`SessionFacts`).
"""

from __future__ import annotations

import sys
import zlib
from array import array
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from buildtel.shared.protocol import BuildSession


class _VcsView(msgspec.Struct):
    branch: str | None = None
    commit: str | None = None


class _EnvView(msgspec.Struct):
    vcs: _VcsView | None = None


class _TotalsView(msgspec.Struct):
    targets: int = 0
    failed: int = 0


class _CompletenessView(msgspec.Struct):
    complete: bool = True
    reasons: list[str] = []


class _TargetView(msgspec.Struct, array_like=True):
    """A target encoded as an array (``TargetMetrics`` is ``array_like``): the name comes first."""

    name: str = ""


class SessionView(msgspec.Struct, tag="session", tag_field="type"):
    """The fields of ``BuildSession`` the index needs; decoding skips everything else.

    Same names, types and defaults as ``buildtel.shared.protocol.BuildSession`` so both decode
    the same bytes the same way (msgspec ignores the fields this view does not name).
    """

    id: str
    name: str = ""
    start: float = 0.0
    finish: float = 0.0
    duration_s: float = 0.0
    outcome: str = "success"
    exit_code: int | None = None
    labels: dict[str, str] = {}
    agents: list[str] = []
    environment: _EnvView | None = None
    # Arrays as the protocol encodes targets now, maps as records written before TargetMetrics
    # became array_like: the index reads both, so no stored history becomes unsearchable.
    targets: list[_TargetView | dict[str, msgspec.Raw]] = []
    cache_hits: int = 0
    cache_misses: int = 0
    totals: _TotalsView | None = None
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None
    up_to_date: int | None = None
    completeness: _CompletenessView | None = None

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


def target_hash(name: str) -> int:
    # crc32 rather than hash(): stable across processes; collisions are verified on read.
    return zlib.crc32(name.encode("utf-8", "surrogatepass"))


def _i(s: str | None) -> str | None:
    # Interned: a farm has few outcomes, branches, names and agents, repeated across sessions.
    return sys.intern(s) if s else None


class Summary(msgspec.Struct, array_like=True, gc=False):
    """What the index keeps per session; also a row of the on-disk index (``sidecar.py``), so
    fields are only ever appended, with defaults.  ``gc=False``: no cycles, and 16 bytes less
    each.  Mutable only for the writer, before it publishes the summary (``segment``, ``ord``)."""

    id: str
    t: float  # ordering/retention time: finish, else start, else when it was stored
    start: float
    finish: float
    duration_s: float
    outcome: str
    exit_code: int | None
    name: str
    branch: str | None
    commit: str | None
    agents: tuple[str, ...]
    labels: tuple[str, ...]  # "key=value", sorted
    targets: int
    failed: int
    cache_hits: int
    cache_misses: int
    cpu_s: float | None
    peak_rss_bytes: int | None
    up_to_date: int | None
    complete: bool
    offset: int  # of the record header
    length: int  # payload bytes
    reasons: int = 0  # how many reasons the completeness record gives (lost events)
    reason: str = ""  # the first one (at most 200 characters)
    segment: Any = None  # segments.Segment: holds the file descriptor reads use (not persisted)
    ord: int = -1  # arrival number in the index, set when indexed (not persisted)

    @property
    def key(self) -> tuple[float, str]:
        return (self.t, self.id)


def summarize(view: Any, stored_at: float, segment: Any, offset: int, length: int, ord: int = -1) -> Summary:
    """The summary of a :class:`SessionView` (or anything with its attributes, e.g. a decoded
    ``BuildSession`` wrapped as ``store.SessionFacts``)."""
    vcs = view.environment.vcs if view.environment is not None else None
    branch = (vcs.branch if vcs is not None else None) or view.labels.get("branch")
    totals = view.totals
    n_targets = totals.targets if totals is not None and totals.targets else len(view.targets)
    comp = view.completeness
    return Summary(
        id=view.id,
        t=view.finish if view.finish > 0 else (view.start if view.start > 0 else stored_at),
        start=view.start, finish=view.finish, duration_s=view.duration_s,
        outcome=sys.intern(view.outcome), exit_code=view.exit_code, name=_i(view.name) or "",
        branch=_i(branch), commit=_i(vcs.commit if vcs is not None else None),
        agents=tuple(sys.intern(a) for a in view.agents),
        labels=tuple(sorted(sys.intern(f"{k}={v}") for k, v in view.labels.items())),
        targets=n_targets, failed=totals.failed if totals is not None else 0,
        cache_hits=view.cache_hits, cache_misses=view.cache_misses, cpu_s=view.cpu_s,
        peak_rss_bytes=view.peak_rss_bytes, up_to_date=view.up_to_date,
        complete=comp is None or comp.complete,
        offset=offset, length=length, reasons=len(comp.reasons) if comp is not None else 0,
        reason=comp.reasons[0][:200] if comp is not None and comp.reasons else "", segment=segment, ord=ord)


def sorted_hashes(names: Iterable[str]) -> list[int]:
    return sorted({target_hash(n) for n in names})


Prepared = tuple[Summary, "array[int]"]  # a summary not yet placed in a file, its target hashes


def prepare(payloads: Sequence[bytes], stored_at: float) -> list[Prepared]:
    """Index summaries (not yet placed in a file) for encoded sessions; raises on a payload that
    is no session.  Only the small summaries outlive this call, not the decoded views."""
    out = []
    for p in payloads:
        view = view_decoder.decode(p)
        out.append((summarize(view, stored_at, None, 0, len(p)), array("I", sorted_hashes(view.target_names()))))
    return out


class SessionFacts(NamedTuple):
    """What the index needs of a session its caller has decoded already (duck-types
    ``index.SessionView`` for ``summarize``): storage validates a session by decoding it in full,
    and the summary is taken from that decode instead of decoding the bytes a second time."""

    id: str
    name: str
    start: float
    finish: float
    duration_s: float
    outcome: str
    exit_code: int | None
    labels: dict[str, str]
    agents: list[str]
    environment: Any
    targets: list[Any]
    cache_hits: int
    cache_misses: int
    totals: Any
    cpu_s: float | None
    peak_rss_bytes: int | None
    up_to_date: int | None
    completeness: Any
    names: list[str]

    @classmethod
    def of(cls, session: BuildSession) -> SessionFacts:
        s = session
        return cls(s.id, s.name, s.start, s.finish, s.duration_s, s.outcome, s.exit_code, s.labels, s.agents,
                   s.environment, s.targets, s.cache_hits, s.cache_misses, s.totals, s.cpu_s, s.peak_rss_bytes,
                   s.up_to_date, s.completeness, [t.name for t in s.targets])

    def target_names(self) -> list[str]:
        return self.names
