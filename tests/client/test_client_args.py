"""Emit methods never raise, whatever they are given, and what they accept always decodes."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from buildtel.shared.client import TelemetryClient
from buildtel.shared.codec import decode_batch
from buildtel.shared.protocol import (
    BuildFinished,
    BuildStarted,
    HealthCheckpoint,
    Phase,
    TargetFinished,
)
from buildtel.shared.redaction import REDACTED
from buildtel.shared.settings import Settings


class Weird:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq either")

    __hash__ = object.__hash__


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**80), st.floats(),
    st.text(), st.text(alphabet=st.characters(categories=["Cs", "Cc", "Lo"])), st.binary(max_size=20),
    st.just("success"), st.just("remote_hit"), st.just(Weird()), st.just(object()), st.just("x" * 10_000),
)
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=8)


def _client() -> TelemetryClient:
    return TelemetryClient(Settings(batch_size=7, nats_url="nats://127.0.0.1:1"))  # never started


def _accepted(client: TelemetryClient) -> list:
    client._cut(full_only=False)
    events = [ev for b in client._outbox for ev in decode_batch(b.data).events]  # the collector's decoder
    assert [e.seq for e in events] == list(range(client.events_emitted))
    return events


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.lists(anything, min_size=14, max_size=14))
def test_emit_methods_never_raise_and_accepted_events_decode(args) -> None:
    client = _client()
    a = args
    client.build_started(a[0], a[1], a[2], a[3], a[4], a[5])
    client.target_started(a[6], a[7])
    client.target_finished(a[0], start=a[1], duration_s=a[2], status=a[3], cache=a[4], worker=a[5],
                           exit_code=a[6], kind=a[7], mnemonic=a[8], cpu_s=a[9], peak_rss_bytes=a[10],
                           deps=a[11], phases=a[12])
    client.health(completed_tasks=a[0], memory_percent=a[1], eta_s=a[2], status=a[3], reasons=a[4], bogus=a[5])
    client.build_finished(a[0], a[1], a[2], a[13])
    events = _accepted(client)
    assert len(events) + client.dropped == 5
    for ev in events:
        for name in ("start", "duration_s", "cpu_s", "ts", "memory_percent", "eta_s"):
            value = getattr(ev, name, None)
            assert value is None or math.isfinite(value)


def test_unusual_but_meaningful_values_are_coerced_not_dropped() -> None:
    client = _client()
    client.target_finished(123, start=1, duration_s="2.5", status="failed", cache="local_hit", exit_code=True,
                           deps=("a", b"b", 3), phases=[("compile", 1), {"name": "link", "duration_s": "0.5"},
                                                        Phase("test", 2.0), "junk"])
    client.target_finished("\ud800bad", start=float("nan"), duration_s=float("inf"), worker="w" * 5000)
    client.health(completed_tasks="7", status="critical", reasons="disk full")
    client.build_started(command="make TOKEN=abc --password hunter2 -j8",
                         environment={"env": {"MY_API_TOKEN": "abc", "PATH": "/bin"}, "cpus": "4"})
    client.build_finished(exit_code="3", cpu_s=1, expected_events={"host:1": "5"})
    t1, t2, h, bs, bf = _accepted(client)
    assert isinstance(t1, TargetFinished) and t1.target == "123" and t1.start == 1.0 and t1.duration_s == 2.5
    assert (t1.status, t1.cache, t1.exit_code, t1.deps) == ("failed", "local_hit", 1, ["a", "b", "3"])
    assert t1.phases == [Phase("compile", 1.0), Phase("link", 0.5), Phase("test", 2.0)]
    assert t2.target == "?bad" and t2.start == 0.0 and t2.duration_s == 0.0 and len(t2.worker) == 4096
    assert isinstance(h, HealthCheckpoint)
    assert (h.completed_tasks, h.status, h.reasons) == (7, "critical", ["disk full"])
    assert isinstance(bs, BuildStarted) and bs.command == ["make", f"TOKEN={REDACTED}", "--password", REDACTED, "-j8"]
    assert bs.environment is not None and bs.environment.env["MY_API_TOKEN"] == REDACTED and bs.environment.cpus == 4
    assert isinstance(bf, BuildFinished) and bf.exit_code == 3 and bf.cpu_s == 1.0
    assert bf.expected_events == {"host_1": 5}
    assert client.dropped == 0


def test_an_event_too_large_for_a_batch_is_shrunk_keeping_its_seq() -> None:
    client = _client()
    client.target_finished("big", start=1.0, duration_s=1.0, deps=[f"{i:04d}" + "d" * 4000 for i in range(1500)])
    client.target_finished("next", start=1.0, duration_s=1.0)
    big, nxt = _accepted(client)
    assert big.target == "big" and big.deps == [] and nxt.seq == 1
