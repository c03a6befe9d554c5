"""``buildtel run --junit GLOB``: the JUnit XML reports a build wrote, sent with its session.

After the build command exits (before ``build_finished``, so the session is completed with
them), every file matching one of the globs (``**`` recursive, relative to the directory the
build ran in) that was modified after the build started is parsed (shared/junit.py) and its
cases are emitted as ``test_results`` events.  Telemetry never breaks a build: a file that is
unreadable, malformed or too large is named in one stderr line and counted, never raised, and
the build's exit code is untouched.
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
    """What ``--junit`` found: reports read, refused (path, reason), cases by outcome."""

    files: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"passed": 0, "failed": 0, "error": 0, "skipped": 0})

    def line(self) -> str:
        c = self.counts
        total = sum(c.values())
        text = (f"junit: {len(self.files)} report(s), {total} test(s): {c['passed']} passed, {c['failed']} failed, "
                f"{c['error']} error(s), {c['skipped']} skipped")
        return text + (f"; {len(self.refused)} report(s) refused" if self.refused else "")


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
                 cwd: str | None = None) -> Capture:
    """Parse the build's reports and emit their cases on ``client`` (an SDK client; None: parse
    and report only).  Never raises."""
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
            if client is not None:
                client.test_results(report.cases, source=path)
        if not quiet and (cap.files or cap.refused):
            print(f"buildtel: {cap.line()}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - telemetry never breaks the build
        print(f"buildtel: warning: junit: reports not read ({type(exc).__name__}: {exc})", file=sys.stderr)
    return cap
