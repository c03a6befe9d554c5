"""Which build target ran a test case (``TestCase.target``, docs/tests.md#which-target-ran-a-test):
the rule of ``junit_capture.BuildTargets`` on real files, and sessions stored before the field."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import msgspec

from buildtel.shared.capture.failures import Seen
from buildtel.shared.junit_capture import BuildTargets, build_targets, send_reports
from buildtel.shared.protocol import TestCase as Case

REPORT = b"""<testsuite name="s">
  <testcase classname="fails" name="fails" time="0.1"><failure message="no"/></testcase>
  <testcase classname="pkg.test_x" name="test_a" time="0.2"/>
</testsuite>"""


def _source(targets: list[str], outputs: dict[str, str] | None = None,
            dirs: tuple[Path, ...] = ()) -> SimpleNamespace:
    """What shared/capture/live.py's LiveSource holds once the build ended."""
    return SimpleNamespace(seen=[Seen(t, 0.0, 1.0, "success") for t in targets], outputs=outputs or {},
                           target_dirs=list(dirs))


def _cases(cap_targets: BuildTargets, report: Path) -> list[Case]:
    sent: list[Case] = []

    class Client:
        def test_results(self, cases: list[Case], source: str) -> None:
            sent.extend(cases)

    cap = send_reports(Client(), [str(report)], since=0.0, quiet=True, targets=cap_targets)
    assert cap.attributed == sum(1 for c in sent if c.target)
    return sent


def test_a_make_target_that_wrote_the_report_runs_all_its_cases(tmp_path: Path) -> None:
    (tmp_path / "build").mkdir()
    report = tmp_path / "build" / "report.xml"
    report.write_bytes(REPORT)
    # make names targets from where the build started ("./build/report.xml" is the same file)
    targets = build_targets([_source(["prep", "./build/report.xml"])], cwd=str(tmp_path))
    assert [c.target for c in _cases(targets, report)] == ["./build/report.xml"] * 2


def test_a_ninja_output_is_relative_to_its_build_directory_and_other_outputs_count(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "reports").mkdir(parents=True)
    first, second = out / "reports" / "a.xml", out / "reports" / "b.xml"
    first.write_bytes(REPORT)
    second.write_bytes(REPORT)
    src = _source(["reports/a.xml"], outputs={"reports/b.xml": "reports/a.xml"}, dirs=(out,))
    targets = build_targets([src], cwd=str(tmp_path))  # the build ran from tmp_path: `ninja -C out`
    assert {c.target for c in _cases(targets, first)} == {"reports/a.xml"}
    assert {c.target for c in _cases(targets, second)} == {"reports/a.xml"}  # the edge's second output
    # A failed ninja edge is not in .ninja_log: the console's FAILED: line names it (failed=...)
    failed = build_targets([_source([], dirs=(out,))], failed=["reports/a.xml"], cwd=str(tmp_path))
    assert {c.target for c in _cases(failed, first)} == {"reports/a.xml"}


def test_otherwise_a_target_named_like_the_suite_and_else_none(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"  # written by ctest, not by a target of the build
    report.write_bytes(REPORT)
    targets = build_targets([_source(["fails", "fails.o", "pkg"])], cwd=str(tmp_path))
    assert [(c.suite, c.target) for c in _cases(targets, report)] == [("fails", "fails"), ("pkg.test_x", "")]
    # No capture, no targets: nothing is guessed.
    assert [c.target for c in _cases(build_targets([], cwd=str(tmp_path)), report)] == ["", ""]


def test_a_symlinked_build_directory_still_matches(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "r.xml").write_bytes(REPORT)
    os.symlink(real, tmp_path / "link")
    targets = BuildTargets(outputs={"r.xml": "r.xml"}, dirs=[os.path.realpath(tmp_path / "link")])
    assert targets.writer(str(tmp_path / "link" / "r.xml")) == "r.xml"
    assert targets.writer(str(tmp_path / "elsewhere.xml")) == ""


def test_a_case_stored_before_the_field_decodes_without_a_target() -> None:
    old = msgspec.msgpack.encode(["pkg", "test_a", 0.5, "passed", ""])  # the 5-array of older sessions
    case = msgspec.msgpack.decode(old, type=Case)
    assert (case.suite, case.name, case.target) == ("pkg", "test_a", "")
    new = Case(suite="pkg", name="test_a", target="//pkg:test_a")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=Case) == new
