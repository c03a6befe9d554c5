"""Unit tests of the W3C Trace Context Level 2 propagator and its helpers.

The traceparent/tracestate tables follow the spec's text and the cases of the
official conformance suite, so a regression shows here before the suite runs.
"""

from __future__ import annotations

import email.message
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, MultiDict
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from buildtel.services.tracer.propagation import (
    DEFAULT_PROPAGATOR,
    Traceparent,
    W3CTraceContextPropagator,
    extract_env,
    extract_headers,
    format_traceparent,
    inject_env,
    inject_headers,
    is_valid_tracestate_key,
    parse_traceparent,
    parse_tracestate,
)

TID = "12345678901234567890123456789012"
PID = "1234567890123456"
VALID = f"00-{TID}-{PID}-01"
REPO_ROOT = Path(__file__).resolve().parents[2]


def remote(context: Context) -> SpanContext:
    return trace.get_current_span(context).get_span_context()


@pytest.fixture
def tracer() -> trace.Tracer:
    # A private SDK provider: real span ids without touching the global provider.
    return TracerProvider(shutdown_on_exit=False).get_tracer("tests.tracer")


VALID_TRACEPARENTS = [
    (VALID, Traceparent(0, int(TID, 16), int(PID, 16), 1)),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
     Traceparent(0, 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 0)),
    (f"00-{TID}-{PID}-02", Traceparent(0, int(TID, 16), int(PID, 16), 2)),  # random flag
    (f"00-{TID}-{PID}-ff", Traceparent(0, int(TID, 16), int(PID, 16), 0xFF)),  # unknown flags parse
    (f" \t00-{TID}-{PID}-01 \t", Traceparent(0, int(TID, 16), int(PID, 16), 1)),  # OWS
    (f"cc-{TID}-{PID}-01", Traceparent(0xCC, int(TID, 16), int(PID, 16), 1)),
    (f"cc-{TID}-{PID}-01-what-the-future-will-be-like", Traceparent(0xCC, int(TID, 16), int(PID, 16), 1)),
    (f"01-{TID}-{PID}-03-", Traceparent(1, int(TID, 16), int(PID, 16), 3)),
]

INVALID_TRACEPARENTS = [
    pytest.param("", id="empty"),
    pytest.param(f"00-{TID}-{PID}-01.", id="v00-trailing-char"),
    pytest.param(f"00-{TID}-{PID}-01-what-the-future-will-be-like", id="v00-extra-fields"),
    pytest.param(f"cc-{TID}-{PID}-01.what-the-future-will-be-like", id="future-no-dash"),
    pytest.param(f"ff-{TID}-{PID}-01", id="version-ff"),
    pytest.param(f".0-{TID}-{PID}-01", id="version-illegal-1"),
    pytest.param(f"0.-{TID}-{PID}-01", id="version-illegal-2"),
    pytest.param(f"000-{TID}-{PID}-01", id="version-too-long"),
    pytest.param(f"0000-{TID}-{PID}-01", id="version-too-long-2"),
    pytest.param(f"0-{TID}-{PID}-01", id="version-too-short"),
    pytest.param(f"CC-{TID}-{PID}-01", id="version-uppercase"),
    pytest.param(f"00-{'0' * 32}-{PID}-01", id="trace-id-zero"),
    pytest.param(f"00-.{TID[1:]}-{PID}-01", id="trace-id-illegal-1"),
    pytest.param(f"00-{TID[:-1]}.-{PID}-01", id="trace-id-illegal-2"),
    pytest.param(f"00-{TID}3-{PID}-01", id="trace-id-too-long"),
    pytest.param(f"00-{TID[:-1]}-{PID}-01", id="trace-id-too-short"),
    pytest.param(f"00-4BF92F3577B34DA6A3CE929D0E0E4736-{PID}-01", id="trace-id-uppercase"),
    pytest.param(f"00-{TID}-{'0' * 16}-01", id="parent-id-zero"),
    pytest.param(f"00-{TID}-.{PID[1:]}-01", id="parent-id-illegal-1"),
    pytest.param(f"00-{TID}-{PID[:-1]}.-01", id="parent-id-illegal-2"),
    pytest.param(f"00-{TID}-{PID}7-01", id="parent-id-too-long"),
    pytest.param(f"00-{TID}-{PID[:-1]}-01", id="parent-id-too-short"),
    pytest.param(f"00-{TID}-00F067AA0BA902B7-01", id="parent-id-uppercase"),
    pytest.param(f"00-{TID}-{PID}-.0", id="flags-illegal-1"),
    pytest.param(f"00-{TID}-{PID}-0.", id="flags-illegal-2"),
    pytest.param(f"00-{TID}-{PID}-001", id="flags-too-long"),
    pytest.param(f"00-{TID}-{PID}-1", id="flags-too-short"),
    pytest.param(f"00-{TID}-{PID}-0A", id="flags-uppercase"),
    pytest.param(f"cc-{TID}-{PID}-1", id="future-too-short"),
    pytest.param(f"00_{TID}_{PID}_01", id="wrong-delimiter"),
    pytest.param(f"00-{TID}-{PID}-01, 00-{TID}-{PID}-01", id="comma-combined-repeat"),
]


