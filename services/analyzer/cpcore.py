"""Shared pieces of the change-point detector (pure logic, no I/O): thresholds, the
event record, the robust statistics the engine leans on, and the cache-share tracker.

Everything works on log durations: build-time noise and regressions are
multiplicative, so a 10 % slow-down is the same shift on a 30 s and a 30 min build.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import msgspec

LEVEL, MIX = "level", "mix"
NEW, CONTINUE, REVERT = "new", "continue", "revert"


@dataclass(frozen=True, slots=True)
class Params:
    """Thresholds; the defaults were tuned on synthetic families, not single series."""

    h_level: float = 4.5  # normal-equivalent |z| of the level scan
    loo: float = 0.6  # share of the threshold a short tail keeps without its top build
    h_run: float = 8.0  # log-likelihood ratio of a far run (~ p0**r <= e**-8)
    h_rate: float = 11.0  # log-likelihood ratio of a far-share change
    min_rel: float = 0.02  # smallest relative level change worth an alert
    min_rate_delta: float = 0.15  # smallest change of the far-build share
    clip: float = 8.0  # inliers are clipped at level +- clip*sigma
    far_sigma: float = 6.0  # a build is "far" beyond max(far_sigma*sigma, log1p(far_rel))
    far_rel: float = 0.3
    early: int = 24  # noise samples below which the level test uses a pooled t
    h_early: float = 4.0  # its normal-equivalent threshold: few builds, few tests
    min_tail: int = 2  # builds after a change before it can be confirmed
    min_pre: int = 3  # regime builds needed before a change can be tested
    settle: int = 5  # regime size from which far builds are told apart
    resettle: tuple[int, ...] = (5, 10, 20, 40)  # sizes at which a regime is re-classified
    sigma_floor: float = 0.002
    creep_rss: float = 12.0  # extra residual (in sigma^2) a ramp may leave over the step
    transient: int = 10  # a level that reverts within this many builds was a blip
    tails: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80,
                              96, 128, 160, 192, 256)
    rate_min_tail: int = 4  # builds after / before a share change, at least
    rate_min_pre: int = 8
    diff_window: int = 128  # |diffs| behind the noise estimate
    history: int = 512  # builds an engine keeps (bounded state for Redis)
    regime_cap: int = 384  # regime builds kept for the level scan


DEFAULT = Params()
_TRIM = 0.9  # share of the smallest |diffs| kept by the noise estimator
_TRIM_VAR = 2.0 * 0.6231  # E[d^2 | |d| below its 90 % quantile] for d = x1 - x2, unit normals


class Event(msgspec.Struct):
    """A confirmed change as the engine sees it."""

    index: int
    direction: int  # +1 slower, -1 faster
    kind: str  # LEVEL or MIX
    role: str  # NEW, CONTINUE (creep goes on) or REVERT (a blip ended)
    confidence: float  # 1 - p-value, Bonferroni-corrected over the splits scanned
    prev: int  # index of the engine's previous change, -1 if none


def conf_z(z: float, nu: float, tests: int) -> float:
    """Confidence of a Student-t value ``z`` with ``nu`` degrees of freedom."""
    zn = math.sqrt(nu * math.log1p(z * z / nu))  # Wallace: t -> normal
    return max(0.0, 1.0 - tests * math.erfc(zn / math.sqrt(2.0)))


def conf_llr(llr: float, tests: int) -> float:
    """Confidence of a log-likelihood ratio (2 * llr ~ chi-square, one degree)."""
    return max(0.0, 1.0 - tests * math.erfc(math.sqrt(max(llr, 0.0))))


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def noise(srt: list[float], ss: float) -> float:
    """Noise sigma from sorted |consecutive differences| (immune to level shifts) and
    their sum of squares: a 10 % trimmed RMS, much steadier than a MAD on the same
    window, yet blind to the odd jump across a change or an outlier that slipped in."""
    keep = max(1, int(_TRIM * len(srt) + 0.5))
    for d in srt[keep:]:
        ss -= d * d
    return math.sqrt(max(ss, 0.0) / keep / _TRIM_VAR)


def _xlogy(c: float, p: float) -> float:
    return c * math.log(p) if c else 0.0


def bern_llr(c0: int, n0: int, c1: int, n1: int) -> float:
    """Two-sample binomial likelihood ratio: both shares are estimated, so a short
    pre-window with no far builds by chance is not mistaken for a zero share."""
    pp = (c0 + c1) / (n0 + n1)
    out = 0.0
    for c, n in ((c0, n0), (c1, n1)):
        q = c / n
        out += _xlogy(c, q) + _xlogy(n - c, 1.0 - q) - _xlogy(c, pp) - _xlogy(n - c, 1.0 - pp)
    return out


def refine_rate_split(cs: list[int], n: int, k: int, best: float, p: Any) -> tuple[float, int]:
    """Around the coarse tail length ``k`` (between its neighbouring tails), the exact tail
    length whose hit/miss-rate split scores highest; returns (score, tail length)."""
    lo = max(p.rate_min_tail, max((t for t in p.tails if t < k), default=k))
    hi = min(n - p.rate_min_pre, min((t for t in p.tails if t > k), default=k))
    for kk in range(lo, hi + 1):
        n0 = n - kk
        c1 = cs[n] - cs[n0]
        if abs(c1 / kk - cs[n0] / n0) >= p.min_rate_delta:
            v = bern_llr(cs[n0], n0, c1, kk)
            if v > best:
                best, k = v, kk
    return best, k


@functools.lru_cache(maxsize=1024)
def t_threshold(h: float, nu: float) -> float:
    """Student-t value with the upper tail of a normal ``h`` (Wallace's approximation)."""
    nu = max(nu, 1.0)
    return math.sqrt(nu * math.expm1(min(h * h / nu, 50.0)))


def hinge(xs: list[int], ys: list[float]) -> tuple[float, int, float]:
    """Best continuous two-piece fit "ramp, then flat" over the knot position.

    Returns (residual sum of squares, knot position, slope).  O(n) with prefix sums."""
    n = len(ys)
    x0 = xs[0]
    px, pxx, py, pxy = [0.0], [0.0], [0.0], [0.0]
    for x, y in zip(xs, ys, strict=True):
        x -= x0
        px.append(px[-1] + x)
        pxx.append(pxx[-1] + x * x)
        py.append(py[-1] + y)
        pxy.append(pxy[-1] + x * y)
    sy = py[n]
    syy = sum((y - sy / n) ** 2 for y in ys)
    best = (syy, 0, 0.0)
    for j in range(1, n - 1):
        xk = xs[j] - x0
        r = n - j - 1  # regressor g = min(x, xk)
        sg, sgg = px[j + 1] + r * xk, pxx[j + 1] + r * xk * xk
        sgy = pxy[j + 1] + xk * (sy - py[j + 1])
        vg = sgg - sg * sg / n
        if vg <= 1e-9:
            continue
        cov = sgy - sg * sy / n
        rss = syy - cov * cov / vg
        if rss < best[0]:
            best = (rss, j, cov / vg)
    return best


def two_level_rss(ys: list[float], n0: int) -> float:
    a, b = ys[:n0], ys[n0:]
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    return sum((v - ma) ** 2 for v in a) + sum((v - mb) ** 2 for v in b)


class ShareTracker(msgspec.Struct):
    """Share of cache misses among builds that carry a cache flag.

    A fall in the hit rate makes the average build slower although neither hits nor
    misses changed, so it is a change of its own (kind MIX), found with the same
    two-sample binomial scan as the engine's far-build share."""

    idx: list[int] = msgspec.field(default_factory=list)
    cs: list[int] = msgspec.field(default_factory=lambda: [0])
    last: int = -1

    def push(self, i: int, miss: bool, p: Params = DEFAULT) -> Event | None:
        self.idx.append(i)
        self.cs.append(self.cs[-1] + miss)
        if len(self.idx) > p.history:
            cut = len(self.idx) - p.history // 2
            self.idx = self.idx[cut:]
            self.cs = [c - self.cs[cut] for c in self.cs[cut:]]
        if not miss and len(self.idx) % 4:
            return None  # a share falls slowly: checking every fourth hit is enough
        cs, n = self.cs, len(self.idx)
        best, bk = 0.0, 0
        for k in p.tails:
            if k < p.rate_min_tail:
                continue
            n0 = n - k
            if n0 < p.rate_min_pre:
                break
            c1 = cs[n] - cs[n0]
            if abs(c1 / k - cs[n0] / n0) >= p.min_rate_delta:
                v = bern_llr(cs[n0], n0, c1, k)
                if v > best:
                    best, bk = v, k
        if best < p.h_rate:
            return None
        best, bk = refine_rate_split(cs, n, bk, best, p)
        n0 = n - bk
        rose = (cs[n] - cs[n0]) / bk > cs[n0] / n0
        split = self.idx[n0]
        ev = Event(split, 1 if rose else -1, MIX, NEW, conf_llr(best, len(p.tails)), self.last)
        self.last = split
        self.idx = self.idx[n0:]
        self.cs = [c - cs[n0] for c in cs[n0:]]
        return ev
