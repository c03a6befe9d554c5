"""Where a build's wall time goes: critical paths, dominant targets and what-if estimates.

A session records when each target started and ended, on which worker, and
(when the build tool knows) its dependencies.  From that we rebuild the
constraints that held each target back:

* ``dep``: a declared dependency (``TargetMetrics.deps``) that ran in this session;
* ``lane``: the previous target on the same worker (a worker runs one at a time);
* ``inferred``: when a target declares no dependencies, the target that finished
  last before it started, the most likely reason it could not start earlier.

The critical path walks back from the target that ended last, each time to the
predecessor that ended last (the binding constraint).  It is labelled by what it
rests on: "derived from dependencies" when the tool recorded them (ninja's deps
log, make's database, Bazel's BEP), "lane order (no dependency data)" otherwise
-- then it is only the order targets ran in on each worker and when they ended,
and independent targets (``make -j2`` of unrelated objects) look like a chain.  The what-if estimate
replays the session with one target N % faster: each target starts when its
predecessors end plus the scheduling gap it had originally (never earlier than
that; targets without predecessors keep their start), and the saved wall time is
the difference of the two makespans.  Gaps stay as observed, so the estimate is
conservative: it never assumes a scheduler would do better than it did.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Literal

import msgspec

from buildtel.shared.protocol import BuildSession, TargetMetrics

EPS = 1e-6  # clock granularity: an end this close to a start counts as "before"
Via = Literal["root", "dep", "lane", "inferred"]
Basis = Literal["", "dependencies", "lane order"]  # "": a report written before the field existed
DEPS_LABEL = "derived from dependencies"
LANES_LABEL = "lane order (no dependency data)"
_VIA_RANK: dict[Via, int] = {"dep": 0, "lane": 1, "inferred": 2}


class PathStep(msgspec.Struct, kw_only=True):
    name: str
    start_s: float  # offset from the session start
    duration_s: float
    wait_s: float  # gap between the predecessor's end (or the session start) and this start
    worker: str = ""
    via: Via = "root"


class CriticalPath(msgspec.Struct, kw_only=True):
    session_id: str
    wall_s: float
    path_s: float  # sum of the durations on the path
    wait_s: float  # wall time on the path spent waiting (scheduling gaps, before and after)
    steps: list[PathStep] = []
    basis: Basis = ""  # "dependencies": the tool recorded them; "lane order": it did not
    label: str = ""  # the basis for people, e.g. "lane order (no dependency data)"


class WhatIf(msgspec.Struct, kw_only=True):
    target: str
    speedup_pct: float
    sessions: int
    wall_before_s: float  # mean over the sessions analysed
    wall_after_s: float
    saved_s: float  # mean wall time saved per session


class Bottleneck(msgspec.Struct, kw_only=True):
    name: str
    critical_s: float  # time this target spent on critical paths, summed over the sessions analysed
    critical_share: float  # of all critical-path target time
    on_critical_path: int  # sessions whose critical path runs through it
    total_s: float = 0.0  # all its run time in the report window
    share_of_total: float = 0.0  # of all target time in the report window
    what_if: WhatIf | None = None


class Bottlenecks(msgspec.Struct, kw_only=True):
    sessions_analysed: int
    speedup_pct: float
    targets: list[Bottleneck] = []
    latest: CriticalPath | None = None  # the most recent session's critical path
    with_dependencies: int = 0  # sessions analysed whose tool recorded dependencies


class SessionGraph:
    """The targets of one session that ran, with their predecessor constraints."""

    def __init__(self, session: BuildSession) -> None:
        self.session = session
        ran = [t for t in session.targets if t.status in ("success", "failed")]
        self.t: list[TargetMetrics] = sorted(ran, key=lambda t: (t.start, t.end, t.name))
        self.origin = session.start if session.start else min((t.start for t in self.t), default=0.0)
        self.index = index = {t.name: i for i, t in enumerate(self.t)}
        self.has_deps = any(t.deps for t in self.t)
        ends = sorted((t.end, i) for i, t in enumerate(self.t))
        end_vals = [e for e, _ in ends]
        lanes: dict[str, list[tuple[float, int]]] = {}
        for i, t in enumerate(self.t):
            if t.worker:
                lanes.setdefault(t.worker, []).append((t.end, i))
        for lane in lanes.values():
            lane.sort()
        lane_ends = {w: [e for e, _ in lane] for w, lane in lanes.items()}
        self.preds: list[list[tuple[int, Via]]] = []
        self.binding: list[int] = []  # the predecessor that ended last: what the target waited for
        for i, t in enumerate(self.t):
            preds: dict[int, Via] = {}
            for dep in t.deps:
                j = index.get(dep)
                # A declared dependency counts even if it "ended" a little after this target
                # started (agents' clocks differ); one that ended after this target did is bad data.
                if j is not None and j != i and self.t[j].end < t.end:
                    preds[j] = "dep"
            if t.worker:
                k = bisect.bisect_right(lane_ends[t.worker], t.start + EPS) - 1
                while k >= 0 and lanes[t.worker][k][1] == i:
                    k -= 1
                if k >= 0:
                    preds.setdefault(lanes[t.worker][k][1], "lane")
            if not t.deps:
                k = bisect.bisect_right(end_vals, t.start + EPS) - 1
                while k >= 0 and ends[k][1] == i:
                    k -= 1
                if k >= 0:
                    preds.setdefault(ends[k][1], "inferred")
            self.preds.append(list(preds.items()))
            self.binding.append(max(preds.items(), key=lambda p: (self.t[p[0]].end, -_VIA_RANK[p[1]]))[0]
                                if preds else -1)

    @property
    def makespan(self) -> float:
        return max((t.end for t in self.t), default=self.origin) - self.origin

    @property
    def wall(self) -> float:
        return self.session.duration_s if self.session.duration_s > 0 else self.makespan

    def critical_path(self) -> CriticalPath:
        sid = self.session.id
        if not self.t:
            basis, label = self._basis([])
            return CriticalPath(session_id=sid, wall_s=self.wall, path_s=0.0, wait_s=self.wall, basis=basis,
                                label=label)
        cur = max(range(len(self.t)), key=lambda i: (self.t[i].end, self.t[i].start))
        chain: list[tuple[int, Via, float]] = []
        seen: set[int] = set()
        while True:
            t = self.t[cur]
            seen.add(cur)
            if not self.preds[cur] or self.binding[cur] in seen:
                chain.append((cur, "root", max(0.0, t.start - self.origin)))
                break
            j = self.binding[cur]
            via = dict(self.preds[cur])[j]
            chain.append((cur, via, max(0.0, t.start - self.t[j].end)))
            cur = j
        chain.reverse()
        steps = [PathStep(name=self.t[i].name, start_s=self.t[i].start - self.origin, duration_s=self.t[i].duration_s,
                          wait_s=w, worker=self.t[i].worker, via=via) for i, via, w in chain]
        path_s = sum(s.duration_s for s in steps)
        basis, label = self._basis(steps)
        return CriticalPath(session_id=sid, wall_s=self.wall, path_s=path_s, wait_s=max(0.0, self.wall - path_s),
                            steps=steps, basis=basis, label=label)

    def _basis(self, steps: Sequence[PathStep]) -> tuple[Basis, str]:
        """(basis, label) of a critical path made of ``steps``."""
        if not self.has_deps:
            return "lane order", LANES_LABEL
        links = steps[1:]  # the first step is the root: it has no link
        guessed = sum(1 for s in links if s.via != "dep")
        label = DEPS_LABEL
        if guessed:
            # Dependencies were recorded, but some links of this path are not one of them.
            label += f" ({guessed} of {len(links)} links by lane order or timing)"
        return "dependencies", label

    def replay(self, target: str, speedup_pct: float) -> float:
        """Makespan (from the session start) with ``target`` ``speedup_pct`` % faster."""
        factor = max(0.0, 1.0 - speedup_pct / 100.0)
        first = self.index.get(target)
        if first is None:
            return self.makespan
        # Targets that started before it cannot be affected: start the replay at the target.
        new_end = [t.end for t in self.t[:first]]
        for i in range(first, len(self.t)):
            t = self.t[i]
            start = t.start
            preds = self.preds[i]
            if preds:
                # Only the binding predecessor keeps its observed scheduling gap; the others
                # merely have to be done, or a lane gap would pin the target to its old start.
                b = self.binding[i]
                start = max((new_end[j] if j < i else self.t[j].end) for j, _ in preds)
                start = max(start, (new_end[b] if b < i else self.t[b].end) + max(0.0, t.start - self.t[b].end))
            dur = t.duration_s * factor if t.name == target else t.duration_s
            new_end.append(start + dur)
        return max(new_end, default=self.origin) - self.origin


def critical_path(session: BuildSession) -> CriticalPath:
    """The chain of targets that bounded ``session``'s wall time."""
    return SessionGraph(session).critical_path()