@pytest.mark.parametrize(("value", "expected"), VALID_TRACEPARENTS)
def test_valid_traceparent(value: str, expected: Traceparent) -> None:
    assert parse_traceparent(value) == expected
    context = extract_headers({"traceparent": value})
    span_context = remote(context)
    assert span_context.is_valid and span_context.is_remote
    assert span_context.trace_id == expected.trace_id
    assert span_context.span_id == expected.parent_id


@pytest.mark.parametrize("value", INVALID_TRACEPARENTS)
def test_invalid_traceparent_restarts_trace(value: str) -> None:
    assert parse_traceparent(value) is None
    context = extract_headers({"traceparent": value, "tracestate": "foo=1"})
    assert not remote(context).is_valid


def test_header_name_is_case_insensitive_and_exact() -> None:
    for name in ("TraceParent", "TrAcEpArEnT", "TRACEPARENT"):
        assert remote(extract_headers({name: VALID})).trace_id == int(TID, 16)
    for name in ("trace-parent", "trace.parent"):
        assert not remote(extract_headers({name: VALID})).is_valid


@pytest.mark.parametrize(
    "carrier",
    [
        pytest.param({"traceparent": [VALID, VALID]}, id="dict-list"),
        pytest.param({"traceparent": VALID, "TraceParent": VALID}, id="dict-case-variants"),
        pytest.param(CIMultiDict([("traceparent", VALID), ("TRACEPARENT", VALID)]), id="cimultidict"),
        pytest.param(MultiDict([("traceparent", VALID), ("traceparent", VALID)]), id="multidict"),
        pytest.param([("traceparent", VALID), ("traceparent", VALID)], id="pairs"),
        pytest.param([(b"traceparent", VALID.encode()), (b"traceparent", VALID.encode())], id="raw-asgi"),
    ],
)
def test_repeated_traceparent_is_invalid(carrier: object) -> None:
    assert not remote(extract_headers(carrier)).is_valid


def test_email_message_carrier_sees_repeated_fields() -> None:
    message = email.message.Message()
    message["traceparent"] = VALID
    assert remote(extract_headers(message)).is_valid
    message["Traceparent"] = VALID
    assert not remote(extract_headers(message)).is_valid


def test_none_carrier_and_default_context() -> None:
    context = extract_headers(None)
    assert context == Context()
    given = Context({"k": "v"})
    assert extract_headers({}, given) is given


def test_extract_through_otel_default_getter_argument() -> None:
    # opentelemetry.propagate.extract passes default_getter explicitly.
    context = DEFAULT_PROPAGATOR.extract({"TraceParent": VALID})
    assert remote(context).trace_id == int(TID, 16)
    # A caller's own getter is honoured as-is (this one is case-sensitive).
    assert not remote(DEFAULT_PROPAGATOR.extract({"TraceParent": VALID}, getter=DefaultGetter())).is_valid


