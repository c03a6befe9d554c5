"""Load-robust detection: was this build slow because the machine was busy? (docs/analytics.md
"Host slowdowns").

A target's time depends on what else the machine did meanwhile.  When most targets of one build
are slower than their own recent baseline *together*, the likeliest cause is the machine (a CPU
hog, a noisy neighbour, thermal throttling), not N code changes at once.  The rule, per build:

* each executed target (a cache miss) with at least ``MIN_HISTORY`` earlier executed runs whose
  median (the baseline, over the last ``BASELINE_RUNS``) is at least ``MIN_BASE_S`` is *judged*:
  its ratio is duration / baseline (baselines are taken from load-normalised values, so a
  baseline built during an earlier slowdown is not inflated);
* the build is **host-slowed** when at least ``MIN_JUDGED`` targets are judged, the median ratio
  (the build-wide *factor*) is at least ``HOST_FACTOR`` and at least ``HOST_SHARE`` of the judged
  targets are ``SLOWER`` times their baseline or more;
* unless the targets' CPU time rose as much: where the capture has CPU time for the targets and
  their baselines, a median CPU-time ratio of at least ``SLOWER`` means the targets did more work
  (a compiler flag, a bigger input), which is a change of the build, not of the machine.

A host-slowed build's targets that slowed no more than ``OUTLIER`` x the factor are recorded in
their series but not fed to the detector (their time says nothing beyond the load); one slower
than that changed beyond the load and is fed its time less what the load is expected to have
added, baseline x (factor - 1), so a step of its own keeps its size; the build is fed its
targets' span without the load plus its usual time outside the targets.  The host's series
raises one ``host`` event when a slowdown starts (not one per slow build) and is quiet until a
build on that host is judged normal again, ``HOST_CLEAR_BUILDS`` in a row.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import msgspec

from buildtel.services.analyzer.explain import HostSlowdown
from buildtel.shared.protocol import CACHE_HITS, BuildSession

MIN_HISTORY = 3  # earlier executed runs a target needs before it is judged
BASELINE_RUNS = 10  # runs its baseline (median) is taken over
HISTORY_RUNS = 3 * BASELINE_RUNS  # runs read from a ring: enough for BASELINE_RUNS of builds judged normal
MIN_BASE_S = 0.05  # targets faster than this are timer and start-up noise: not judged
MIN_JUDGED = 3  # judged targets a build needs to be called host-slowed
HOST_FACTOR = 1.3  # median ratio at or above which the build is slowed as a whole...
HOST_SHARE = 0.6  # ...when at least this share of the judged targets...
SLOWER = 1.2  # ...is at least this much slower than its baseline
# In a host-slowed build, a target slower than OUTLIER x the factor (relative to its baseline)
# changed beyond the load: it is fed, less the load's share; the others are recorded, not fed.
OUTLIER = 2.0
# A slowdown episode ends after this many builds in a row judged normal: a lull in the load (one
# build while other work pauses) does not end it, so a busy machine is one host event, not one per lull.
HOST_CLEAR_BUILDS = 3


@dataclass(frozen=True, slots=True)
class Judgement:
    """What a build's targets say about its machine; ``factor`` 1.0 when not host-slowed."""

    judged: int = 0
    median_ratio: float = 1.0
    slower_share: float = 0.0
    cpu_ratio: float | None = None
    slowed: bool = False
    baseline_sum_s: float = 0.0  # of the judged targets (the host event's "before")
    value_sum_s: float = 0.0  # their durations in this build ("after")
    bases: dict[str, float] = field(default_factory=dict)  # judged target -> its baseline

    @property
    def factor(self) -> float:
        return self.median_ratio if self.slowed else 1.0

    def in_band(self, value: float, base: float | None) -> bool:
        """A target of a host-slowed build that slowed no more than OUTLIER x the build-wide factor:
        its time says nothing beyond the machine's load, so it is recorded but not fed."""
        return self.slowed and base is not None and value <= base * self.factor * OUTLIER

    def normalise(self, value: float, base: float | None) -> float:
        """A target's time without the load: its baseline when in the load band; beyond it, its
        time less what the load is expected to have added to its baseline, base x (factor - 1)
        (a step of its own, a sleep, keeps its size however busy the machine); without a
        baseline, its time divided by the factor."""
        if not self.slowed:
            return value
        if base is None:
            return value / self.factor
        return base if self.in_band(value, base) else value - base * (self.factor - 1.0)


