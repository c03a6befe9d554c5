"""Build-time regression detection: the analyzer's public API (pure logic, no I/O).

* ``detect(values)`` -> indices where a new level starts (the harness plug-in);
* ``find_changes(values, cached=...)`` -> ``ChangePoint`` records with medians,
  percent change, confidence and direction;
* ``StreamingDetector`` -> one alert per change as builds arrive, with state that
  round-trips through bytes so a service can park it in Redis between builds.

All three run the same online engine (``changepoint.Engine``), so an offline answer
and the alerts a live detector raised over the same history agree (offline, a
cache-share change may move by a few builds once the builds after it are known, and
a blip that reverted is dropped).  With cache flags, hits and misses are analysed as
separate streams (like with like) and the miss share gets its own test; without
them the engine tells the far modes apart itself.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from typing import Literal

import msgspec

from buildtel.services.analyzer.changepoint import Engine
from buildtel.services.analyzer.cpcore import (
    DEFAULT,
    MIX,
    NEW,
    REVERT,
    Event,
    Params,
    ShareTracker,
    bern_llr,
)

__all__ = ["ChangePoint", "Params", "StreamingDetector", "detect", "find_changes"]

Direction = Literal["regression", "improvement"]
Channel = Literal["all", "hit", "miss"]
Flags = Sequence[bool | None] | None  # per-build cache hit flag; None = unknown

_CHANNELS: tuple[Channel, Channel, Channel] = ("all", "hit", "miss")
_DEDUP = 8  # builds within which two same-way changes of one channel are one change
_DEDUP_CROSS = 30  # hits and misses are sparse streams: their splits scatter more
_REFINE = 20  # builds a share change may move when the full history is known
_RECENT = 512  # builds kept for the medians of a live alert
_STATE_VERSION = 1


class ChangePoint(msgspec.Struct, frozen=True, kw_only=True):
    """One change in build duration.

    ``before_median``/``after_median`` are medians of the builds of ``channel`` (all
    builds for ``"all"``) between the neighbouring changes of that channel and this
    one; a live alert only knows the builds up to the moment it fired.
    ``change_pct`` is ``100 * (after/before - 1)`` of those medians, except for
    ``kind == "mix"`` (the cache-miss share moved) where medians can stay put while
    the average build slows down, so it uses the means.
    """

    index: int
    before_median: float
    after_median: float
    change_pct: float
    confidence: float
    direction: Direction
    kind: Literal["level", "mix"] = "level"
    channel: Channel = "all"
    detected_at: int = 0  # builds seen when the change was confirmed


class _State(msgspec.Struct):
    version: int = _STATE_VERSION
    n: int = 0
    engines: dict[str, Engine] = msgspec.field(default_factory=dict)
    share: ShareTracker = msgspec.field(default_factory=ShareTracker)
    r_idx: list[int] = msgspec.field(default_factory=list)  # recent valid builds
    r_val: list[float] = msgspec.field(default_factory=list)
    r_ch: list[int] = msgspec.field(default_factory=list)
    alerts: list[ChangePoint] = msgspec.field(default_factory=list)  # latest kept alerts


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_State)


def _as_duration(value: object) -> float | None:
    # Durations are positive; NaN, infinities and non-positive numbers are bad
    # samples (a crashed or mis-timed build), not evidence about the level.
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _channel_of(cached: bool | None) -> int:
    return 0 if cached is None else (1 if cached else 2)


def _summary(before: list[float], after: list[float], kind: str) -> tuple[float, float, float]:
    if not before or not after:
        return math.nan, math.nan, math.nan
    b, a = statistics.median(before), statistics.median(after)
    if kind == MIX:
        # Plain sums: fsum raises on overflow, and absurd inputs must not crash us.
        base, new = sum(before) / len(before), sum(after) / len(after)
    else:
        base, new = b, a
    pct = 100.0 * (new / base - 1.0) if base > 0 and math.isfinite(base) else math.nan
    return b, a, pct


def _members(channel: str) -> tuple[int, ...]:
    return (0, 1, 2) if channel == "all" else (_CHANNELS.index(channel),)


class StreamingDetector:
    """Feed builds one at a time; ``update`` returns a ``ChangePoint`` once per change.

    A build with ``cached=None`` goes to the unflagged stream, ``True``/``False`` to
    the cache-hit/cache-miss streams, and flagged builds also feed the miss-share
    test.  A creep that keeps going, a blip that reverts within a few builds and the
    same change seen by a second channel raise no further alert.
    """

    def __init__(self, params: Params = DEFAULT) -> None:
        self.params = params
        self._s = _State()

    @property
    def builds_seen(self) -> int:
        return self._s.n

    @property
    def recent_alerts(self) -> list[ChangePoint]:
        return list(self._s.alerts)

    def update(self, value: float, cached: bool | None = None) -> ChangePoint | None:
        alert, _ = self._feed(value, cached)
        return alert

    def to_bytes(self) -> bytes:
        return _encoder.encode(self._s)

    @classmethod
    def from_bytes(cls, data: bytes, params: Params = DEFAULT) -> StreamingDetector:
        state = _decoder.decode(data)
        if state.version != _STATE_VERSION:
            raise ValueError(f"unsupported detector state version {state.version}")
        det = cls(params)
        det._s = state
        return det

    # ------------------------------------------------------------------ internals
    def _feed(self, value: float, cached: bool | None) -> tuple[ChangePoint | None, ChangePoint | None]:
        """Returns (new alert, alert retracted because its level reverted)."""
        s, p = self._s, self.params
        i = s.n
        s.n += 1
        v = _as_duration(value)
        if v is None:
            return None, None
        value, ch = v, _channel_of(cached)
        s.r_idx.append(i)
        s.r_val.append(value)
        s.r_ch.append(ch)
        if len(s.r_idx) > _RECENT:
            del s.r_idx[0], s.r_val[0], s.r_ch[0]
        name = _CHANNELS[ch]
        eng = s.engines.get(name)
        if eng is None:
            eng = s.engines[name] = Engine()
        events: list[tuple[Event, Channel]] = []
        ev = eng.push(i, value, p)
        if ev is not None:
            events.append((ev, name))
        if ch:
            ev = s.share.push(i, ch == 2, p)
            if ev is not None:
                events.append((ev, "all"))
        alert = retracted = None
        for ev, channel in events:
            if ev.role == REVERT:
                retracted = self._retract(ev.prev, channel) or retracted
            elif ev.role == NEW and alert is None:
                alert = self._alert(ev, channel)
        return alert, retracted

    def _retract(self, index: int, channel: str) -> ChangePoint | None:
        for k, cp in enumerate(self._s.alerts):
            if cp.index == index and cp.channel == channel:
                return self._s.alerts.pop(k)
        return None

    def _alert(self, ev: Event, channel: Channel) -> ChangePoint | None:
        s = self._s
        direction = 1 if ev.direction > 0 else -1
        for cp in s.alerts:
            same_way = (cp.direction == "regression") == (direction > 0)
            window = _DEDUP if cp.channel == channel else _DEDUP_CROSS
            if same_way and abs(cp.index - ev.index) <= window:
                return None
        members = _members(channel)
        before = [v for j, v, c in zip(s.r_idx, s.r_val, s.r_ch, strict=True)
                  if c in members and ev.prev <= j < ev.index]
        after = [v for j, v, c in zip(s.r_idx, s.r_val, s.r_ch, strict=True) if c in members and j >= ev.index]
        b, a, pct = _summary(before, after, ev.kind)
        cp = ChangePoint(index=ev.index, before_median=b, after_median=a, change_pct=pct,
                         confidence=ev.confidence,
                         direction="regression" if direction > 0 else "improvement",
                         kind="mix" if ev.kind == MIX else "level", channel=channel,
                         detected_at=s.n)
        s.alerts.append(cp)
        if len(s.alerts) > 16:
            del s.alerts[0]
        return cp


def find_changes(values: Sequence[float], *, cached: Flags = None,
                 params: Params = DEFAULT) -> list[ChangePoint]:
    """All changes in a history, oldest first, with medians over the whole segments.

    ``cached`` (same length as ``values``) marks cache-hit builds; hits and misses
    are then compared only with their own kind, and a moving miss share is reported
    as ``kind="mix"``.
    """
    if cached is not None and len(cached) != len(values):
        raise ValueError("cached must have one flag per value")
    det = StreamingDetector(params)
    kept: list[ChangePoint] = []
    for i, v in enumerate(values):
        alert, retracted = det._feed(v, None if cached is None else cached[i])
        if retracted is not None:
            kept = [c for c in kept if not (c.index == retracted.index
                                            and c.channel == retracted.channel)]
        if alert is not None:
            kept.append(alert)
    kept.sort(key=lambda c: c.index)
    sigma = max((e.sigma for e in det._s.engines.values()), default=0.0)
    kept = [_refine_mix(c, kept, values, cached, sigma, params) if c.kind == "mix" else c
            for c in kept]
    kept.sort(key=lambda c: c.index)
    return [_resummarise(c, kept, values, cached) for c in kept]


def _refine_mix(cp: ChangePoint, kept: list[ChangePoint], values: Sequence[float],
                cached: Flags, sigma: float, p: Params) -> ChangePoint:
    """Re-place a share change with all the builds around it.

    When it fires, a share change has only a few dozen builds behind it, and one
    build says little about a share; the full history between the neighbouring
    changes pins the split far better."""
    same = [c.index for c in kept if c.channel == cp.channel]
    k = same.index(cp.index)
    lo = same[k - 1] if k else 0
    hi = same[k + 1] if k + 1 < len(same) else len(values)
    pos = [j for j in range(lo, hi)
           if _as_duration(values[j]) is not None and (cached is None or cached[j] is not None)]
    if len(pos) < 2 * p.rate_min_pre:
        return cp
    if cached is not None:
        flags = [0 if cached[j] else 1 for j in pos]
    else:
        ys = sorted(math.log(float(values[j])) for j in pos)
        h = len(ys) // 2 + 1
        _, a = min((ys[a + h - 1] - ys[a], a) for a in range(len(ys) - h + 1))
        level = statistics.median(ys[a:a + h])
        far = max(p.far_sigma * max(sigma, p.sigma_floor), math.log1p(p.far_rel))
        flags = [1 if math.log(float(values[j])) - level > far else 0 for j in pos]
    cs = [0]
    for f in flags:
        cs.append(cs[-1] + f)
    n = len(pos)
    best, at = -1.0, cp.index
    lo_s = max(p.rate_min_pre, bisect.bisect_left(pos, cp.index - _REFINE))
    hi_s = min(n - p.rate_min_tail, bisect.bisect_right(pos, cp.index + _REFINE) - 1)
    for s in range(lo_s, hi_s + 1):
        v = bern_llr(cs[s], s, cs[n] - cs[s], n - s)
        if v > best:
            best, at = v, pos[s]
    return msgspec.structs.replace(cp, index=at)


def _resummarise(cp: ChangePoint, kept: list[ChangePoint], values: Sequence[float],
                 cached: Flags) -> ChangePoint:
    same = [c.index for c in kept if c.channel == cp.channel]
    k = same.index(cp.index)
    lo = same[k - 1] if k else 0
    hi = same[k + 1] if k + 1 < len(same) else len(values)
    members = _members(cp.channel)

    def take(a: int, b: int) -> list[float]:
        out = []
        for j in range(a, b):
            v = _as_duration(values[j])
            if v is not None and _channel_of(None if cached is None else cached[j]) in members:
                out.append(v)
        return out

    b, a, pct = _summary(take(lo, cp.index), take(cp.index, hi), cp.kind)
    return msgspec.structs.replace(cp, before_median=b, after_median=a, change_pct=pct)


def detect(values: Sequence[float]) -> list[int]:
    """Indices where a new level starts (harness plug-in): sorted, unique, in range."""
    return sorted({c.index for c in find_changes(list(values)) if 0 < c.index < len(values)})
