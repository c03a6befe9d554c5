"""``buildtel import junit``: JUnit XML reports -> one :class:`BuildSession` holding their tests.

Each file is parsed on its own (:func:`parse_junit_file`, shared/junit.py does the XML); the
files of one import then become one session (:func:`junit_session`), since one test run
often writes several reports (Gradle and Maven: one per class).  The session has no targets,
only ``tests``; its outcome is ``failed`` when a case failed or errored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from buildtel.shared.importers.common import ImportResult, content_id, encodable, maybe_gunzip
from buildtel.shared.junit import MAX_CASES, JUnitError, JUnitReport, parse_junit
from buildtel.shared.protocol import BuildEnvironment, BuildSession, SessionTotals, TestCase, VcsInfo


@dataclass
class JUnitImport(ImportResult):
    """One file's :class:`JUnitReport` besides the usual result (its session comes later)."""

    report: JUnitReport = field(default_factory=JUnitReport)
    mtime: float = 0.0
    digest: str = ""


def parse_junit_file(data: bytes, *, source: str, file_mtime: float) -> JUnitImport:
    """One report file (gzip detected); raises only :class:`JUnitError`."""
    report = parse_junit(maybe_gunzip(data))
    counts = report.counts()
    return JUnitImport(format="junit", sessions=[], details={"suites": report.suites, "cases": len(report.cases),
                                                            **counts},
                       report=report, mtime=file_mtime, digest=content_id(data))


def junit_session(files: list[tuple[str, JUnitImport]], *, vcs: VcsInfo | None = None,
                  name: str = "") -> BuildSession:
    """The one session of an import: every file's cases in the order given.

    Its id derives from the files' contents and the commit, so importing the same reports
    twice is idempotent.  It lasts the reports' suite times (the outermost suites' ``time``,
    summed; else the cases' times, summed) and starts at the first suite ``timestamp`` when a
    report has one, else that long before the newest file's mtime."""
    cases: list[TestCase] = [c for _, f in files for c in f.report.cases]
    if len(cases) > MAX_CASES:
        raise JUnitError(f"the files hold {len(cases)} test cases together, more than the {MAX_CASES} "
                         "a session keeps")
    walls = [f.report.wall_s for _, f in files]
    serial = (sum(w or 0.0 for w in walls) if all(w is not None for w in walls)
              else sum(c.duration_s for c in cases))
    stamps = [f.report.timestamp for _, f in files if f.report.timestamp is not None]
    end_guess = max((f.mtime for _, f in files), default=0.0)
    start = min(stamps) if stamps else max(0.0, end_guess - serial)
    finish = start + serial
    bad = sum(c.outcome in ("failed", "error") for c in cases)
    sid = content_id("junit", *(f.digest for _, f in files), (vcs.commit or "") if vcs else "")
    paths = [p for p, _ in files]
    labels = {"importer": "junit", "source": paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1})"}
    return encodable(BuildSession(
        id=sid, name=name or f"junit {paths[0]}" + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""),
        start=start, finish=finish, duration_s=max(0.0, finish - start),
        outcome="failed" if bad else "success", labels=labels, agents=["import:junit"],
        environment=BuildEnvironment(vcs=vcs) if vcs is not None else None,
        totals=SessionTotals(events=len(cases)), trace_id=sid, tests=cases))
