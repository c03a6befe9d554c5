"""Per-target aggregation over many sessions, columnar so 10,000 x 200 targets takes well under a second.

The report needs, for every target name, its runs, duration moments, median and
p95, cache hits and misses and two least-squares trends.  A loop over two million
``TargetMetrics`` in Python costs seconds, so the work is arranged as columns:
each attribute is pulled out with ``map(attrgetter)`` (C speed), names become
small integers through an interning dict, and the grouped sums are ``bincount``
calls when numpy is importable.  Without numpy the same formulas run on lists
(grouping by ``operator.call`` on bound ``list.append`` methods, again C speed),
just slower; :data:`ENGINE` says which one is active and both give the same
numbers (tests compare them).

Failed, skipped and cancelled targets are rare, so statuses are only read from
sessions whose totals say they have some (or whose totals are missing).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, call, itemgetter, mul
from typing import Any

from buildtel.services.analyzer.stats import Fit, fit_from_sums, percentile_sorted
from buildtel.shared.protocol import CACHE_HITS, BuildSession

# numpy is imported on first use, not with this module: the CLI imports it (through analytics.py)
# for the report's types only, and numpy's import was a fifth of `buildtel report`'s start-up.
ENGINE = "numpy" if importlib.util.find_spec("numpy") is not None else "python"


def _numpy() -> Any:
    import numpy

    return numpy


def __getattr__(name: str) -> Any:
    if name == "np":  # ``columns.np``: numpy, or None where it is not installed
        return _numpy() if ENGINE == "numpy" else None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
DAY_S = 86400.0

_name, _dur, _cache, _targets = attrgetter("name"), attrgetter("duration_s"), attrgetter("cache"), attrgetter("targets")
_status = attrgetter("status")
# 1 = served from a cache, 0 = executed and cacheable (a miss), 2 = uncacheable (neither).
CACHE_CODE = {"local_hit": 1, "remote_hit": 1, "miss": 0, "uncacheable": 2}
assert {k for k, v in CACHE_CODE.items() if v == 1} == CACHE_HITS


_gc_lock = threading.Lock()
_gc_depth = 0


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while decoding or aggregating many objects (reentrant, thread-safe).

    With millions of tracked objects alive (10k decoded sessions), every full collection walks
    all of them; decoding 10k sessions ran ~8x slower with the collector on.  Nothing here
    creates reference cycles, so nothing is left for it to find.
    """
    global _gc_depth
    with _gc_lock:
        _gc_depth += 1
        was = gc.isenabled() if _gc_depth == 1 else True
        gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and was:
                gc.enable()


class _Interner(dict):  # type: ignore[type-arg]
    """name -> dense id; ``__getitem__`` stays the C dict lookup, only new names run Python."""

    def __missing__(self, key: str) -> int:
        v = self[key] = len(self)
        return v


@dataclass
class TargetColumns:
    """One entry per target name, index-aligned lists."""

    names: list[str] = field(default_factory=list)
    runs: list[int] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    stdev: list[float] = field(default_factory=list)
    minimum: list[float] = field(default_factory=list)
    maximum: list[float] = field(default_factory=list)
    median: list[float] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    hits: list[int] = field(default_factory=list)
    misses: list[int] = field(default_factory=list)
    per_build: list[Fit] = field(default_factory=list)
    per_day: list[Fit] = field(default_factory=list)
    failed_keys: dict[str, set[int]] = field(default_factory=dict)  # name -> sessions where it failed
    not_success: dict[int, dict[str, str]] = field(default_factory=dict)  # session -> {name: status}


def _scan_statuses(sessions: Sequence[BuildSession], offsets: list[int]
                   ) -> tuple[list[int], dict[str, set[int]], dict[int, dict[str, str]]]:
    """Element positions that did not run (skipped/cancelled), failures by name, and every
    session's non-success targets (name -> status), for the flakiness test."""
    not_run: list[int] = []
    failed: dict[str, set[int]] = {}
    bad: dict[int, dict[str, str]] = {}
    for si, s in enumerate(sessions):
        t = s.totals
        if t.targets == len(s.targets) and not (t.failed or t.skipped or t.cancelled):
            continue  # the collector's totals vouch that every target here succeeded
        sts = list(map(_status, s.targets))
        if sts.count("success") == len(sts):
            continue
        base = offsets[si]
        here = bad[si] = {}
        for st in ("failed", "skipped", "cancelled"):
            j = -1
            for _ in range(sts.count(st)):  # list.index scans in C; non-success targets are few
                j = sts.index(st, j + 1)
                name = s.targets[j].name
                here[name] = st
                if st == "failed":
                    failed.setdefault(name, set()).add(si)
                else:
                    not_run.append(base + j)
    not_run.sort()
    return not_run, failed, bad


