"""JUnit XML test reports -> :class:`TestCase` lists (docs/tests.md).

JUnit XML is what pytest ``--junitxml``, ctest ``--output-junit``, Gradle, Maven Surefire,
gotestsum and Jest write: ``<testsuites>``/``<testsuite>`` (nested suites allowed) holding
``<testcase classname name time>``, each with an optional ``<failure>``, ``<error>`` or
``<skipped>`` child and ``<system-out>``/``<system-err>`` (read past, never kept).

Parsing streams through the stdlib's expat binding (``xml.parsers.expat``: the parser under
``ElementTree.iterparse``, driven directly so that its DOCTYPE and ENTITY handlers can refuse
a document type declaration the moment it starts).  The stdlib never fetches external
entities, and expat >= 2.4 bounds internal entity amplification, but a test report has no
business declaring entities at all: any DOCTYPE is refused, which also closes the
billion-laughs and quadratic-blowup attacks whatever the expat version (the rule defusedxml
applies, without adding a dependency).  Text is only collected inside a failure, error or
skipped element and only up to a bound, so a gigabyte of ``system-out`` costs no memory.

Any malformed input raises :class:`JUnitError` (an :class:`ImportFormatError`, with the line),
never anything else: nothing half-parsed is ever returned.
"""

from __future__ import annotations

import math
import xml.parsers.expat as expat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from buildtel.shared.importers.common import ImportFormatError
from buildtel.shared.protocol import TestCase
from buildtel.shared.redaction import redact_text

MAX_MESSAGE_CHARS = 1000  # kept per case: sessions stay bounded (docs/tests.md)
MAX_NAME_CHARS = 1000  # suite and name; longer ones are cut (the bus refuses strings over 4096)
MAX_CASES = 200_000  # per session (BuildSession.tests); a file with more is refused
MAX_FILE_BYTES = 512 * 1024 * 1024  # larger files are refused before being read
_TEXT_CHARS = 4 * MAX_MESSAGE_CHARS  # text collected per failure before redaction and the cut
_CHUNK = 1 << 20
# A child element -> the outcome it gives its case; on several, the stronger (lower rank) wins.
_OUTCOME = {"failure": "failed", "error": "error", "skipped": "skipped"}
_RANK = {"failed": 0, "error": 1, "skipped": 2, "passed": 3}


class JUnitError(ImportFormatError):
    """The input is not a JUnit XML report we accept (malformed, a DOCTYPE, too large)."""


@dataclass
class JUnitReport:
    """The cases of one report, in file order, and what was tolerated."""

    cases: list[TestCase] = field(default_factory=list)
    suites: int = 0
    warnings: list[str] = field(default_factory=list)
    timestamp: float | None = None  # the first suite's `timestamp`, Unix s, when it has one
    wall_s: float | None = None  # sum of the outermost suites' `time` (the run's wall time); None: none had one

    def counts(self) -> dict[str, int]:
        out = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for c in self.cases:
            out[c.outcome] += 1
        return out


def _seconds(text: str | None) -> float:
    """A ``time`` attribute as seconds; 0 when absent or not a finite, non-negative number."""
    if not text:
        return 0.0
    try:
        v = float(text.replace(",", ""))  # some writers group thousands: "1,234.5"
    except ValueError:
        return 0.0
    return v if math.isfinite(v) and v >= 0.0 else 0.0


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    from datetime import UTC, datetime

    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def clean_message(text: str) -> str:
    """A failure message as kept: secrets redacted (shared/redaction.py), then cut to the bound."""
    text = text.strip()
    if not text:
        return ""
    return _cut(redact_text(text[:_TEXT_CHARS]), MAX_MESSAGE_CHARS)