MEMBERS_32 = [f"bar{i:02d}={i:02d}" for i in range(1, 33)]
ALL_KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
ALL_VALUE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in ",=")

TRACESTATES = [
    # (fields, expected entries or None when the whole tracestate is dropped)
    pytest.param(["foo=1,bar=2"], [("foo", "1"), ("bar", "2")], id="simple"),
    pytest.param(["foo=1,bar=2", "rojo=1,congo=2", "baz=3"],
                 [("foo", "1"), ("bar", "2"), ("rojo", "1"), ("congo", "2"), ("baz", "3")], id="combined-in-order"),
    pytest.param([""], [], id="empty-field"),
    pytest.param(["foo=1", ""], [("foo", "1")], id="empty-second-field"),
    pytest.param(["", "foo=1"], [("foo", "1")], id="empty-first-field"),
    pytest.param([" , ,\t,foo=1,, "], [("foo", "1")], id="empty-members"),
    pytest.param(["foo=1 \t , \t bar=2, \t baz=3"], [("foo", "1"), ("bar", "2"), ("baz", "3")], id="ows"),
    pytest.param(["\t foo=1 \t"], [("foo", "1")], id="leading-trailing-ows"),
    pytest.param(["foo= bar"], [("foo", " bar")], id="leading-space-is-value"),
    pytest.param([f"{ALL_KEY_CHARS}={ALL_VALUE_CHARS}"], [(ALL_KEY_CHARS, ALL_VALUE_CHARS)], id="all-chars"),
    pytest.param([f"{ALL_KEY_CHARS}@a-z0-9_-*/=1"], [(f"{ALL_KEY_CHARS}@a-z0-9_-*/", "1")], id="all-chars-tenant"),
    pytest.param(["9tenant@sys=1"], [("9tenant@sys", "1")], id="l2-tenant-starts-with-digit"),
    pytest.param(["9foo=1"], [("9foo", "1")], id="key-starts-with-digit"),
    pytest.param(["9=1,a=2"], [("9", "1"), ("a", "2")], id="one-character-keys"),
    pytest.param(["z" * 256 + "=1"], [("z" * 256, "1")], id="simple-key-256"),
    pytest.param(["foo=1", "z" * 257 + "=1"], None, id="simple-key-257"),
    pytest.param(["t" * 241 + "@" + "v" * 14 + "=1"], [("t" * 241 + "@" + "v" * 14, "1")], id="tenant-241-system-14"),
    # Level 2 bounds only the whole key (256), not its parts around "@".
    pytest.param(["foo=1", "t" * 242 + "@v=1"], [("foo", "1"), ("t" * 242 + "@v", "1")], id="tenant-242"),
    pytest.param(["foo=1", "t@" + "v" * 15 + "=1"], [("foo", "1"), ("t@" + "v" * 15, "1")], id="system-15"),
    pytest.param(["t@9v=1"], [("t@9v", "1")], id="system-starts-with-digit"),
    pytest.param(["t" * 250 + "@" + "v" * 5 + "=1"], [("t" * 250 + "@" + "v" * 5, "1")], id="at-key-256"),
    pytest.param(["foo=1", "t" * 250 + "@" + "v" * 6 + "=1"], None, id="at-key-257"),
    pytest.param(["foo =1"], None, id="space-in-key"),
    pytest.param(["FOO=1"], None, id="uppercase-key"),
    pytest.param(["fOo=1"], None, id="uppercase-inside-key"),
    pytest.param(["foo.bar=1"], None, id="dot-in-key"),
    pytest.param(["=1"], None, id="empty-key"),
    pytest.param(["_foo=1"], None, id="key-starts-with-underscore"),
    pytest.param(["-foo=1"], None, id="key-starts-with-dash"),
    pytest.param(["*foo=1"], None, id="key-starts-with-star"),
    pytest.param(["/foo=1"], None, id="key-starts-with-slash"),
    pytest.param(["foo@=1,bar=2"], [("foo@", "1"), ("bar", "2")], id="trailing-at"),
    pytest.param(["@foo=1,bar=2"], None, id="leading-at"),
    pytest.param(["foo@@bar=1,bar=2"], [("foo@@bar", "1"), ("bar", "2")], id="double-at"),
    pytest.param(["foo@bar@baz=1,bar=2"], [("foo@bar@baz", "1"), ("bar", "2")], id="two-ats"),
    pytest.param(["foo=bar=baz"], None, id="equals-in-value"),
    pytest.param(["foo=,bar=3"], None, id="empty-value"),
    pytest.param(["foo=a\tb"], None, id="tab-in-value"),
    pytest.param(["foo=\u00e9"], None, id="non-ascii-value"),
    pytest.param(["foo"], None, id="no-equals"),
    pytest.param(["foo=" + "v" * 256], [("foo", "v" * 256)], id="value-256"),
    pytest.param(["foo=" + "v" * 257], None, id="value-257"),
    pytest.param([",".join(MEMBERS_32[:10]), ",".join(MEMBERS_32[10:])],
                 [tuple(m.split("=")) for m in MEMBERS_32], id="32-members"),
    pytest.param([",".join(MEMBERS_32) + ", ,,"], [tuple(m.split("=")) for m in MEMBERS_32], id="32-plus-empties"),
    pytest.param([",".join(MEMBERS_32), "bar33=33"], None, id="33-members"),
    pytest.param(["foo=1,foo=2"], [("foo", "1")], id="duplicate-keeps-first"),
    pytest.param(["foo=1", "foo=2"], [("foo", "1")], id="duplicate-across-fields"),
]


