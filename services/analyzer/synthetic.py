"""Synthetic build history for tests, benchmarks and demos (deterministic for a seed).

A fixed DAG of targets (each depends on up to two earlier ones) is list-scheduled
onto a pool of workers for every session, so start/end times, worker lanes and
``deps`` are consistent the way a real build tool's would be.  Knobs add what the
analyzer must find: step changes of the whole build or of one target, a flaky
target, failures, cache hit rates and several branches.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from buildtel.shared.protocol import (
    BuildEnvironment,
    BuildSession,
    CacheResult,
    SessionTotals,
    TargetMetrics,
    TargetStatus,
    VcsInfo,
)


@dataclass
class Scenario:
    sessions: int = 100
    targets: int = 50
    workers: int = 8
    seed: int = 1
    start: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    interval_s: float = 600.0  # between session starts
    branches: tuple[str, ...] = ("main",)
    sessions_per_commit: int = 3
    hit_rate: float = 0.5  # chance a target is served from cache
    noise: float = 0.03  # relative sd of target durations
    flaky: tuple[str, ...] = ()  # targets that fail 10 % of the time, whatever the commit
    fail_rate: float = 0.0  # chance a session has one genuinely failing target
    # index -> multiplier applied to every target from that session on (a whole-build step)
    build_steps: dict[int, float] = field(default_factory=dict)
    # (target name, index) -> multiplier applied to that target's executed (miss) runs from index on
    target_steps: dict[tuple[str, int], float] = field(default_factory=dict)


def target_names(n: int) -> list[str]:
    return [f"//pkg{i % 17}/lib{i}:t{i}" for i in range(n)]


def generate(sc: Scenario) -> list[BuildSession]:
    rng = random.Random(sc.seed)
    names = target_names(sc.targets)
    deps = [sorted({names[rng.randrange(i)] for _ in range(rng.randint(0, 2))}) if i else [] for i in range(sc.targets)]
    dep_idx = [[names.index(d) for d in ds] for ds in deps]
    base = [rng.lognormvariate(0.0, 0.8) for _ in range(sc.targets)]
    cacheable = [rng.random() < 0.9 for _ in range(sc.targets)]
    out: list[BuildSession] = []
    for k in range(sc.sessions):
        branch = sc.branches[k % len(sc.branches)]
        commit = f"{(k // sc.sessions_per_commit) * 7919 + sc.seed:040x}"
        t0 = sc.start + k * sc.interval_s
        mult = 1.0
        for at, m in sc.build_steps.items():
            if k >= at:
                mult *= m
        # A genuine failure is the commit's fault: every session of that commit fails the same way.
        crng = random.Random(f"{sc.seed}:{commit}")
        broken = names[crng.randrange(sc.targets)] if crng.random() < sc.fail_rate else None
        free = [(t0, w) for w in range(sc.workers)]
        heapq.heapify(free)
        ends = [0.0] * sc.targets
        metrics = []
        hits = misses = failed = 0
        for i, name in enumerate(names):
            ready = max((ends[j] for j in dep_idx[i]), default=t0)
            wfree, w = heapq.heappop(free)
            start = max(ready, wfree) + 0.001
            cache: CacheResult
            if not cacheable[i]:
                cache = "uncacheable"
            else:
                cache = "remote_hit" if rng.random() < sc.hit_rate else "miss"
            dur = base[i] * mult * max(0.05, rng.gauss(1.0, sc.noise))
            if cache == "remote_hit":
                dur *= 0.05
            else:
                for (tn, at), m in sc.target_steps.items():
                    if tn == name and k >= at:
                        dur *= m
            status: TargetStatus = "success"
            if name == broken or (name in sc.flaky and rng.random() < 0.1):
                status = "failed"
            ends[i] = start + dur
            heapq.heappush(free, (ends[i], w))
            hits += cache == "remote_hit"
            misses += cache == "miss"
            failed += status == "failed"
            metrics.append(TargetMetrics(name=name, start=start, end=start + dur, duration_s=dur, status=status,
                                         cache=cache, worker=f"w{w}", deps=deps[i]))
        finish = max(ends) + 0.01
        metrics.sort(key=lambda m: (m.start, m.name))
        out.append(BuildSession(
            id=f"{sc.seed:08x}{k:024x}", name="synthetic", start=t0, finish=finish, duration_s=finish - t0,
            outcome="failed" if failed else "success", exit_code=1 if failed else 0,
            environment=BuildEnvironment(vcs=VcsInfo(commit=commit, branch=branch)), targets=metrics,
            cache_hits=hits, cache_misses=misses, cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
            totals=SessionTotals(targets=len(metrics), succeeded=len(metrics) - failed, failed=failed,
                                 target_time_s=sum(m.duration_s for m in metrics)),
        ))
    return out
