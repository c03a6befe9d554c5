"""shared/junit.py on reports written by real pytest and ctest runs, on hostile and broken input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildtel.shared.junit import MAX_MESSAGE_CHARS, JUnitError, parse_junit
from buildtel.shared.protocol import TestCase as Case

PYTEST_SUITE = '''
import pytest

def test_ok():
    pass

def test_fails():
    assert 1 == 2, "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY and more " + "x" * 5000

@pytest.mark.skip(reason="not today")
def test_skipped():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_errors(broken):
    pass
'''


def _pytest_report(tmp_path: Path) -> bytes:
    (tmp_path / "test_sample.py").write_text(PYTEST_SUITE)
    out = tmp_path / "report.xml"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_sample.py",
                          f"--junitxml={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    return out.read_bytes()


def test_a_real_pytest_report(tmp_path: Path) -> None:
    report = parse_junit(_pytest_report(tmp_path))
    by_name = {c.name: c for c in report.cases}
    assert {n: c.outcome for n, c in by_name.items()} == {
        "test_ok": "passed", "test_fails": "failed", "test_skipped": "skipped", "test_errors": "error"}
    assert all(c.suite == "test_sample" for c in report.cases)
    fail = by_name["test_fails"].message
    assert "assert 1 == 2" in fail or "AssertionError" in fail
    assert "wJalrXUtnFEMI" not in fail and "[REDACTED]" in fail
    assert len(fail) <= MAX_MESSAGE_CHARS
    assert "fixture broke" in by_name["test_errors"].message
    assert by_name["test_skipped"].message.endswith("not today")
    assert report.timestamp is not None and report.suites == 1


CMAKE_PROJECT = '''
cmake_minimum_required(VERSION 3.16)
project(tiny NONE)
enable_testing()
add_test(NAME passes COMMAND "{py}" -c "pass")
add_test(NAME fails COMMAND "{py}" -c "raise SystemExit('broken: token=ghp_abcdefghijklmnopqrstuvwxyz0123456789')")
'''


def _cmake_bin(name: str) -> str | None:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    return found


def test_a_real_ctest_report(tmp_path: Path) -> None:
    assert _cmake_bin("ctest"), "ctest not found: it comes with the cmake test dependency (pip install -e '.[test]')"
    src, build = tmp_path / "src", tmp_path / "build"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(CMAKE_PROJECT.format(py=sys.executable))
    subprocess.run([_cmake_bin("cmake") or "cmake", "-S", str(src), "-B", str(build)], check=True,
                   capture_output=True, timeout=120)
    res = subprocess.run([_cmake_bin("ctest") or "ctest", "--output-junit", "junit.xml"], cwd=build,
                         capture_output=True, timeout=120, check=False)
    assert res.returncode != 0  # one test failed
    report = parse_junit((build / "junit.xml").read_bytes())
    outcomes = {c.name: c.outcome for c in report.cases}
    assert outcomes == {"passes": "passed", "fails": "failed"}
    [fail] = [c for c in report.cases if c.name == "fails"]
    assert "ghp_abcdef" not in fail.message


def test_nested_suites_classname_and_odd_times() -> None:
    xml = b'''<testsuites><testsuite name="outer"><testsuite name="inner">
      <testcase name="a" time="1,234.5"/><testcase name="b" time="nan"/><testcase name="c" time="-3"/>
    </testsuite><testcase classname="K" name="d" time="0.25"><failure>trace only</failure><error message="e"/>
    </testcase></testsuite></testsuites>'''
    cases = parse_junit(xml).cases
    assert cases == [Case(suite="inner", name="a", duration_s=1234.5), Case(suite="inner", name="b"),
                     Case(suite="inner", name="c"),
                     Case(suite="K", name="d", duration_s=0.25, outcome="failed", message="trace only")]


BOMB = b'''<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">]>
<testsuite name="&lol2;"><testcase name="x"/></testsuite>'''
EXTERNAL = b'''<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<testsuite><testcase name="&x;"/></testsuite>'''


@pytest.mark.parametrize("data", [BOMB, EXTERNAL, b'<!DOCTYPE testsuite><testsuite/>'])
def test_entities_and_doctypes_are_refused(data: bytes) -> None:
    with pytest.raises(JUnitError, match="DOCTYPE"):
        parse_junit(data)


@pytest.mark.parametrize(("data", "why"), [
    (b"", "no element found"),
    (b"<testsuite><testcase name='a'>", "no element found"),
    (b"<html><body/></html>", "root element <html>"),
    (b"<testsuite>&undefined;</testsuite>", "undefined entity"),
    (b"\x00\x01garbage", "not well-formed"),
])
def test_malformed_input_is_one_clear_error(data: bytes, why: str) -> None:
    with pytest.raises(JUnitError, match=why):
        parse_junit(data)


def test_bounds_on_cases_and_bytes() -> None:
    xml = b"<testsuite>" + b"<testcase name='t'/>" * 11 + b"</testsuite>"
    assert len(parse_junit(xml, max_cases=11).cases) == 11
    with pytest.raises(JUnitError, match="more than 10 test cases"):
        parse_junit(xml, max_cases=10)
    with pytest.raises(JUnitError, match="larger than the 100-byte limit"):
        parse_junit(xml, max_bytes=100)


def test_huge_system_out_costs_no_message_room() -> None:
    body = b"y" * 3_000_000
    xml = b"<testsuite><testcase name='t'><system-out>" + body + b"</system-out><failure message='m'>" + body + \
          b"</failure></testcase></testsuite>"
    [case] = parse_junit(xml).cases
    assert case.outcome == "failed" and len(case.message) <= MAX_MESSAGE_CHARS and case.message.startswith("m\n")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_junit_error(data: bytes) -> None:
    try:
        parse_junit(data)
    except JUnitError:
        pass


_names = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_names, _names, st.sampled_from(["", "failure", "error", "skipped"])), max_size=20))
def test_generated_reports_round_trip(cases: list[tuple[str, str, str]]) -> None:
    from xml.sax.saxutils import quoteattr

    parts = [f"<testcase classname={quoteattr(s)} name={quoteattr(n)}>" + (f"<{k}/>" if k else "") + "</testcase>"
             for s, n, k in cases]
    xml = ("<testsuite name='S'>" + "".join(parts) + "</testsuite>").encode()
    got = parse_junit(xml).cases
    outcome = {"": "passed", "failure": "failed", "error": "error", "skipped": "skipped"}
    assert [(c.suite, c.name, c.outcome) for c in got] == [
        ((s or "S")[:1000], n[:1000], outcome[k]) for s, n, k in cases]