@pytest.mark.parametrize(("fields", "expected"), TRACESTATES)
def test_tracestate(fields: list[str], expected: list[tuple[str, str]] | None) -> None:
    parsed = parse_tracestate(fields)
    assert (None if parsed is None else list(parsed.items())) == expected
    headers = CIMultiDict([("traceparent", VALID)] + [("tracestate", f) for f in fields])
    span_context = remote(extract_headers(headers))
    # An invalid tracestate never costs the valid traceparent.
    assert span_context.trace_id == int(TID, 16)
    assert list(span_context.trace_state.items()) == (expected or [])


@pytest.mark.parametrize("fields", [["foo=1,foo=1"], ["foo=1,foo=2"], ["foo=1", "foo=2"]])
def test_duplicate_keys_drop_mode(fields: list[str]) -> None:
    assert parse_tracestate(fields, duplicate_keys="drop") is None
    propagator = W3CTraceContextPropagator(duplicate_keys="drop")
    headers = {"traceparent": VALID, "tracestate": fields}
    span_context = remote(extract_headers(headers, propagator=propagator))
    assert span_context.is_valid and len(span_context.trace_state) == 0


# Keys only Level 2 allows: Level 1 bounds tenant (241) and system (14) ids,
# allows one "@" with both sides present, and starts a simple key with a letter.
LEVEL2_ONLY_KEYS = ["9foo", "foo@", "foo@@bar", "foo@bar@baz", "t" * 242 + "@v", "t@" + "v" * 15, "t@9v"]


@pytest.mark.parametrize("key", LEVEL2_ONLY_KEYS)
def test_level1_key_grammar_is_opt_in(key: str) -> None:
    assert is_valid_tracestate_key(key) and not is_valid_tracestate_key(key, "level1")
    fields = ["foo=1", f"{key}=1"]
    assert parse_tracestate(fields, key_grammar="level1") is None
    propagator = W3CTraceContextPropagator(key_grammar="level1")
    span_context = remote(extract_headers({"traceparent": VALID, "tracestate": fields}, propagator=propagator))
    assert span_context.is_valid and len(span_context.trace_state) == 0
    # Keys valid under both grammars are kept either way.
    both = ["foo=1", "t" * 241 + "@" + "v" * 14 + "=2"]
    assert len(parse_tracestate(both, key_grammar="level1") or {}) == 2


def test_unknown_key_grammar_is_refused() -> None:
    with pytest.raises(ValueError, match="key_grammar"):
        W3CTraceContextPropagator(key_grammar="level3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key grammar"):
        is_valid_tracestate_key("foo", "level3")  # type: ignore[arg-type]


