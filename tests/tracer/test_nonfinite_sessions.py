"""Sessions that older versions stored with NaN/inf/negative/out-of-range numbers are read with those
values as missing: they become traces and flame graphs, never a crash (or a message retried forever)."""

from __future__ import annotations

import math

import msgspec
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from buildtel.services.tracer.sessions import session_spans
from buildtel.shared.flamegraph.sessions import flame_stacks, folded_text, readable
from buildtel.shared.protocol import BuildSession, Phase, TargetMetrics, new_session_id

INT64 = 2**63 - 1


def _session(values: list[float]) -> BuildSession:
    """Three good targets plus one per value, the value placed in start, duration, cpu and a phase."""
    start = 1_700_000_000.0
    good = [TargetMetrics(name=f"//ok:{i}", start=start + i, end=start + i + 1.0, duration_s=1.0,
                          phases=[Phase("compile", 0.5)]) for i in range(3)]
    odd = [TargetMetrics(name=f"//odd:{i}", start=v if i % 2 else start, end=start + 2.0,
                         duration_s=1.0 if i % 2 else v, cpu_s=v, phases=[Phase("link", v)])
           for i, v in enumerate(values)]
    return BuildSession(id=new_session_id(), name="old", start=start, finish=start + 10.0, duration_s=10.0,
                        targets=good + odd, cpu_s=values[0] if values else None)


def _roundtrip(session: BuildSession) -> BuildSession:
    # As read back from a store: the bytes an older collector wrote.
    return msgspec.msgpack.decode(msgspec.msgpack.encode(session), type=BuildSession)


def test_nan_inf_and_millisecond_times_are_left_out_of_the_trace() -> None:
    session = _roundtrip(_session([math.nan, math.inf, -3.0, 1_700_000_000_000.0]))
    spans = session_spans(session)
    names = {s.name for s in spans}
    assert {"//ok:0", "//ok:1", "//ok:2"} <= names
    assert "//odd:0" not in names and "//odd:2" not in names  # NaN / negative duration: no time to place it
    assert "//odd:3" not in names  # start in "year 58901"
    assert all(0 <= s.start_ns <= s.end_ns <= INT64 for s in spans)
    assert all(math.isfinite(v) for s in spans for v in s.attributes.values() if isinstance(v, float))


def test_a_flame_graph_of_old_sessions_leaves_the_bad_values_out() -> None:
    session = _roundtrip(_session([math.nan, -math.inf, -1.0]))
    _cleaned, missing = readable([session])
    assert missing > 0
    text = folded_text(flame_stacks([session]))
    assert "ok" in text and "odd" not in text  # each odd target has a NaN, infinite or negative time
    assert all(int(line.rsplit(" ", 1)[1]) >= 0 for line in text.splitlines())


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=6))
def test_any_stored_numbers_become_a_valid_trace_and_flame_graph(values: list[float]) -> None:
    session = _roundtrip(_session(values))
    spans = session_spans(session)
    assert len(spans) >= 4 and all(0 <= s.start_ns <= s.end_ns <= INT64 for s in spans)
    text = folded_text(flame_stacks([session]))
    assert all(int(line.rsplit(" ", 1)[1]) >= 0 for line in text.splitlines())
