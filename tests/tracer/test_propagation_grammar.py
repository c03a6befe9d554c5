"""Property tests: the tracestate parser against the spec's ABNF, rule by rule.

Each rule of W3C Trace Context Level 2 §3.3.1 (key, value, list size,
duplicates) is written out here a second time as plain Python, without
regular expressions, and hypothesis checks the propagator agrees with it on
generated inputs clustered around the boundaries (first character, 256
characters, 32 members).
"""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from buildtel.services.tracer.propagation import (
    format_tracestate,
    is_valid_tracestate_key,
    is_valid_tracestate_value,
    parse_tracestate,
)

LCALPHA = string.ascii_lowercase
KEY_FIRST = LCALPHA + string.digits
KEYCHARS = KEY_FIRST + "_-*/@"
NBLK = "".join(chr(c) for c in [*range(0x21, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)])


def spec_key(key: str) -> bool:
    """key = ( lcalpha / DIGIT ) 0*255 ( keychar ), keychar adds _ - * / @."""
    return 1 <= len(key) <= 256 and key[0] in KEY_FIRST and all(c in KEYCHARS for c in key[1:])


def spec_level1_key(key: str) -> bool:
    """Level 1: simple-key / tenant-id "@" system-id, with bounded parts."""
    plain = KEY_FIRST + "_-*/"
    if "@" not in key:
        return 1 <= len(key) <= 256 and key[0] in LCALPHA and all(c in plain for c in key)
    tenant, _, system = key.partition("@")
    return (
        1 <= len(tenant) <= 241 and tenant[0] in KEY_FIRST and all(c in plain for c in tenant)
        and 1 <= len(system) <= 14 and system[0] in LCALPHA and all(c in plain for c in system)
    )


def spec_value(value: str) -> bool:
    """value = 0*255(chr) nblk-chr, chr = %x20 / nblk-chr."""
    return 1 <= len(value) <= 256 and value[-1] in NBLK and all(c == " " or c in NBLK for c in value)


# Text near the grammar: mostly key characters, some that are never allowed,
# lengths that straddle 256 (and the Level 1 part limits 241 and 14).
NEAR_KEY = st.one_of(
    st.text(alphabet=KEYCHARS + "A.= \t,", max_size=20),
    st.builds(lambda head, n, tail: head + "a" * n + tail,
              st.text(alphabet=KEYCHARS + "A", max_size=3), st.integers(235, 260),
              st.text(alphabet=KEYCHARS, max_size=20)),
)
VALID_KEY = st.builds(lambda first, rest: first + rest, st.sampled_from(KEY_FIRST),
                      st.text(alphabet=KEYCHARS, max_size=255))
VALID_VALUE = st.builds(lambda body, last: body + last,
                        st.text(alphabet=NBLK + " ", max_size=255), st.sampled_from(NBLK))


@given(NEAR_KEY)
def test_key_rule(key: str) -> None:
    assert is_valid_tracestate_key(key) == spec_key(key)
    assert is_valid_tracestate_key(key, "level1") == spec_level1_key(key)


@given(VALID_KEY)
def test_every_key_the_abnf_generates_is_accepted(key: str) -> None:
    assert is_valid_tracestate_key(key)


@given(st.one_of(st.text(alphabet=NBLK[:8] + " ,=\t\x7f\u00e9", max_size=12),
                 st.builds(lambda n, tail: "v" * n + tail, st.integers(250, 260), st.sampled_from(["", " ", "x"]))))
def test_value_rule(value: str) -> None:
    assert is_valid_tracestate_value(value) == spec_value(value)


@given(VALID_VALUE)
def test_every_value_the_abnf_generates_is_accepted(value: str) -> None:
    assert is_valid_tracestate_value(value)


@settings(max_examples=50)
@given(st.dictionaries(VALID_KEY, VALID_VALUE, max_size=40))
def test_list_round_trip_and_member_limit(entries: dict[str, str]) -> None:
    # A value's leading spaces are part of it and survive the round trip.
    parsed = parse_tracestate([format_tracestate(entries)])
    if len(entries) > 32:
        assert parsed is None  # at most 32 list-members, else the whole list goes
    else:
        assert parsed is not None and list(parsed.items()) == list(entries.items())


@given(st.lists(st.sampled_from(["a", "b", "c@d"]), min_size=2, max_size=6))
def test_duplicates_keep_first_or_drop_all(keys: list[str]) -> None:
    fields = [f"{key}={i}" for i, key in enumerate(keys)]
    first: dict[str, str] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, str(i))
    kept = parse_tracestate(fields)
    assert kept is not None and dict(kept) == first and list(kept) == list(first)
    dropped = parse_tracestate(fields, duplicate_keys="drop")
    assert (dropped is None) == (len(first) < len(keys))
