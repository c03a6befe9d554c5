"""What the dashboard shows of test results (``docs/dashboard.md``, ``docs/tests.md``): the tests of
one build on its session page, the tests a target ran on its page (over the builds that ran it),
flaky and slowest tests at ``/tests`` (with a name filter), one test's history at ``/tests/{name}``.
``pages.py`` renders them.

The figures are the storage service's (``services/storage/tests_history.py``), the same as
``buildtel tests`` and ``GET /api/v1/tests``: a test is *flaky* when it both passed and failed on
the same commit (or in the same build), so a page never calls a test flaky on a guess.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from buildtel.services.storage.api import StorageError
from buildtel.services.storage.tests_history import MAX_TESTS, TestHistoryRequest, TestsRequest, test_history, tests
from buildtel.services.web.base import BACKEND, TENANT
from buildtel.services.web.query import BadInput, parse_time
from buildtel.services.web.tests_api import storage_failure
from buildtel.shared.protocol import BuildSession
from buildtel.shared.subjects import Subjects

SESSION_ROWS = 200  # test cases listed on a session page (not passed first, then slowest)
# A session page marks the flaky tests among the build's as of the newest FLAKY_WINDOW builds: the
# storage service reads each of them, and a page must stay quick on a farm whose every build has tests.
FLAKY_WINDOW = 200
LIST_ROWS = 50  # flaky / slowest tests on /tests
HISTORY_RUNS = 200  # runs of one test on its page
TARGET_ROWS = 200  # tests listed on a target's page (flaky and failing first)
TARGET_WINDOW = 1000  # a target's page reads its newest builds with test results, as /tests does
_ORDER = {"failed": 0, "error": 1, "skipped": 3, "passed": 2}


def _nc_subjects(request: web.Request) -> tuple[Any, Subjects]:
    backend: Any = request.app[BACKEND]  # the web service (service.py): its NATS connection
    return backend.nc, Subjects(request[TENANT])


async def _ask(request: web.Request, req: Any, *, history: bool = False) -> Any:
    nc, subjects = _nc_subjects(request)
    try:
        return await (test_history if history else tests)(nc, subjects, req)
    except StorageError as exc:
        raise storage_failure(exc) from None


def test_id(suite: str, name: str) -> str:
    """The id the storage service gives a test (``suite::name``, ``name`` without a suite)."""
    return f"{suite}::{name}" if suite else name


async def session_tests(request: web.Request, s: BuildSession) -> dict[str, Any] | None:
    """What the session page shows of the build's test cases, with the ones known to be flaky
    marked; None when the build reported no tests."""
    if not s.tests:
        return None
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
    for c in s.tests:
        counts[c.outcome] = counts.get(c.outcome, 0) + 1
    ordered = sorted(s.tests, key=lambda c: (_ORDER.get(c.outcome, 9), -c.duration_s, c.suite, c.name))
    req = TestsRequest(flaky=True, sessions=FLAKY_WINDOW, limit=MAX_TESTS)
    flaky_reply = await _ask(request, req)
    flaky = {t.test: t for t in flaky_reply.tests}
    rows = [{"id": test_id(c.suite, c.name), "case": c, "flaky": flaky.get(test_id(c.suite, c.name))}
            for c in ordered[:SESSION_ROWS]]
    return {"counts": counts, "rows": rows, "more": max(0, len(ordered) - SESSION_ROWS),
            "flaky_here": sum(1 for r in rows if r["flaky"]), "window": FLAKY_WINDOW, "partial": flaky_reply.partial}


async def target_tests(request: web.Request, name: str, filters: dict[str, str]) -> dict[str, Any]:
    """A target's page: the tests attributed to it (``TestCase.target``) over its newest builds
    that match the page's filters (``agent`` is not a filter of test figures: said on the page),
    flaky ones first, then failing, then by name."""
    since = parse_time("since", filters.get("since"))
    until = parse_time("until", filters.get("until"))
    reply = await _ask(request, TestsRequest(target=name, branch=filters.get("branch"), label=filters.get("label"),
                                             since=since, until=until, sessions=TARGET_WINDOW, limit=TARGET_ROWS))
    return {"reply": reply, "rows": reply.tests, "more": max(0, reply.tests_total - len(reply.tests)),
            "window": TARGET_WINDOW, "agent_ignored": "agent" in filters, "partial": reply.partial}


async def index_context(request: web.Request) -> dict[str, Any]:
    """``/tests``: the flaky tests (most flake-prone first) and the slowest, of tests whose id holds
    ``test`` (a target's page links here with its name) on ``branch``."""
    branch = request.query.get("branch") or None
    needle = request.query.get("test", "")
    if len(needle) > 4096:
        raise BadInput("parameter 'test': longer than 4096 characters")
    flaky = await _ask(request, TestsRequest(flaky=True, branch=branch, test=needle, limit=LIST_ROWS))
    slowest = await _ask(request, TestsRequest(sort="slowest", branch=branch, test=needle, limit=LIST_ROWS))
    filters = {k: v for k, v in (("branch", branch), ("test", needle)) if v}
    return {"flaky": flaky, "slowest": slowest, "filters": filters,
            "partial": sorted({*flaky.partial, *slowest.partial})}  # base.html's notice


async def test_context(request: web.Request) -> dict[str, Any]:
    """``/tests/{name}``: one test's runs (newest first), its figures and a duration series."""
    name = request.match_info["name"]
    if len(name) > 4096:
        raise BadInput("the test's name is longer than 4096 characters")
    hist, found = await asyncio.gather(_ask(request, TestHistoryRequest(test=name, limit=HISTORY_RUNS), history=True),
                                       _ask(request, TestsRequest(test=name, sort="name", limit=MAX_TESTS)))
    stat = next((t for t in found.tests if t.test == name), None)
    runs = sorted(hist.runs, key=lambda r: r.t)
    series = {"t": [r.t for r in runs], "duration": [r.duration_s for r in runs],
              "outcome": [r.outcome for r in runs], "session": [r.session_id for r in runs]}
    return {"name": name, "stat": stat, "runs": list(reversed(runs)), "series": series,
            "partial": sorted({*hist.partial, *found.partial})}  # base.html's notice