def test_level2_keys_survive_a_hop_through_an_sdk_span(tracer: trace.Tracer) -> None:
    # OpenTelemetry's own TraceState would drop "foo@" (Level 1 grammar) with a log line.
    tracestate = "foo@=1,t@" + "v" * 15 + "=2,bar=3"
    parent = extract_headers({"traceparent": VALID, "tracestate": tracestate})
    with tracer.start_as_current_span("s", context=parent):
        assert inject_headers()["tracestate"] == tracestate


def test_tracestate_ignored_without_valid_traceparent() -> None:
    assert not remote(extract_headers({"tracestate": "foo=1"})).is_valid


def test_inject_writes_version_00_and_known_flags_only(tracer: trace.Tracer) -> None:
    parent = extract_headers({"traceparent": f"cc-{TID}-{PID}-ff-future", "tracestate": "foo=1,bar=2"})
    with tracer.start_as_current_span("child", context=parent) as span:
        headers = inject_headers()
    own = span.get_span_context()
    assert headers == {
        "traceparent": f"00-{TID}-{own.span_id:016x}-03",
        "tracestate": "foo=1,bar=2",
    }
    assert own.span_id != int(PID, 16)


def test_inject_without_span_writes_nothing_and_clears_stale_fields() -> None:
    headers = {"TraceParent": VALID, "TRACESTATE": "foo=1", "x": "y"}
    assert inject_headers(headers, Context()) == {"x": "y"}


def test_inject_replaces_case_variants_in_multidict(tracer: trace.Tracer) -> None:
    headers = CIMultiDict([("TraceParent", VALID), ("traceparent", VALID), ("TraceState", "a=1")])
    with tracer.start_as_current_span("s"):
        inject_headers(headers)
    assert len(headers.getall("traceparent")) == 1
    assert "tracestate" not in headers


def test_pass_through_keeps_traceparent_and_tracestate_unchanged() -> None:
    propagator = W3CTraceContextPropagator(vendor_key="buildtel")
    incoming = {"traceparent": VALID, "tracestate": "foo=1"}
    out = inject_headers({}, extract_headers(incoming, propagator=propagator), propagator=propagator)
    # No new span means traceparent is unchanged, and then tracestate must not change either.
    assert out == incoming


def test_vendor_key_is_moved_to_the_front(tracer: trace.Tracer) -> None:
    propagator = W3CTraceContextPropagator(vendor_key="buildtel")
    parent = extract_headers({"traceparent": VALID, "tracestate": "foo=1,buildtel=old,bar=2"})
    with tracer.start_as_current_span("s", context=parent) as span:
        headers = inject_headers(propagator=propagator)
    assert headers["tracestate"] == f"buildtel={span.get_span_context().span_id:016x},foo=1,bar=2"


def test_vendor_key_truncates_to_32_members(tracer: trace.Tracer) -> None:
    long_member = "long=" + "x" * 200
    fields = [",".join(MEMBERS_32[:20]), long_member, ",".join(MEMBERS_32[20:31])]
    parent = extract_headers({"traceparent": VALID, "tracestate": fields})
    assert len(remote(parent).trace_state) == 32
    propagator = W3CTraceContextPropagator(vendor_key="t1@buildtel", vendor_value=lambda sc: "v")
    with tracer.start_as_current_span("s", context=parent):
        first = inject_headers(propagator=propagator)["tracestate"].split(",")
    # Entries over 128 characters go first, so the 31 short members survive.
    assert first == ["t1@buildtel=v", *MEMBERS_32[:31]]
    parent = extract_headers({"traceparent": VALID, "tracestate": ",".join(MEMBERS_32)})
    with tracer.start_as_current_span("s", context=parent):
        second = inject_headers(propagator=propagator)["tracestate"].split(",")
    assert second == ["t1@buildtel=v", *MEMBERS_32[:31]]  # then from the end