def what_if(sessions: Sequence[BuildSession], target: str, speedup_pct: float = 50.0) -> WhatIf:
    """Mean wall time saved per session if ``target`` were ``speedup_pct`` % faster."""
    return _what_if([SessionGraph(s) for s in sessions], target, speedup_pct)


def _what_if(graphs: Sequence[SessionGraph], target: str, speedup_pct: float) -> WhatIf:
    before = after = 0.0
    used = 0
    for g in graphs:
        if not any(t.name == target for t in g.t):
            continue
        base = g.replay(target, 0.0)  # the same model unchanged, so only the speed-up differs
        saved = max(0.0, base - g.replay(target, speedup_pct))
        before += g.wall
        after += g.wall - saved
        used += 1
    k = max(used, 1)
    return WhatIf(target=target, speedup_pct=speedup_pct, sessions=used, wall_before_s=before / k,
                  wall_after_s=after / k, saved_s=(before - after) / k)


def bottlenecks(sessions: Sequence[BuildSession], *, speedup_pct: float = 50.0, top: int = 5,
                totals: dict[str, float] | None = None) -> Bottlenecks:
    """Dominant targets over ``sessions`` (chronological; the caller picks how many) with what-ifs.

    ``totals`` (target -> run time over the whole report window) adds each target's share of
    all target time, so targets that are expensive but never on the critical path also show.
    """
    graphs = [SessionGraph(s) for s in sessions]
    crit: dict[str, float] = {}
    hits: dict[str, int] = {}
    latest: CriticalPath | None = None
    for g in graphs:
        cp = g.critical_path()
        latest = cp
        for step in cp.steps:
            crit[step.name] = crit.get(step.name, 0.0) + step.duration_s
        for name in {s.name for s in cp.steps}:
            hits[name] = hits.get(name, 0) + 1
    crit_total = sum(crit.values()) or 1.0
    all_total = sum((totals or {}).values()) or 1.0
    chosen = sorted(crit, key=lambda n: -crit[n])[:top]
    if totals:
        # Expensive targets that are (almost) never critical still deserve a line, but fewer.
        extra = [n for n in sorted(totals, key=lambda n: -totals[n])[:top] if n not in chosen]
        chosen += extra[:max(1, top // 2)]
    out = []
    for name in chosen:
        out.append(Bottleneck(name=name, critical_s=crit.get(name, 0.0),
                              critical_share=crit.get(name, 0.0) / crit_total,
                              on_critical_path=hits.get(name, 0), total_s=(totals or {}).get(name, 0.0),
                              share_of_total=(totals or {}).get(name, 0.0) / all_total,
                              what_if=_what_if(graphs, name, speedup_pct)))
    out.sort(key=lambda b: (-b.critical_s, -b.total_s))
    return Bottlenecks(sessions_analysed=len(graphs), speedup_pct=speedup_pct, targets=out, latest=latest,
                       with_dependencies=sum(1 for g in graphs if g.has_deps))