def target_columns(sessions: Sequence[BuildSession], t0: float, engine: str = "auto") -> TargetColumns:
    """Aggregate every target of ``sessions`` (chronological order); ``t0`` is the day-trend origin."""
    use_numpy = _use_numpy(engine)
    tl = list(map(_targets, sessions))
    counts = list(map(len, tl))
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    flat = list(chain.from_iterable(tl))
    if not flat:
        return TargetColumns()
    interner = _Interner()
    not_run, failed, bad = _scan_statuses(sessions, offsets)
    days = [(s.start - t0) / DAY_S for s in sessions]
    if use_numpy:
        np = _numpy()
        ids: Any = np.fromiter(map(interner.__getitem__, map(_name, flat)), dtype=np.int64, count=len(flat))
        dur: Any = np.fromiter(map(_dur, flat), dtype=np.float64, count=len(flat))
        cc: Any = np.fromiter(map(CACHE_CODE.__getitem__, map(_cache, flat)), dtype=np.int8, count=len(flat))
    else:
        ids = list(map(interner.__getitem__, map(_name, flat)))
        dur = list(map(_dur, flat))
        cc = list(map(CACHE_CODE.__getitem__, map(_cache, flat)))
    return columns_from_arrays(ids, dur, cc, counts, list(interner), days, not_run, failed, bad, use_numpy)


def _use_numpy(engine: str) -> bool:
    if engine == "numpy" and ENGINE != "numpy":
        raise RuntimeError("numpy is not installed")
    return ENGINE == "numpy" and engine in ("auto", "numpy")


def columns_from_arrays(ids: Any, dur: Any, cc: Any, counts: list[int], names: list[str], days: list[float],
                        not_run: list[int], failed: dict[str, set[int]], bad: dict[int, dict[str, str]],
                        use_numpy: bool) -> TargetColumns:
    """The aggregation proper, from flat columns (one entry per target run, sessions in order):
    ``ids`` index ``names``, ``cc`` is :data:`CACHE_CODE`; numpy arrays (int64, float64, int8)
    when ``use_numpy``, else lists.  ``not_run`` are the positions of skipped or cancelled runs,
    ``failed`` and ``bad`` as :class:`TargetColumns` ``failed_keys`` and ``not_success``."""
    if not len(ids):
        return TargetColumns()
    fn = _numpy_columns if use_numpy else _python_columns
    cols = fn(ids, dur, cc, counts, len(names), days, not_run)
    cols.names = list(names)
    cols.failed_keys = failed
    cols.not_success = bad
    ix = {n: i for i, n in enumerate(cols.names)}
    cols.failures = [0] * len(cols.names)
    for name, where in failed.items():
        cols.failures[ix[name]] = len(where)
    return cols


def _finish(cols: TargetColumns, n: list[int], sy: list[float], syy: list[float],
            sxb: list[float], sxyb: list[float], sxxb: list[float],
            sxd: list[float], sxyd: list[float], sxxd: list[float]) -> None:
    """Fits from centred sums, shared by both engines."""
    for g in range(len(n)):
        cols.per_build.append(fit_from_sums(n[g], sxb[g], sy[g], sxxb[g], sxyb[g], syy[g]))
        cols.per_day.append(fit_from_sums(n[g], sxd[g], sy[g], sxxd[g], sxyd[g], syy[g]))


def _numpy_columns(ids: Any, d: Any, cc: Any, counts: list[int], g_count: int, days: list[float],
                   not_run: list[int]) -> TargetColumns:
    np = _numpy()
    total_n = len(ids)
    # x of the per-build trend: the session's position in the window; per-day: its start in days.
    xb = np.repeat(np.arange(len(counts), dtype=np.float64), counts)
    xd = np.repeat(np.asarray(days, dtype=np.float64), counts)
    if not_run:
        keep = np.ones(total_n, dtype=bool)
        keep[not_run] = False
        ids, d, cc, xb, xd = ids[keep], d[keep], cc[keep], xb[keep], xd[keep]
    # Sums need no ordering (bincount).  Σ(x-x̄)(y-ȳ) = Σ x(y-ȳ) because Σ(y-ȳ) = 0 per target, and
    # x is centred on the window so Σx² - (Σx)²/n does not cancel at Unix-time magnitudes.
    n = np.bincount(ids, minlength=g_count)
    nz = np.maximum(n, 1)
    sy = np.bincount(ids, weights=d, minlength=g_count)
    dy = d - (sy / nz)[ids]
    syy = np.bincount(ids, weights=dy * dy, minlength=g_count)
    sums = []
    for x, shift in ((xb, (len(counts) - 1) / 2.0), (xd, (days[0] + days[-1]) / 2.0)):
        x = x - shift
        sx = np.bincount(ids, weights=x, minlength=g_count)
        sxx = np.bincount(ids, weights=x * x, minlength=g_count) - sx * sx / nz
        sums += [sx + shift * n, np.bincount(ids, weights=x * dy, minlength=g_count), np.maximum(sxx, 0.0)]
    by_cache = np.bincount(ids * 3 + cc, minlength=3 * g_count).reshape(g_count, 3)
    hits, misses = by_cache[:, 1], by_cache[:, 0]
    # Quantiles need each target's durations sorted: group with a stable radix sort on int16 ids,
    # then sort each (small) segment.
    small = ids.astype(np.int16) if g_count < 32_000 else ids
    gd = d[np.argsort(small, kind="stable")]
    ends = np.cumsum(n)
    starts = ends - n
    for s0, e0 in zip(starts.tolist(), ends.tolist(), strict=True):
        gd[s0:e0].sort()  # in place, segment by segment: no copies, no Python floats
    runs = n.tolist()
    cols = TargetColumns()
    last = np.maximum(n - 1, 0)
    cols.minimum = np.where(n > 0, gd[np.minimum(starts, gd.size - 1)], 0.0).tolist()
    cols.maximum = np.where(n > 0, gd[np.maximum(ends - 1, 0)], 0.0).tolist()
    for q, out in ((0.5, cols.median), (0.95, cols.p95)):
        h = last * q  # linear interpolation between closest ranks, as stats.percentile_sorted
        lo = np.floor(h).astype(np.int64)
        hi = np.minimum(lo + 1, last)
        a, b = gd[np.minimum(starts + lo, gd.size - 1)], gd[np.minimum(starts + hi, gd.size - 1)]
        out.extend(np.where(n > 0, a + (h - lo) * (b - a), 0.0).tolist())
    cols.runs = runs
    cols.total = sy.tolist()
    cols.mean = (sy / nz).tolist()
    syy_l = syy.tolist()
    cols.stdev = [math.sqrt(v / (k - 1)) if k > 1 else 0.0 for v, k in zip(syy_l, runs, strict=True)]
    cols.hits = [int(v) for v in hits.tolist()]
    cols.misses = [int(v) for v in misses.tolist()]
    _finish(cols, runs, cols.total, syy_l, *(a.tolist() for a in sums))
    return cols


