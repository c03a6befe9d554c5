"""Build-time regression detector: steps, spikes, creep, cache modes, streaming, state."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildtel.services.analyzer.regression import (
    ChangePoint,
    StreamingDetector,
    detect,
    find_changes,
)


def _noise(rng: random.Random, cv: float) -> float:
    """Multiplicative noise with mean 1 and coefficient of variation ``cv``."""
    s = math.sqrt(math.log(1.0 + cv * cv))
    return math.exp(rng.gauss(-0.5 * s * s, s))


def _series(seed: int, levels: list[float], cv: float = 0.03) -> list[float]:
    rng = random.Random(seed)
    return [lvl * _noise(rng, cv) for lvl in levels]


def _steps(n: int, base: float, changes: dict[int, float]) -> list[float]:
    out, lvl = [], base
    for i in range(n):
        lvl *= 1.0 + changes.get(i, 0.0)
        out.append(lvl)
    return out


def _cache_series(seed: int, n: int = 400, hit_rate: float = 0.75, miss_factor: float = 2.5,
                  hit_shift_at: int | None = None, hit_shift: float = 0.0,
                  rate_after: float | None = None, change_at: int = 200
                  ) -> tuple[list[float], list[bool]]:
    rng = random.Random(seed)
    values, cached = [], []
    for i in range(n):
        p = rate_after if rate_after is not None and i >= change_at else hit_rate
        hit = rng.random() < p
        lvl = 100.0 * (1.0 + hit_shift if hit_shift_at is not None and i >= hit_shift_at and hit else 1.0)
        values.append(lvl * (1.0 if hit else miss_factor) * _noise(rng, 0.04))
        cached.append(hit)
    return values, cached


def _stream(values: list[float], cached: list[bool] | None = None) -> list[ChangePoint]:
    det = StreamingDetector()
    alerts = []
    for i, v in enumerate(values):
        cp = det.update(v, cached=None if cached is None else cached[i])
        if cp is not None:
            alerts.append(cp)
    return alerts


@pytest.mark.parametrize("seed", range(5))
def test_step_is_caught_within_a_few_builds(seed: int) -> None:
    values = _series(seed, _steps(120, 100.0, {60: 0.20}))
    assert [abs(i - 60) <= 3 for i in detect(values)] == [True]
    [cp] = find_changes(values)
    assert cp.direction == "regression" and cp.kind == "level" and cp.channel == "all"
    assert 0.999 < cp.confidence <= 1.0
    assert cp.change_pct == pytest.approx(20.0, abs=4.0)


@pytest.mark.parametrize("seed", range(5))
def test_single_spike_is_not_a_change(seed: int) -> None:
    values = _series(seed, [100.0] * 150)
    values[70] *= 3.0
    assert detect(values) == []
    assert _stream(values) == []


@pytest.mark.parametrize("seed", range(5))
def test_improvement_is_labelled_improvement(seed: int) -> None:
    values = _series(seed, _steps(150, 240.0, {80: -0.20}))
    [cp] = find_changes(values)
    assert abs(cp.index - 80) <= 3
    assert cp.direction == "improvement"
    assert cp.change_pct == pytest.approx(-20.0, abs=4.0)
    assert cp.after_median < cp.before_median


@pytest.mark.parametrize("seed", range(5))
def test_gradual_creep_raises_one_alert(seed: int) -> None:
    # +30 % spread over 80 builds: every single build looks like noise, the ramp does not.
    levels = [100.0 * (1.0 + 0.3 * min(1.0, max(0.0, (i - 99) / 80))) for i in range(380)]
    values = _series(seed, levels)
    offline = find_changes(values)
    alerts = _stream(values)
    assert len(offline) == 1 and len(alerts) == 1
    assert 90 <= alerts[0].index <= 183 and alerts[0].direction == "regression"


@pytest.mark.parametrize("seed", range(6))
def test_cache_bimodal_series_compare_like_with_like(seed: int) -> None:
    values, cached = _cache_series(seed)
    assert find_changes(values, cached=cached) == []
    assert _stream(values, cached) == []
    # Without flags the detector has to find the two modes itself, and does.
    assert detect(values) == []


@pytest.mark.parametrize("seed", range(4))
def test_cache_hit_slowdown_is_one_alert_on_the_hit_channel(seed: int) -> None:
    values, cached = _cache_series(seed, hit_shift_at=200, hit_shift=0.15)
    alerts = _stream(values, cached)
    assert len(alerts) == 1
    [cp] = alerts
    assert (cp.channel, cp.direction, cp.kind) == ("hit", "regression", "level")
    assert abs(cp.index - 200) <= 6
    [off] = find_changes(values, cached=cached)
    hits_before = [v for v, c in zip(values[:off.index], cached[:off.index], strict=True) if c]
    hits_after = [v for v, c in zip(values[off.index:], cached[off.index:], strict=True) if c]
    assert off.before_median == statistics.median(hits_before)
    assert off.after_median == statistics.median(hits_after)


@pytest.mark.parametrize("seed", range(4))
def test_falling_cache_hit_rate_is_a_mix_change(seed: int) -> None:
    values, cached = _cache_series(seed, hit_rate=0.85, rate_after=0.45)
    [cp] = find_changes(values, cached=cached)
    assert (cp.kind, cp.direction) == ("mix", "regression")
    assert abs(cp.index - 200) <= 15
    before, after = values[:cp.index], values[cp.index:]
    assert cp.change_pct == pytest.approx(100.0 * (statistics.fmean(after) / statistics.fmean(before) - 1.0))


@pytest.mark.parametrize("seed", range(4))
def test_streaming_emits_exactly_one_alert_per_step(seed: int) -> None:
    truth = {80: 0.25, 160: -0.20, 240: 0.30}
    values = _series(seed, _steps(320, 50.0, truth))
    alerts = _stream(values)
    assert len(alerts) == len(truth)
    for cp, (at, mag) in zip(alerts, truth.items(), strict=True):
        assert abs(cp.index - at) <= 3
        assert cp.direction == ("regression" if mag > 0 else "improvement")
        assert cp.detected_at - at <= 10  # builds seen after the change when it fired
    assert [c.index for c in alerts] == detect(values)


def test_state_round_trips_through_bytes_and_a_restored_replica_continues_exactly() -> None:
    values, cached = _cache_series(3, n=300, hit_shift_at=150, hit_shift=0.2)
    flags: list[bool | None] = [None if i % 7 == 0 else c for i, c in enumerate(cached)]
    whole = StreamingDetector()
    expected = [whole.update(v, cached=f) for v, f in zip(values, flags, strict=True)]
    got = []
    det = StreamingDetector()
    for v, f in zip(values, flags, strict=True):
        det = StreamingDetector.from_bytes(det.to_bytes())  # a new replica for every build
        got.append(det.update(v, cached=f))
    assert got == expected and any(e is not None for e in expected)
    assert det.to_bytes() == whole.to_bytes()
    assert det.builds_seen == len(values)


def test_state_of_another_version_is_refused() -> None:
    import msgspec

    blob = msgspec.msgpack.encode({"version": 99})
    with pytest.raises(ValueError, match="version"):
        StreamingDetector.from_bytes(blob)


@pytest.mark.parametrize("seed", range(3))
def test_medians_and_percent_change_match_statistics_median(seed: int) -> None:
    values = _series(seed, _steps(240, 80.0, {70: 0.30, 160: -0.15}))
    cps = find_changes(values)
    bounds = [0] + [c.index for c in cps] + [len(values)]
    assert len(cps) == 2
    for k, cp in enumerate(cps):
        before = statistics.median(values[bounds[k]:bounds[k + 1]])
        after = statistics.median(values[bounds[k + 1]:bounds[k + 2]])
        assert cp.before_median == before
        assert cp.after_median == after
        assert cp.change_pct == pytest.approx(100.0 * (after / before - 1.0), rel=1e-12)
    # A live alert only knows the builds up to the moment it fired.
    first = _stream(values)[0]
    assert first.before_median == statistics.median(values[:first.index])
    assert first.after_median == statistics.median(values[first.index:first.detected_at])


def test_short_history_and_bad_samples() -> None:
    values = [200.0, 203.0, 198.0, 201.0, 199.0, 300.0, 296.0, 305.0, 299.0, 302.0]
    assert detect(values) == [5]
    assert detect([]) == [] and detect([5.0]) == [] and detect([7.0] * 50) == []
    noisy = _series(1, _steps(100, 100.0, {50: 0.25}))
    noisy[10], noisy[30], noisy[70] = math.nan, 0.0, -5.0  # a crashed or mis-timed build
    assert [abs(i - 50) <= 3 for i in detect(noisy)] == [True]
    with pytest.raises(ValueError):
        find_changes([1.0, 2.0], cached=[True])


finite = st.floats(allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-300, max_value=1e300)


@settings(max_examples=150, deadline=None)
@given(st.one_of(
    st.lists(finite, max_size=120),
    st.lists(positive, max_size=300),
    st.builds(lambda v, n: [v] * n, finite, st.integers(0, 200)),
    st.builds(lambda a, b, n, k: [a] * k + [b] * n, positive, positive, st.integers(0, 60),
              st.integers(0, 60)),
))
def test_detect_never_crashes_and_returns_sorted_unique_in_range(values: list[float]) -> None:
    out = detect(values)
    assert out == sorted(set(out))
    assert all(isinstance(i, int) and 0 < i < len(values) for i in out)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(positive, st.sampled_from([True, False, None])), max_size=150))
def test_streaming_with_flags_never_crashes_and_round_trips(data: list[tuple[float, bool | None]]) -> None:
    det = StreamingDetector()
    for v, c in data:
        det.update(v, cached=c)
    again = StreamingDetector.from_bytes(det.to_bytes())
    assert again.to_bytes() == det.to_bytes()
    cps = find_changes([v for v, _ in data], cached=[bool(c) for _, c in data])
    assert all(0 <= c.index < len(data) and 0.0 <= c.confidence <= 1.0 for c in cps)
