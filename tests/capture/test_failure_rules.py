"""The failure-class rules (shared/failclass.py, docs/failures.md "Failure classes"): the built-in
table on what real tools print, the farm's TOML rules (first, and their errors naming the rule and
the setting), and the one failure record of an older session (shared/failrecord.py)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from buildtel.shared import codec
from buildtel.shared.failclass import Evidence, classify, parse_rules
from buildtel.shared.failrecord import records, unify
from buildtel.shared.protocol import BuildSession, TargetFailure, TargetMetrics
from buildtel.shared.settings import Settings, SettingsError


@pytest.mark.parametrize(("text", "exit_code", "tool_code", "expected"), [
    ("bad.c:1:30: error: expected ';' before '}' token", 1, "", ("code", "compiler")),
    ("main.c:(.text+0x5): undefined reference to `missing_fn'\ncollect2: error: ld returned 1 exit status", 1, "",
     ("code", "linker")),
    ("E       AssertionError: assert 1 == 2", 1, "", ("code", "test-assertion")),
    ("--- FAIL: TestParse (0.00s)", 1, "", ("code", "test-assertion")),
    ("", 137, "", ("infra", "signal")),  # 128 + SIGKILL
    ("", -15, "", ("infra", "signal")),  # Python's subprocess: killed by SIGTERM
    ("make: *** [Makefile:11: killed.txt] Killed", 2, "", ("infra", "killed")),
    # an OOM kill of the compiler says "fatal error:" too: infra rules come first
    ("c++: fatal error: Killed signal terminated program cc1plus", 1, "", ("infra", "killed")),
    ("terminate called after throwing an instance of 'std::bad_alloc'", 134, "", ("infra", "out-of-memory")),
    ("/usr/bin/ld: final link failed: No space left on device", 1, "", ("infra", "no-space")),
    ("curl: (6) Could not resolve host: mirror.example.com", 6, "", ("infra", "network")),
    ("fatal: unable to access: Temporary failure in name resolution", 128, "", ("infra", "network")),
    ("", 124, "", ("infra", "timeout")),
    ("Executing genrule failed", None, "spawn.REMOTE_CACHE_FAILED", ("infra", "remote")),
    ("", None, "remote_execution.CAPABILITIES_QUERY_FAILURE", ("infra", "remote-execution")),
    ("Segmentation fault (core dumped)", 139, "", ("unknown", "")),  # the program's own fault
    ("Error: input is missing", 3, "", ("unknown", "")),
])
def test_builtin_rules(text: str, exit_code: int | None, tool_code: str, expected: tuple[str, str]) -> None:
    assert classify(Evidence(text=text, exit_code=exit_code, tool_code=tool_code)) == expected


def test_bazel_exit_codes_count_only_for_bazel_builds() -> None:
    ev = Evidence(text="Compiling x failed", exit_code=1, build_exit_code=34)
    assert classify(ev) == ("infra", "bazel-exit")
    bep = BuildSession(id="a" * 32, exit_code=34, labels={"importer": "bep"},
                       targets=[TargetMetrics(name="//x", start=0, end=0, duration_s=0, status="failed")])
    make = msgspec.structs.replace(bep, labels={})
    assert records(bep)[0].failure_class == "infra" and records(make)[0].failure_class == "unknown"


def test_farm_rules_come_first_and_all_their_conditions_hold(tmp_path: Path) -> None:
    rules = parse_rules('''
[[rule]]
name = "legacy toolchain"
class = "infra"
pattern = "expected ';'"
exit_code = [1]

[[rule]]
name = "segfaults are ours"
class = "code"
signal = 11
''', "farm.toml")
    assert classify(Evidence(text="bad.c:1:3: error: expected ';'", exit_code=1), rules) == (
        "infra", "farm:legacy toolchain")
    # the exit code does not hold: the built-in compiler rule
    assert classify(Evidence(text="bad.c:1:3: error: expected ';'", exit_code=2), rules) == ("code", "compiler")
    assert classify(Evidence(exit_code=139), rules) == ("code", "farm:segfaults are ours")


@pytest.mark.parametrize(("text", "says"), [
    ("[[rule]]\nclass = 'code'\n", "rule 1 (1): give at least one of"),
    ("[[rule]]\nname = 'x'\nclass = 'broken'\npattern = 'a'\n", "rule 1 (x): class must be one of"),
    ("[[rule]]\nname = 'x'\nclass = 'code'\npattern = '('\n", "rule 1 (x): bad pattern"),
    ("[[rule]]\nname = 'x'\nclass = 'code'\nexit_code = 'one'\n", "exit_code must be an integer"),
    ("[[rule]]\nname = 'x'\nclass = 'code'\nregex = 'a'\n", "unknown key(s) ['regex']"),
    ("[rules]\n", "unknown top-level key(s) ['rules']"),
    ("[[rule]\n", "not TOML"),
])
def test_a_bad_rules_file_names_the_rule(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=r"^f\.toml: ") as exc:
        parse_rules(text, "f.toml")
    assert says in str(exc.value)


def test_the_setting_names_its_key_when_the_file_cannot_be_used(tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text("[[rule]]\nclass = 'code'\n")
    for path in (bad, tmp_path / "missing.toml"):
        with pytest.raises(SettingsError, match=r"^BUILDER_TELEMETRY_FAILURE_RULES: cannot use"):
            Settings.from_env({"BUILDER_TELEMETRY_FAILURE_RULES": str(path)})
    bad.write_text("[[rule]]\nname = 'n'\nclass = 'flaky'\npattern = 'retry me'\n")
    s = Settings.from_env({"BUILDER_TELEMETRY_FAILURE_RULES": str(bad)})
    assert [r.name for r in s.failure_rule_table()] == ["farm:n"]


@given(st.text(max_size=300))
def test_any_rules_text_is_rules_or_a_value_error(text: str) -> None:
    try:
        parse_rules(text)
    except ValueError:
        pass


def test_an_older_session_decodes_and_gets_one_classified_record_per_failed_target() -> None:
    # As an older version stored them: an import's text in TargetMetrics.error, a run's record
    # without class, and a failed target with neither.
    old = BuildSession(id="b" * 32, outcome="failed", exit_code=2, targets=[
        TargetMetrics(name="imp.o", start=0, end=1, duration_s=1, status="failed", exit_code=1,
                      error="FAILED: imp.o\n/src/imp.c:3:1: error: unknown type name 'x'"),
        TargetMetrics(name="run.o", start=1, end=2, duration_s=1, status="failed", exit_code=137),
        TargetMetrics(name="bare", start=2, end=3, duration_s=1, status="failed"),
        TargetMetrics(name="ok", start=3, end=4, duration_s=1)],
        failures=[TargetFailure(target="run.o", output=["about to die"], errors=[], signature=None)])
    data = codec.encode(old)
    assert b"failure_class" not in data  # the bytes an older version wrote
    again = codec.decode_session(data)
    recs = {f.target: f for f in records(again)}
    assert list(recs) == ["imp.o", "run.o", "bare"]
    assert (recs["imp.o"].failure_class, recs["imp.o"].signature, recs["imp.o"].source) == (
        "code", "imp.c:N:N: error: unknown type name 'x'", "import")
    assert (recs["run.o"].failure_class, recs["run.o"].exit_code) == ("infra", 137)
    assert (recs["bare"].failure_class, recs["bare"].attributed) == ("unknown", False)
    # stored from now on: one home for the text, every record classified
    new = unify(again)
    assert all(m.error is None for m in new.targets) and [f.target for f in new.failures] == list(recs)
    assert all(f.failure_class for f in new.failures)


def test_an_echoed_message_is_not_the_failure() -> None:
    # make echoes a recipe's command line; a neighbour's echo can land in a failure's output
    echoed = 'echo writing; echo "cp: error writing: No space left on device" >&2; exit 1'
    assert classify(Evidence(text=echoed, exit_code=1)) == ("unknown", "")
    assert classify(Evidence(text=echoed + "\ncp: error writing: No space left on device", exit_code=1)) == (
        "infra", "no-space")