def baseline(values: list[float]) -> float | None:
    """The median of the last BASELINE_RUNS values, when there are at least MIN_HISTORY."""
    return statistics.median(values[-BASELINE_RUNS:]) if len(values) >= MIN_HISTORY else None


NORMAL = Judgement()


@dataclass(frozen=True, slots=True)
class History:
    """A target's earlier executed runs, oldest first: (load-normalised duration, CPU time or None,
    whether its build was judged normal)."""

    runs: list[tuple[float, float | None, bool]]


def judge(session: BuildSession, history: dict[str, History]) -> Judgement:
    """Judge ``session`` against its targets' ``history`` (target name -> earlier runs)."""
    ratios: list[float] = []
    bases: dict[str, float] = {}
    cpu: list[float] = []
    base_sum = value_sum = 0.0
    seen: set[str] = set()
    for t in session.targets:
        if t.status != "success" or t.cache in CACHE_HITS or t.duration_s <= 0 or t.name in seen:
            continue
        seen.add(t.name)
        h = history.get(t.name)
        if h is None or len(h.runs) < MIN_HISTORY:
            continue
        # Runs of builds judged normal, when there are enough: a long slowdown does not become the norm.
        normal = [r for r in h.runs if r[2]]
        recent = (normal if len(normal) >= MIN_HISTORY else h.runs)[-BASELINE_RUNS:]
        base = statistics.median(v for v, _, _ in recent)
        if base < MIN_BASE_S:
            continue
        ratios.append(t.duration_s / base)
        base_sum += base
        value_sum += t.duration_s
        cpus = [c for _, c, _ in recent if c is not None and c > 0]
        cpu_base = statistics.median(cpus) if len(cpus) >= MIN_HISTORY else None
        bases[t.name] = base
        if t.cpu_s is not None and t.cpu_s > 0 and cpu_base is not None:
            cpu.append(t.cpu_s / cpu_base)
    if not ratios:
        return NORMAL
    med = statistics.median(ratios)
    share = sum(1 for r in ratios if r >= SLOWER) / len(ratios)
    cpu_ratio = statistics.median(cpu) if len(cpu) >= MIN_JUDGED else None
    slowed = (len(ratios) >= MIN_JUDGED and med >= HOST_FACTOR and share >= HOST_SHARE
              and (cpu_ratio is None or cpu_ratio < SLOWER))
    return Judgement(judged=len(ratios), median_ratio=med, slower_share=share, cpu_ratio=cpu_ratio, slowed=slowed,
                     baseline_sum_s=base_sum, value_sum_s=value_sum, bases=bases)


def host_of(session: BuildSession) -> str | None:
    """The machine a build ran on: its host name, else its (first) agent; None when unknown."""
    env = session.environment
    if env is not None and env.hostname:
        return env.hostname
    return session.agents[0] if session.agents else None


def evidence(session: BuildSession, j: Judgement) -> HostSlowdown:
    h = session.health
    workers = h.worker_count if h is not None else 0
    if not workers and session.health_series:
        workers = max(p.worker_count for p in session.health_series)
    cpus = session.environment.cpus if session.environment is not None else 0
    return HostSlowdown(factor=j.median_ratio, slower_share=j.slower_share, judged=j.judged, cpu_ratio=j.cpu_ratio,
                        workers=workers, cpus=cpus, build_s=session.duration_s)


class HostState(msgspec.Struct, kw_only=True):
    """A host's series (``host|<machine>``): whether a slowdown is under way, and the last normal build."""

    slow: bool = False
    builds: int = 0  # builds judged
    slowed: int = 0  # of which host-slowed
    events: int = 0  # host events raised (one per slowdown)
    last_good_sid: str | None = None
    last_good_commit: str | None = None
    last_good_start: float = 0.0
    normal_run: int = 0  # builds judged normal in a row since the last host-slowed one


host_state_decoder = msgspec.msgpack.Decoder(HostState)
