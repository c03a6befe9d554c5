"""The generated fast path of shared/validate.py agrees with the full walk on every event.

``check_event`` first asks a checker generated from the schema whether an event is all good, and
only walks it field by field (naming the bound) when it is not.  These tests hold the two to the
same verdict on events with a bad value in every field kind, and on random values.
"""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from buildtel.shared.protocol import (
    BuildEnvironment,
    BuildFinished,
    BuildStarted,
    HealthCheckpoint,
    Phase,
    TargetFinished,
    TargetStarted,
    VcsInfo,
)
from buildtel.shared.validate import MAX_ITEMS, MAX_STRING_CHARS, Rejected, _fast_ok, _walk, check_event

NOW = time.time()
SID = "a" * 32
LONG = "x" * (MAX_STRING_CHARS + 1)


def _slow_ok(ev: object) -> bool:
    """The verdict of the full walk (what check_event did before the fast path)."""
    try:
        _walk(ev, "event")
    except Rejected:
        return False
    ts_ok = 946_684_800.0 <= ev.ts <= NOW + 86_400  # type: ignore[attr-defined]
    if type(ev) is TargetFinished:
        ts_ok = ts_ok and 946_684_800.0 <= ev.start <= NOW + 86_400 and ev.start + ev.duration_s <= NOW + 86_400
    return ts_ok


def _tf(**kw: object) -> TargetFinished:
    base = dict(session_id=SID, agent_id="a", seq=1, ts=NOW, target="//t", start=NOW - 1, duration_s=1.0,
                deps=["//d"], phases=[Phase("cc", 0.5)], cpu_s=0.9, exit_code=0, peak_rss_bytes=1)
    base.update(kw)
    return TargetFinished(**base)  # type: ignore[arg-type]


def _started(**env: object) -> BuildStarted:
    return BuildStarted(session_id=SID, agent_id="a", seq=0, ts=NOW, command=["make"],
                        environment=BuildEnvironment(**{"vcs": VcsInfo(branch="main"), "env": {"A": "b"}, **env}))  # type: ignore[arg-type]


CASES = [
    _tf(), _tf(ts=math.nan), _tf(ts=-1.0), _tf(duration_s=math.inf), _tf(duration_s=-0.5), _tf(cpu_s=math.nan),
    _tf(cpu_s=None), _tf(exit_code=-9), _tf(seq=-1), _tf(peak_rss_bytes=-1), _tf(target=LONG),
    _tf(deps=[LONG]), _tf(deps=["d"] * (MAX_ITEMS + 1)), _tf(phases=[Phase("cc", -1.0)]),
    _tf(phases=[Phase(LONG, 1.0)]), _tf(start=NOW * 1000), _tf(start=1.0), _tf(duration_s=3 * 86_400.0),
    _tf(ts=NOW * 1000), _tf(worker=LONG), _tf(kind=LONG), _tf(mnemonic=LONG),
    _started(), _started(cpus=-1), _started(env={"A": LONG}), _started(env={LONG: "b"}),
    _started(tool_versions={str(i): "v" for i in range(MAX_ITEMS + 1)}), _started(vcs=VcsInfo(branch=LONG)),
    BuildStarted(session_id=SID, agent_id="a", seq=0, ts=NOW, command=[LONG]),
    BuildStarted(session_id=SID, agent_id="a", seq=0, ts=NOW, labels={"k": LONG}),
    TargetStarted(session_id=SID, agent_id="a", seq=2, ts=NOW, target="t"),
    TargetStarted(session_id=SID, agent_id="a", seq=2, ts=NOW, target=LONG),
    HealthCheckpoint(session_id=SID, agent_id="a", seq=3, ts=NOW, eta_s=math.inf),
    HealthCheckpoint(session_id=SID, agent_id="a", seq=3, ts=NOW, memory_percent=-1.0),
    HealthCheckpoint(session_id=SID, agent_id="a", seq=3, ts=NOW, reasons=[LONG]),
    BuildFinished(session_id=SID, agent_id="a", seq=4, ts=NOW, exit_code=-2, expected_events={"a": 5}),
    BuildFinished(session_id=SID, agent_id="a", seq=4, ts=NOW, expected_events={"a": -5}),
    BuildFinished(session_id=SID, agent_id="a", seq=4, ts=NOW, cpu_s=-1.0),
]


@pytest.mark.parametrize("ev", CASES, ids=range(len(CASES)))
def test_fast_path_agrees_with_the_full_walk(ev: object) -> None:
    assert _fast_ok(ev, NOW + 86_400) == _slow_ok(ev)  # type: ignore[arg-type]
    # and check_event still names the bound when there is one
    if not _slow_ok(ev):
        with pytest.raises(Rejected):
            check_event(ev, NOW)  # type: ignore[arg-type]
    else:
        check_event(ev, NOW)  # type: ignore[arg-type]


_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([NOW, 0.0, -0.0, NOW * 1000]))


@hsettings(max_examples=300, deadline=None)
@given(ts=_floats, start=_floats, dur=_floats, cpu=st.one_of(st.none(), _floats),
       code=st.one_of(st.none(), st.integers(-(2**31), 2**31)), rss=st.one_of(st.none(), st.integers(-5, 2**40)),
       names=st.lists(st.text(max_size=5), max_size=3))
def test_fast_path_agrees_on_random_values(ts: float, start: float, dur: float, cpu: float | None,
                                           code: int | None, rss: int | None, names: list[str]) -> None:
    ev = _tf(ts=ts, start=start, duration_s=dur, cpu_s=cpu, exit_code=code, peak_rss_bytes=rss, deps=names,
             phases=[Phase(n, dur) for n in names])
    assert _fast_ok(ev, NOW + 86_400) == _slow_ok(ev)