def test_invalid_vendor_settings() -> None:
    with pytest.raises(ValueError):
        W3CTraceContextPropagator(vendor_key="Bad Key")
    with pytest.raises(ValueError):
        W3CTraceContextPropagator(duplicate_keys="merge")  # type: ignore[arg-type]
    propagator = W3CTraceContextPropagator(vendor_key="buildtel", vendor_value=lambda sc: "a,b")
    span = NonRecordingSpan(SpanContext(1, 2, is_remote=False, trace_state=TraceState([("foo", "1")])))
    out = inject_headers({}, trace.set_span_in_context(span), propagator=propagator)
    assert out["tracestate"] == "foo=1"  # an invalid own value is not written


def test_random_flag_survives_a_hop(tracer: trace.Tracer) -> None:
    parent = extract_headers({"traceparent": f"00-{TID}-{PID}-02"})
    with tracer.start_as_current_span("s", context=parent):
        assert inject_headers()["traceparent"].endswith("-02")
    with tracer.start_as_current_span("root", context=Context()):
        # The SDK's random id generator makes new traces carry the random flag.
        assert int(inject_headers()["traceparent"][-2:], 16) & TraceFlags.RANDOM_TRACE_ID


def test_format_traceparent_masks_unknown_flags() -> None:
    span_context = SpanContext(int(TID, 16), int(PID, 16), is_remote=True, trace_flags=TraceFlags(0xFF))
    assert format_traceparent(span_context) == f"00-{TID}-{PID}-03"


def test_env_round_trip(tracer: trace.Tracer) -> None:
    parent = extract_headers({"traceparent": VALID, "tracestate": "foo=1"})
    with tracer.start_as_current_span("s", context=parent) as span:
        env = inject_env({"PATH": "/bin", "TRACEPARENT": "stale", "TRACESTATE": "stale=1"})
    assert env["PATH"] == "/bin"
    assert env["TRACEPARENT"].startswith(f"00-{TID}-")
    assert env["TRACESTATE"] == "foo=1"
    child = remote(extract_env(env))
    assert (child.trace_id, child.span_id) == (int(TID, 16), span.get_span_context().span_id)
    assert dict(child.trace_state) == {"foo": "1"}
    # Without a span the child must not inherit the grandparent's context.
    assert inject_env({"TRACEPARENT": VALID, "TRACESTATE": "a=1"}, Context()) == {}
    assert not remote(extract_env({"traceparent": VALID})).is_valid  # env names are upper-case


def test_env_reaches_a_child_process(tracer: trace.Tracer) -> None:
    script = (
        "import json; from opentelemetry import trace;"
        "from buildtel.services.tracer.propagation import extract_env;"
        "sc = trace.get_current_span(extract_env()).get_span_context();"
        "print(json.dumps([sc.trace_id, sc.span_id, dict(sc.trace_state)]))"
    )
    parent = extract_headers({"traceparent": VALID, "tracestate": "foo=1"})
    with tracer.start_as_current_span("s", context=parent) as span:
        env = inject_env()
    env["PYTHONPATH"] = str(REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    assert json.loads(out.stdout) == [int(TID, 16), span.get_span_context().span_id, {"foo": "1"}]


def test_propagator_fields() -> None:
    assert DEFAULT_PROPAGATOR.fields == {"traceparent", "tracestate"}


async def test_nats_header_round_trip(nc: Any, namespace: str, tracer: trace.Tracer) -> None:
    subject = f"{namespace}.tracer.round-trip"
    sub = await nc.subscribe(subject)
    parent = extract_headers({"traceparent": VALID, "tracestate": "foo=1,t1@buildtel=x"})
    with tracer.start_as_current_span("publish", context=parent) as span:
        await nc.publish(subject, b"{}", headers=inject_headers({"other": "kept"}))
    msg = await sub.next_msg(timeout=5)
    assert msg.headers is not None and msg.headers["other"] == "kept"
    received = remote(extract_headers(msg.headers))
    assert received.is_remote
    assert (received.trace_id, received.span_id) == (int(TID, 16), span.get_span_context().span_id)
    assert list(received.trace_state.items()) == [("foo", "1"), ("t1@buildtel", "x")]
    assert not remote(extract_headers(None)).is_valid  # a NATS message without headers