class _Handler:
    """expat callbacks building the case list; one instance per document."""

    def __init__(self, parser: Any, max_cases: int) -> None:
        self.p = parser
        self.max_cases = max_cases
        self.report = JUnitReport()
        self.suites: list[str] = []
        self.case: dict[str, Any] | None = None
        self.text: list[str] | None = None  # collecting a failure's text
        self.text_len = 0
        self.root_seen = False

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        if not self.root_seen:
            self.root_seen = True
            if tag not in ("testsuites", "testsuite", "testcase"):
                raise JUnitError(f"root element <{tag[:80]}> is not <testsuites> or <testsuite>",
                                 self.p.CurrentLineNumber)
        if tag == "testsuite":
            self.suites.append(attrs.get("name", ""))
            self.report.suites += 1
            if len(self.suites) == 1 and attrs.get("time"):
                self.report.wall_s = (self.report.wall_s or 0.0) + _seconds(attrs.get("time"))
            if self.report.timestamp is None:
                self.report.timestamp = _timestamp(attrs.get("timestamp"))
        elif tag == "testcase":
            if len(self.report.cases) >= self.max_cases:
                raise JUnitError(f"more than {self.max_cases} test cases", self.p.CurrentLineNumber)
            suite = attrs.get("classname") or (self.suites[-1] if self.suites else "")
            self.case = {"suite": _cut(suite, MAX_NAME_CHARS), "name": _cut(attrs.get("name", ""), MAX_NAME_CHARS),
                         "duration_s": _seconds(attrs.get("time")), "outcome": "passed", "message": ""}
        elif self.case is not None and tag in _OUTCOME:
            outcome = _OUTCOME[tag]
            if _RANK[outcome] < _RANK[self.case["outcome"]]:
                self.case["outcome"] = outcome
                self.case["message"] = attrs.get("message", "")
                self.text, self.text_len = [], 0

    def end(self, tag: str) -> None:
        if tag == "testsuite" and self.suites:
            self.suites.pop()
        elif tag == "testcase" and self.case is not None:
            c = self.case
            self.report.cases.append(TestCase(suite=c["suite"], name=c["name"], duration_s=c["duration_s"],
                                              outcome=c["outcome"], message=clean_message(c["message"])))
            self.case = None
        elif tag in _OUTCOME and self.text is not None and self.case is not None:
            body = "".join(self.text).strip()
            msg = self.case["message"]
            if body and body != msg.strip():
                self.case["message"] = f"{msg}\n{body}" if msg else body
            self.text = None

    def chars(self, data: str) -> None:
        if self.text is not None and self.text_len < _TEXT_CHARS:
            self.text.append(data[:_TEXT_CHARS - self.text_len])
            self.text_len += len(data)

    def doctype(self, *_: Any) -> None:
        raise JUnitError("document type declarations (DOCTYPE, entities) are refused in test reports",
                         self.p.CurrentLineNumber)


def _chunks(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), _CHUNK):
        yield data[i:i + _CHUNK]


def parse_junit(data: bytes, *, max_cases: int = MAX_CASES, max_bytes: int = MAX_FILE_BYTES) -> JUnitReport:
    """The test cases of one JUnit XML document (bytes, any encoding XML declares; gzip is
    not expected here: callers unwrap it).  Raises only :class:`JUnitError`."""
    if len(data) > max_bytes:
        raise JUnitError(f"file of {len(data)} bytes is larger than the {max_bytes}-byte limit of a test report")
    p = expat.ParserCreate()
    h = _Handler(p, max_cases)
    p.buffer_text = True
    p.ordered_attributes = False
    p.StartElementHandler = h.start
    p.EndElementHandler = h.end
    p.CharacterDataHandler = h.chars
    # Refused the moment they start: no entity is ever declared, let alone expanded.
    p.StartDoctypeDeclHandler = h.doctype
    p.EntityDeclHandler = h.doctype
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        for chunk in _chunks(data):
            p.Parse(chunk, False)
        p.Parse(b"", True)
    except expat.ExpatError as exc:
        raise JUnitError(f"not well-formed XML: {expat.errors.messages.get(exc.code, str(exc))}"
                         f" (column {exc.offset})", exc.lineno) from None
    except JUnitError:
        raise
    except (ValueError, LookupError, RecursionError, MemoryError) as exc:  # e.g. an unknown encoding
        raise JUnitError(f"unreadable XML: {exc}", p.CurrentLineNumber) from None
    if not h.root_seen:
        raise JUnitError("no XML element in the file")
    return h.report
