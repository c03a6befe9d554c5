"""Online change-point engine for one stream of build durations (pure logic, no I/O).

Three tests run as each build arrives:

* level: a generalised likelihood-ratio scan of the recent tail against the rest of
  the current regime, on clipped log values of the "inlier" builds;
* far run: a run of builds far away from the level (beyond what the noise allows)
  that agree with each other, judged against how often far builds occur anyway;
* rate: a change in the share of far builds (e.g. the cache-miss share), but only
  when those far builds form a tight mode, so scattered infra spikes never count.

Decisions are irrevocable, so re-running the engine over a longer history reports
the same indices: offline and streaming answers agree by construction.
"""

from __future__ import annotations

import bisect
import math

import msgspec

from buildtel.services.analyzer.cpcore import (
    CONTINUE,
    DEFAULT,
    LEVEL,
    MIX,
    NEW,
    REVERT,
    Event,
    Params,
    bern_llr,
    conf_llr,
    conf_z,
    hinge,
    median,
    noise,
    refine_rate_split,
    t_threshold,
    two_level_rss,
)

__all__ = ["CONTINUE", "DEFAULT", "LEVEL", "MIX", "NEW", "REVERT", "Engine", "Event", "Params"]


class Engine(msgspec.Struct):
    """State of one stream; every field is plain data so msgpack round-trips it exactly."""

    seen: int = 0
    h_idx: list[int] = msgspec.field(default_factory=list)  # recent builds (global index)
    h_raw: list[float] = msgspec.field(default_factory=list)
    h_flag: list[int] = msgspec.field(default_factory=list)  # 0 inlier, +-1 far above/below
    reg_start: int = 0
    r_idx: list[int] = msgspec.field(default_factory=list)  # regime inliers
    r_u: list[float] = msgspec.field(default_factory=list)  # log values
    r_cs: list[float] = msgspec.field(default_factory=lambda: [0.0])  # cumsum of clipped logs
    r_sorted: list[float] = msgspec.field(default_factory=list)
    diffs: list[float] = msgspec.field(default_factory=list)  # FIFO of |diffs|
    d_sorted: list[float] = msgspec.field(default_factory=list)
    d_ss: float = 0.0
    last_in: float | None = None
    sigma: float = 0.0
    rate_start: int = 0
    hi_cs: list[int] = msgspec.field(default_factory=lambda: [0])
    lo_cs: list[int] = msgspec.field(default_factory=lambda: [0])
    far_mem: list[float] = msgspec.field(default_factory=list)  # signed log offsets
    far_at: list[int] = msgspec.field(default_factory=list)  # their indices
    run_len: int = 0
    run_side: int = 0
    last_idx: int = -1
    last_dir: int = 0
    last_level: float = 0.0  # log level before the last level change
    last_any: int = -1  # index of the last change of any kind

    # ---------------------------------------------------------------- helpers
    def _level(self) -> float:
        s = self.r_sorted
        n = len(s)
        if not n:  # a regime whose builds were all re-classified far: fall back
            return self.last_in if self.last_in is not None else 0.0
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    def _far_limit(self, p: Params, sigma: float) -> float:
        return max(p.far_sigma * sigma, math.log1p(p.far_rel))

    def _sig(self, p: Params) -> float:
        return max(self.sigma, p.sigma_floor)

    def _add_diff(self, y: float, p: Params) -> None:
        if self.last_in is not None:
            d = abs(y - self.last_in)
            self.diffs.append(d)
            bisect.insort(self.d_sorted, d)
            self.d_ss += d * d
            if len(self.diffs) > p.diff_window:
                old = self.diffs.pop(0)
                del self.d_sorted[bisect.bisect_left(self.d_sorted, old)]
                self.d_ss -= old * old
            if self.seen % 256 == 0:  # keep the running sum from drifting
                self.d_ss = math.fsum(v * v for v in self.diffs)
            self.sigma = noise(self.d_sorted, self.d_ss)
        self.last_in = y

    def _add_inlier(self, i: int, y: float, p: Params) -> None:
        if self.r_sorted:
            lvl, c = self._level(), p.clip * self._sig(p)
            yc = min(max(y, lvl - c), lvl + c)
        else:
            yc = y
        self.r_idx.append(i)
        self.r_u.append(y)
        self.r_cs.append(self.r_cs[-1] + yc)
        bisect.insort(self.r_sorted, y)
        if len(self.r_idx) > p.regime_cap:
            # Old regime builds add little precision but cost memory in Redis.
            cut = len(self.r_idx) - p.regime_cap // 2
            base = self.r_cs[cut]
            self.r_idx, self.r_u = self.r_idx[cut:], self.r_u[cut:]
            self.r_cs = [v - base for v in self.r_cs[cut:]]
            self.r_sorted = sorted(self.r_u)

    def _rebuild(self, start: int, p: Params, flip: int = 0) -> None:
        """Start the level regime at ``start``, re-classifying the builds since then.

        ``flip`` is the side of a far run that became the new level: its builds turn
        into inliers and the old level's builds into far ones on the other side.
        """
        self.reg_start = start
        self.r_idx, self.r_u, self.r_cs, self.r_sorted = [], [], [0.0], []
        pos = [j for j, i in enumerate(self.h_idx) if i >= start]
        ys = [math.log(self.h_raw[j]) for j in pos]
        if not ys:
            return
        flags = self.h_flag
        if flip:
            # The far run is the new level now, not evidence of a far mode.
            keep = [k for k, at in enumerate(self.far_at) if at < start]
            self.far_mem = [self.far_mem[k] for k in keep]
            self.far_at = [self.far_at[k] for k in keep]
            for j in pos:
                flags[j] = 0 if flags[j] == flip else (-flip if flags[j] == 0 else flags[j])
        sig = self._sig(p)
        if len(ys) >= p.settle:
            # Early on the diff-based sigma still holds jumps between cache modes.
            # The shortest half of the sorted values sits inside the dominant mode.
            srt = sorted(ys)
            h = len(srt) // 2 + 1
            w, a = min((srt[a + h - 1] - srt[a], a) for a in range(len(srt) - h + 1))
            lvl = median(srt[a:a + h])
            far = self._far_limit(p, max(min(sig, w / 1.349), p.sigma_floor))
            for j, y in zip(pos, ys, strict=True):
                d = y - lvl
                flags[j] = 0 if abs(d) <= far else (1 if d > 0 else -1)
            prev, diffs = None, []
            for j, f in enumerate(flags):
                if f == 0:
                    y = math.log(self.h_raw[j])
                    if prev is not None:
                        diffs.append(abs(y - prev))
                    prev = y
            self.diffs = diffs[-p.diff_window:]
            self.d_sorted = sorted(self.diffs)
            self.d_ss = math.fsum(v * v for v in self.diffs)
            if self.diffs:
                self.sigma = noise(self.d_sorted, self.d_ss)
                sig = self._sig(p)
        inl = [(j, y) for j, y in zip(pos, ys, strict=True) if flags[j] == 0]
        lvl = median([y for _, y in inl]) if inl else 0.0
        c = p.clip * sig
        for j, y in inl:
            self.r_idx.append(self.h_idx[j])
            self.r_u.append(y)
            self.r_cs.append(self.r_cs[-1] + min(max(y, lvl - c), lvl + c))
        self.r_sorted = sorted(self.r_u)
        self._rerate(max(self.rate_start, self.h_idx[0]))

    def _rerate(self, start: int) -> None:
        """Restart the far-share counts at ``start`` and re-derive the current far run."""
        self.rate_start = start
        self.hi_cs, self.lo_cs = [0], [0]
        for i, f in zip(self.h_idx, self.h_flag, strict=True):
            if i >= start:
                self.hi_cs.append(self.hi_cs[-1] + (f > 0))
                self.lo_cs.append(self.lo_cs[-1] + (f < 0))
        self.run_len, self.run_side = 0, 0
        for f in reversed(self.h_flag):
            if f == 0 or (self.run_side and f != self.run_side):
                break
            self.run_side, self.run_len = f, self.run_len + 1

    # ---------------------------------------------------------------- public
    def push(self, i: int, raw: float, p: Params = DEFAULT) -> Event | None:
        """Feed build ``i`` (a positive duration); return a confirmed change, if any."""
        y = math.log(raw)
        self.seen += 1
        self.h_idx.append(i)
        self.h_raw.append(raw)
        if len(self.h_idx) > p.history:
            del self.h_idx[0], self.h_raw[0], self.h_flag[0]
        sig = self._sig(p)
        flag = 0
        if self.r_idx and len(self.diffs) >= p.settle - 1:
            d = y - self._level()
            if abs(d) > self._far_limit(p, sig):
                flag = 1 if d > 0 else -1
        self.h_flag.append(flag)
        self.hi_cs.append(self.hi_cs[-1] + (flag > 0))
        self.lo_cs.append(self.lo_cs[-1] + (flag < 0))
        if len(self.hi_cs) > p.history:
            self._rerate(self.h_idx[-(p.history // 2)])
        if flag:
            self.run_len = self.run_len + 1 if flag == self.run_side else 1
            self.run_side = flag
            if len(self.far_mem) >= 32:
                del self.far_mem[0], self.far_at[0]
            self.far_mem.append(y - self._level())
            self.far_at.append(i)
        else:
            self.run_len, self.run_side = 0, 0
            self._add_diff(y, p)
            self._add_inlier(i, y, p)
            if len(self.r_idx) in p.resettle:
                # Which mode is the level is only clear once a regime has some builds:
                # re-classify a few times as it grows, so early outliers leave the base.
                self._rebuild(self.reg_start, p)
                flag = self.h_flag[-1]
        if self.last_in is None or len(self.diffs) < 2:
            return None
        ev = self._test_level(p) if flag == 0 else self._test_run(p)
        # A share rises when far builds arrive; a fall needs dozens of builds to show,
        # so checking it every fourth build loses nothing and saves time.
        if ev is None and (flag or self.seen % 4 == 0) and (self.hi_cs[-1] >= 4 or self.lo_cs[-1] >= 4):
            ev = self._test_rate(p)
        return ev

    # ---------------------------------------------------------------- tests
    def _test_level(self, p: Params) -> Event | None:
        m = len(self.r_idx)
        cs = self.r_cs
        tot = cs[m]
        if len(self.diffs) < p.early:
            best, bk, sig, h = self._early_scan(p)
            nu = max(m - 2.0, 1.0)
        else:
            sig = self._sig(p)
            # sigma comes from a finite window, so z is really Student-t: use the t
            # value with the tail probability of a normal h_level (Wallace).
            nu = 0.6 * len(self.diffs)
            h = t_threshold(p.h_level, nu)
            # Compare d^2 * k * n0 (= z^2 * m * sigma^2) to keep the hot loop lean.
            best, bk, top = 0.0, 0, 0.0
            for k in p.tails[p.tails.index(p.min_tail):bisect.bisect_right(p.tails, m - p.min_pre)]:
                n0 = m - k
                c0 = cs[n0]
                d = (tot - c0) / k - c0 / n0
                v = d * d * k * n0
                if v > top:
                    top, best, bk = v, d, k
            if bk:
                best = math.copysign(math.sqrt(top / m) / sig, best)
            if abs(best) < h:
                return None
            # Refine the split between the neighbouring scanned tails.
            lo = max(p.min_tail, max((t for t in p.tails if t < bk), default=p.min_tail))
            hi = min(m - p.min_pre, min((t for t in p.tails if t > bk), default=bk))
            for k in range(lo, hi + 1):
                n0 = m - k
                d = (tot - cs[n0]) / k - cs[n0] / n0
                z = d / (sig * math.sqrt(1.0 / k + 1.0 / n0))
                if abs(z) > abs(best):
                    best, bk = z, k
        if abs(best) < h:
            return None
        n0 = m - bk
        pre, tail = self.r_u[:n0], self.r_u[n0:]
        mp, mt = median(pre), median(tail)
        if abs(mt - mp) < math.log1p(p.min_rel) or (mt - mp) * best <= 0:
            return None
        if bk <= 8:
            # A real shift moves every build; one outlier must not carry a short tail.
            yc = [cs[j + 1] - cs[j] for j in range(n0, m)]
            drop = max(yc) if best > 0 else min(yc)
            k1 = bk - 1
            d1 = (tot - cs[n0] - drop) / k1 - cs[n0] / n0
            if d1 * best <= 0 or abs(d1) / (sig * math.sqrt(1.0 / k1 + 1.0 / n0)) < p.loo * h:
                return None
        direction = 1 if best > 0 else -1
        split = self.r_idx[n0]
        role = self._role(split, direction, mp, mt, n0, p)
        ev = Event(split, direction, LEVEL, role, conf_z(abs(best), nu, len(p.tails)),
                   self.last_any)
        self._after_level_change(split, direction, mp, p)
        return ev

    def _early_scan(self, p: Params) -> tuple[float, int, float, float]:
        """Two-sample t over every split while the noise window is short: the pooled
        within-segment spread has m - 2 degrees of freedom, more than the diffs."""
        ys, cs = self.r_u, self.r_cs
        m = len(ys)
        if m - p.min_pre < p.min_tail:
            return 0.0, 0, 0.0, math.inf
        q = [0.0]
        for v in ys:
            q.append(q[-1] + v * v)
        s = [0.0]
        for v in ys:
            s.append(s[-1] + v)
        best, bk, bsig = 0.0, 0, 0.0
        for k in range(p.min_tail, m - p.min_pre + 1):
            n0 = m - k
            ss = (q[n0] - s[n0] ** 2 / n0) + (q[m] - q[n0] - (s[m] - s[n0]) ** 2 / k)
            sig = max(math.sqrt(max(ss, 0.0) / (m - 2)), p.sigma_floor)
            d = (cs[m] - cs[n0]) / k - cs[n0] / n0
            z = d / (sig * math.sqrt(1.0 / k + 1.0 / n0))
            if abs(z) > abs(best):
                best, bk, bsig = z, k, sig
        return best, bk, bsig, t_threshold(p.h_early, m - 2)

    def _role(self, split: int, direction: int, mp: float, mt: float, n0: int,
              p: Params) -> str:
        if self.last_idx < 0:
            return NEW
        span = split - self.last_idx
        if (direction != self.last_dir and span <= p.transient
                and abs(mt - self.last_level) <= 0.5 * abs(mp - self.last_level)):
            return REVERT
        if direction == self.last_dir:
            if span < 10:
                return CONTINUE
            # Creep: a ramp (levelling off or not) through the whole regime explains
            # the data about as well as the step that fired.  After a real step, no.
            if 0 < n0 < len(self.r_u):
                rss, _, slope = hinge(self.r_idx, self.r_u)
                excess = rss - two_level_rss(self.r_u, n0)
                if slope * direction > 0 and excess <= p.creep_rss * self._sig(p) ** 2:
                    return CONTINUE
        return NEW

    def _after_level_change(self, split: int, direction: int, before: float, p: Params,
                            flip: int = 0) -> None:
        self.last_idx, self.last_dir, self.last_level = split, direction, before
        self.last_any = split
        self._rebuild(split, p, flip)

    def _test_run(self, p: Params) -> Event | None:
        r = self.run_len
        if r < p.min_tail or len(self.r_idx) < p.min_tail:
            return None
        ys = [math.log(v) for v in self.h_raw[-r:]]
        sig = self._sig(p)
        if max(ys) - min(ys) > 5.0 * sig:
            return None
        lvl = self._level()
        dev = median(ys) - lvl
        split, direction = self.h_idx[-r], self.run_side
        cs = self.hi_cs if direction > 0 else self.lo_cs
        n = len(cs) - 1
        n0 = max(n - r, 0)
        p0 = (cs[n0] + 0.25) / (n0 + 1.0)
        llr = r * math.log(1.0 / p0) if p0 < 1 else 0.0
        # Back at the level of just before a change that is only a few builds old:
        # that change was a blip, and undoing it needs no fresh evidence.
        back = (self.last_idx >= 0 and direction != self.last_dir
                and split - self.last_idx <= p.transient
                and abs(lvl + dev - self.last_level) <= 3.0 * sig)
        if not back:
            if cs[n0] and r <= p.min_tail:
                return None  # a series that had outliers before must show one more build
            if llr < p.h_run:
                return None
            if sum(1 for m in self.far_mem[:-r] if abs(m - dev) <= 3.0 * sig) >= 2:
                return None  # builds at a level seen before: a mode, left to the rate test
        role = self._role(split, direction, lvl, lvl + dev, len(self.r_idx), p)
        ev = Event(split, direction, LEVEL, role, max(0.0, 1.0 - math.exp(-llr)), self.last_any)
        self._after_level_change(split, direction, lvl, p, flip=direction)
        self._rerate(split)
        return ev

    def _test_rate(self, p: Params) -> Event | None:
        best = (0.0, 0, 0)
        for side, cs in ((1, self.hi_cs), (-1, self.lo_cs)):
            n = len(cs) - 1
            tot = cs[n]
            if tot < 4:
                continue
            for k in p.tails:
                if k < p.rate_min_tail:
                    continue
                n0 = n - k
                if n0 < p.rate_min_pre:
                    break
                c1 = tot - cs[n0]
                if abs(c1 / k - cs[n0] / n0) < p.min_rate_delta:
                    continue
                llr = bern_llr(cs[n0], n0, c1, k)
                if llr > best[0]:
                    best = (llr, k, side)
        llr, k, side = best
        if llr < p.h_rate:
            return None
        cs = self.hi_cs if side > 0 else self.lo_cs
        n = len(cs) - 1
        llr, k = refine_rate_split(cs, n, k, llr, p)
        n0 = n - k
        p0, p1 = cs[n0] / max(n0, 1), (cs[n] - cs[n0]) / k
        # Only a tight mode (cache misses) has a share; scattered spikes do not.
        off = len(self.h_idx) - n  # history position of the rate regime's first build
        seg = range(off + n0, off + n) if p1 > p0 else range(off, off + n0)
        far = [math.log(self.h_raw[j]) for j in seg if self.h_flag[j] == side][-16:]
        sig = self._sig(p)
        if len(far) < 4:
            return None
        mf = median(far)
        spread = sorted(abs(v - mf) for v in far)
        if spread[(3 * len(spread)) // 4] > 2.0 * sig:
            return None
        split = self.h_idx[off + n0]
        direction = side if p1 > p0 else -side
        if p1 >= 0.8:
            # Nearly every build is now far: that is a new level, not a new mix.
            ev = Event(split, direction, LEVEL, NEW, conf_llr(llr, len(p.tails)), self.last_any)
            self._after_level_change(split, direction, self._level(), p, flip=side)
        else:
            ev = Event(split, direction, MIX, NEW, conf_llr(llr, len(p.tails)), self.last_any)
            self.last_any = split
        self._rerate(split)
        return ev