def _python_columns(ids: list[int], dur: list[float], cc: list[int], counts: list[int], g_count: int,
                    days: list[float], not_run: list[int]) -> TargetColumns:
    x_day = list(chain.from_iterable(map(repeat, days, counts)))
    x_build = list(chain.from_iterable(map(repeat, map(float, range(len(counts))), counts)))
    groups: list[list[int]] = [[] for _ in range(g_count)]
    appends = [g.append for g in groups]
    skip = set(not_run)
    positions = range(len(ids)) if not skip else [i for i in range(len(ids)) if i not in skip]
    pos_ids = ids if not skip else [ids[i] for i in positions]
    # Bucket element positions by target id without a Python-level loop body.
    deque(map(call, map(appends.__getitem__, pos_ids), positions), maxlen=0)
    cols = TargetColumns()
    n_l: list[int] = []
    sy_l: list[float] = []
    syy_l: list[float] = []
    sxb_l: list[float] = []
    sxyb_l: list[float] = []
    sxxb_l: list[float] = []
    sxd_l: list[float] = []
    sxyd_l: list[float] = []
    sxxd_l: list[float] = []
    for idx in groups:
        n = len(idx)
        if n == 0:  # a target that was only ever skipped or cancelled
            for lst in (n_l, sy_l, syy_l, sxb_l, sxyb_l, sxxb_l, sxd_l, sxyd_l, sxxd_l, cols.mean, cols.stdev,
                        cols.median, cols.p95, cols.minimum, cols.maximum, cols.hits, cols.misses):
                lst.append(0)
            continue
        get = itemgetter(*idx) if n > 1 else (lambda seq, i=idx[0]: (seq[i],))
        y, c, xd, xb = get(dur), get(cc), get(x_day), get(x_build)
        sy = sum(y)
        mean = sy / n
        dy = [v - mean for v in y]
        syy = sum(map(mul, dy, dy))
        xbm = sum(xb) / n
        dxb = [v - xbm for v in xb]
        xdm = sum(xd) / n
        dxd = [v - xdm for v in xd]
        srt = sorted(y)
        n_l.append(n)
        sy_l.append(sy)
        syy_l.append(syy)
        sxb_l.append(sum(xb))
        sxyb_l.append(sum(map(mul, dxb, dy)))
        sxxb_l.append(sum(map(mul, dxb, dxb)))
        sxd_l.append(sum(xd))
        sxyd_l.append(sum(map(mul, dxd, dy)))
        sxxd_l.append(sum(map(mul, dxd, dxd)))
        cols.mean.append(mean)
        cols.stdev.append(math.sqrt(syy / (n - 1)) if n > 1 else 0.0)
        cols.median.append(percentile_sorted(srt, 0.5))
        cols.p95.append(percentile_sorted(srt, 0.95))
        cols.minimum.append(srt[0])
        cols.maximum.append(srt[-1])
        cols.hits.append(c.count(1))
        cols.misses.append(c.count(0))
    cols.runs, cols.total = n_l, sy_l
    _finish(cols, n_l, sy_l, syy_l, sxb_l, sxyb_l, sxxb_l, sxd_l, sxyd_l, sxxd_l)
    return cols

