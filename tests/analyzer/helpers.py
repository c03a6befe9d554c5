"""Hand-built sessions for the analyzer tests."""

from __future__ import annotations

import random

from buildtel.shared.protocol import (
    BuildEnvironment,
    BuildSession,
    SessionTotals,
    TargetMetrics,
    VcsInfo,
)

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def target(name: str, start: float, dur: float, *, status: str = "success", cache: str = "miss",
           worker: str = "", deps: list[str] | None = None) -> TargetMetrics:
    return TargetMetrics(name=name, start=start, end=start + dur, duration_s=dur, status=status,  # type: ignore[arg-type]
                         cache=cache, worker=worker, deps=deps or [])  # type: ignore[arg-type]


def session(k: int, dur: float, *, start: float | None = None, outcome: str = "success",
            targets: list[TargetMetrics] | None = None, commit: str | None = None, branch: str | None = "main",
            totals: bool = True) -> BuildSession:
    """Session number ``k`` (id derived from it), starting an hour after the previous one by default."""
    start = T0 + 3600.0 * k if start is None else start
    ts = targets or []
    hits = sum(t.cache in ("local_hit", "remote_hit") for t in ts)
    misses = sum(t.cache == "miss" for t in ts)
    tot = SessionTotals()
    if totals:
        tot = SessionTotals(targets=len(ts), succeeded=sum(t.status == "success" for t in ts),
                            failed=sum(t.status == "failed" for t in ts),
                            skipped=sum(t.status == "skipped" for t in ts),
                            cancelled=sum(t.status == "cancelled" for t in ts),
                            target_time_s=sum(t.duration_s for t in ts))
    return BuildSession(id=f"{k:032x}", name="b", start=start, finish=start + dur, duration_s=dur,
                        outcome=outcome, targets=ts, cache_hits=hits, cache_misses=misses,  # type: ignore[arg-type]
                        cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0, totals=tot,
                        environment=BuildEnvironment(vcs=VcsInfo(commit=commit or f"c{k:039x}", branch=branch)))


def step_history(n: int = 60, at: int = 35, seed: int = 1, branch: str = "main") -> list[BuildSession]:
    """``n`` hourly builds whose wall time steps from 100 s to 140 s at build ``at`` (targets steady):
    one build-level regression for the analyzer to find."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        level = 100.0 if k < at else 140.0
        ts = [target("//svc:build", T0 + 3600 * k, 2.0 * rng.gauss(1, 0.01), worker="w1"),
              target("//svc:test", T0 + 3600 * k + 2, 1.0 * rng.gauss(1, 0.01), worker="w1", deps=["//svc:build"])]
        out.append(session(k, level * rng.gauss(1, 0.01), targets=ts, branch=branch))
    return out
