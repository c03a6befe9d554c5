"""Small, dependency-free statistics used by the analyzer (pure functions, no I/O).

Definitions (also in ``docs/analytics.md``):

* percentiles interpolate linearly between closest ranks: for sorted ``x`` of
  length ``n`` the q-quantile is ``x[h] `` with ``h = (n - 1) * q`` interpolated
  (numpy's default, Excel's PERCENTILE.INC, ``statistics.quantiles(method="inclusive")``);
* the standard deviation is the *sample* one (divisor ``n - 1``), 0 for one value;
* trends are ordinary least squares; the p-value is the two-sided t-test of
  "slope = 0" with ``n - 2`` degrees of freedom and the interval is the 95 %
  confidence interval of the slope.

The Student t distribution is computed from the regularised incomplete beta
function (Lentz's continued fraction) because scipy is not a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import msgspec


class Fit(msgspec.Struct, kw_only=True):
    """A least-squares line ``y = intercept + slope * x`` and how far to trust its slope."""

    n: int = 0
    slope: float = 0.0
    intercept: float = 0.0
    r2: float = 0.0  # share of the variance the line explains
    p_value: float = 1.0  # two-sided, H0: slope == 0
    ci_low: float = 0.0  # 95 % confidence interval of the slope
    ci_high: float = 0.0
    # Spread of x (population standard deviation): how much of the x axis the
    # points cover, so a caller can tell a slope measured over days from one
    # extrapolated from minutes.
    x_sd: float = 0.0


def percentile_sorted(s: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of an already sorted sequence, linear interpolation."""
    n = len(s)
    if n == 0:
        return 0.0
    h = (n - 1) * q
    lo = int(h)
    if lo >= n - 1:
        return float(s[-1])
    frac = h - lo
    return float(s[lo]) + frac * (float(s[lo + 1]) - float(s[lo]))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation, two-pass so large offsets do not cancel."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    m = math.fsum(values) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(math.fsum((v - m) * (v - m) for v in values) / (n - 1))


def fit_from_sums(n: int, sx: float, sy: float, sxx: float, sxy: float, syy: float) -> Fit:
    """Least squares from centred sums (``sxx = Σ(x - x̄)²`` etc.), as grouped code produces them."""
    if n < 2 or sxx <= 0:
        return Fit(n=n, intercept=sy / n if n else 0.0)
    x_sd = math.sqrt(sxx / n)
    slope = sxy / sxx
    intercept = (sy - slope * sx) / n
    ss_res = max(syy - slope * sxy, 0.0)
    r2 = 1.0 - ss_res / syy if syy > 0 else 0.0
    if n < 3:
        return Fit(n=n, slope=slope, intercept=intercept, r2=r2, p_value=1.0, ci_low=slope, ci_high=slope,
                   x_sd=x_sd)
    df = n - 2
    se = math.sqrt(ss_res / df / sxx)
    if se == 0:
        return Fit(n=n, slope=slope, intercept=intercept, r2=max(r2, 0.0), p_value=0.0 if slope else 1.0,
                   ci_low=slope, ci_high=slope, x_sd=x_sd)
    p = t_two_sided_p(slope / se, df)
    half = t_quantile(0.975, df) * se
    return Fit(n=n, slope=slope, intercept=intercept, r2=min(max(r2, 0.0), 1.0), p_value=p,
               ci_low=slope - half, ci_high=slope + half, x_sd=x_sd)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Fit:
    """Ordinary least squares of ``ys`` on ``xs`` (centred, so Unix times do not lose precision)."""
    n = len(xs)
    if n == 0:
        return Fit()
    mx = math.fsum(xs) / n
    my = math.fsum(ys) / n
    sxx = math.fsum((x - mx) * (x - mx) for x in xs)
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    syy = math.fsum((y - my) * (y - my) for y in ys)
    return fit_from_sums(n, mx * n, my * n, sxx, sxy, syy)


# -- Student t via the regularised incomplete beta function --------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    if df <= 0 or math.isnan(t):
        return 1.0
    return min(1.0, max(0.0, betainc(df / 2.0, 0.5, df / (df + t * t))))


def t_cdf(t: float, df: float) -> float:
    p = 0.5 * t_two_sided_p(t, df)
    return 1.0 - p if t > 0 else p


@lru_cache(maxsize=4096)
def t_quantile(q: float, df: float) -> float:
    """Inverse of :func:`t_cdf` by bisection (60 halvings: far below float noise); cached because
    every target of a report asks for the same few degrees of freedom."""
    if not 0.0 < q < 1.0:
        raise ValueError("q must be in (0, 1)")
    if q == 0.5:
        return 0.0
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
