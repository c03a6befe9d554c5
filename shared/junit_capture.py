"""``buildtel run --junit GLOB``: the JUnit XML reports a build wrote, sent with its session.

After the build command exits (before ``build_finished``, so the session is completed with
them), every file matching one of the globs (``**`` recursive, relative to the directory the
build ran in) that was modified after the build started is parsed (shared/junit.py) and its
cases are emitted as ``test_results`` events.  Telemetry never breaks a build: a file that is
unreadable, malformed or too large is named in one stderr line and counted, never raised, and
the build's exit code is untouched.

Each case is given the build target that ran it (``TestCase.target``) when the build's targets
say so (:class:`BuildTargets`, docs/tests.md#which-target-ran-a-test): the make target or ninja
edge whose output *is* the report file; else, per case, a target named exactly like the case's
suite (ctest names a test's suite after it, and tests are commonly named after their executable);
else none.  Nothing is guessed beyond these two exact matches.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from buildtel.shared.importers.common import maybe_gunzip

# File systems stamp mtimes from a coarse clock (a kernel tick, ~4 ms, behind time.time()):
# a report written in the build's first moments may carry a stamp slightly before its start.
MTIME_SLACK_S = 0.05


@dataclass
class Capture:
    """What ``--junit`` found: reports read, refused (path, reason), cases by outcome, and how
    many cases were given the target that ran them."""

    files: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"passed": 0, "failed": 0, "error": 0, "skipped": 0})
    attributed: int = 0

    def line(self) -> str:
        c = self.counts
        total = sum(c.values())
        text = (f"junit: {len(self.files)} report(s), {total} test(s): {c['passed']} passed, {c['failed']} failed, "
                f"{c['error']} error(s), {c['skipped']} skipped")
        if total:
            text += f"; {self.attributed} attributed to a build target"
        return text + (f"; {len(self.refused)} report(s) refused" if self.refused else "")


@dataclass
class BuildTargets:
    """The targets a build ran, as its capture named them: which one wrote a report, and which
    one a test is named after.

    ``outputs``: each target's name, and each other output of a ninja edge (-> its edge's
    target), as paths relative to one of ``dirs`` (make: where the build started; ninja: its
    build directory) or absolute."""

    outputs: dict[str, str] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set, init=False)  # the targets themselves

    def __post_init__(self) -> None:
        self.outputs = {os.path.normpath(k): v for k, v in self.outputs.items()}
        self.names = set(self.outputs.values())

    def writer(self, report: str) -> str:
        """The target whose output is the file ``report`` ("" when none is)."""
        real = os.path.realpath(report)
        found = self.outputs.get(real) or self.outputs.get(os.path.abspath(report))
        for d in self.dirs:
            if found:
                break
            found = self.outputs.get(os.path.relpath(real, d))
        return found or ""

    def attribute(self, cases: list[Any], report: str) -> tuple[list[Any], int]:
        """``cases`` with ``target`` set where known, and how many were given one."""
        import msgspec

        by_file = self.writer(report)
        out, n = [], 0
        for c in cases:
            target = by_file or (c.suite if c.suite in self.names else "")
            if target:
                c, n = msgspec.structs.replace(c, target=target), n + 1
            out.append(c)
        return out, n


def build_targets(sources: Sequence[Any], failed: Sequence[str] = (), cwd: str | None = None) -> BuildTargets:
    """The targets of ``buildtel run``'s capture sources (``shared/capture/live.py``: ``seen``,
    ``outputs``, ``target_dirs``) and ``failed`` (failed ninja edges, which only the console
    names: ``shared/capture/failures.py``)."""
    outputs: dict[str, str] = {}
    dirs = [os.path.realpath(cwd or os.getcwd())]
    for src in sources:
        for seen in getattr(src, "seen", ()):
            outputs.setdefault(seen.target, seen.target)
        for out, target in getattr(src, "outputs", {}).items():
            outputs.setdefault(out, target)
        dirs += [os.path.realpath(d) for d in getattr(src, "target_dirs", ())]
    for name in failed:
        outputs.setdefault(name, name)
    return BuildTargets(outputs=outputs, dirs=list(dict.fromkeys(dirs)))


def find_reports(patterns: Sequence[str], since: float, cwd: str | None = None) -> list[str]:
    """Files matching any pattern, modified at or after ``since`` (Unix s), sorted, each once."""
    root = cwd or os.getcwd()
    found: set[str] = set()
    for pattern in patterns:
        for path in glob.glob(pattern, root_dir=None if os.path.isabs(pattern) else root, recursive=True):
            full = path if os.path.isabs(path) else os.path.join(root, path)
            try:
                st = os.stat(full)
            except OSError:
                continue
            if st.st_mtime >= since - MTIME_SLACK_S and os.path.isfile(full):
                found.add(os.path.relpath(full, root) if not os.path.isabs(pattern) else full)
    return sorted(found)


def read_report(path: str) -> Any:
    """The parsed report of one file (raises :class:`JUnitError` or ``OSError``)."""
    from buildtel.shared.junit import MAX_FILE_BYTES, JUnitError, parse_junit

    if os.path.getsize(path) > MAX_FILE_BYTES:
        raise JUnitError(f"larger than the {MAX_FILE_BYTES}-byte limit of a test report")
    with open(path, "rb") as f:
        return parse_junit(maybe_gunzip(f.read()))


def send_reports(client: Any, patterns: Sequence[str], *, since: float, quiet: bool = False,
                 cwd: str | None = None, targets: BuildTargets | None = None) -> Capture:
    """Parse the build's reports and emit their cases on ``client`` (an SDK client; None: parse
    and report only), each with the target that ran it when ``targets`` tell.  Never raises."""
    cap = Capture()
    try:
        from buildtel.shared.importers.common import ImportFormatError

        total = 0
        for path in find_reports(patterns, since, cwd):
            full = os.path.join(cwd or os.getcwd(), path)
            try:
                report = read_report(full)
            except (ImportFormatError, OSError) as exc:
                reason = str(exc) if isinstance(exc, ImportFormatError) else (exc.strerror or str(exc))
                cap.refused.append((path, reason))
                print(f"buildtel: warning: junit: {path}: {reason}; its tests are not recorded", file=sys.stderr)
                continue
            from buildtel.shared.junit import MAX_CASES

            if total + len(report.cases) > MAX_CASES:
                cap.refused.append((path, f"more than {MAX_CASES} test cases in the build"))
                print(f"buildtel: warning: junit: {path}: the build's reports hold more than {MAX_CASES} test "
                      "cases; its tests are not recorded", file=sys.stderr)
                continue
            total += len(report.cases)
            cap.files.append(path)
            for k, v in report.counts().items():
                cap.counts[k] += v
            cases = report.cases
            if targets is not None:
                cases, n = targets.attribute(cases, full)
                cap.attributed += n
            if client is not None:
                client.test_results(cases, source=path)
        if not quiet and (cap.files or cap.refused):
            print(f"buildtel: {cap.line()}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - telemetry never breaks the build
        print(f"buildtel: warning: junit: reports not read ({type(exc).__name__}: {exc})", file=sys.stderr)
    return cap
