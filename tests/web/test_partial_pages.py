"""A partition away is said on the dashboard and in the API (docs/dashboard.md, docs/scaling.md
Partitions): storage as P = 3 processes, one SIGKILLed while builds go on.  Every page built from
storage's (or the report's) answers shows the notice naming it, in a real browser, and the API's
JSON carries ``partial``; once the partition is back and has caught up, the notice is gone.

The processes, the analyzer and the web service run on the tests' real NATS and Redis; every wait
is a poll with a deadline, and everything started is stopped in ``finally``.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from buildtel.services.analyzer.service import AnalyzerService
from buildtel.services.storage.api import StorageClient
from buildtel.services.web.service import WebService
from buildtel.shared.partitions import partition_of
from buildtel.shared.protocol import BuildSession, TestCase
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.browser import chromium
from tests.storage.conftest import build_session
from tests.storage.test_partitions import P, all_answer, publish, spawn, stop_all
from tests.web.conftest import Api

# Three storage processes, the analyzer, the web service and a browser, on two busy cores.
pytestmark = pytest.mark.timeout(300)

VICTIM = 1
NOTE = f"partial: partition {VICTIM} did not answer"
SHOWN = f"Partial answer: partition {VICTIM} did not answer — builds stored there are missing from this page."
TARGET = "//pkg:t0"
TEST = "unit::test_a"


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.1)


def builds(first: int, n: int, now: float) -> list[BuildSession]:
    """Builds on main with a test case each; every fourth failed (a failure for /api/v1/failures)."""
    out = []
    for i in range(first, first + n):
        s = build_session(i, finish=now - 2000 + i * 10, outcome="failed" if i % 4 == 0 else "success")
        s.tests = [TestCase(suite="unit", name="test_a", duration_s=0.1 + i / 1000)]
        out.append(s)
    return out


def look(base: str, paths: dict[str, str], shots: Path | None = None) -> dict[str, dict[str, Any]]:
    """What a person sees on each page (a real Chromium, in this thread: Playwright's sync API wants
    no running event loop): the notice's text when it is shown, its role, the page's heading; with
    ``shots``, a screenshot of each page there (to look at when a check fails)."""
    gen = chromium()
    browser = next(gen)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        seen: dict[str, dict[str, Any]] = {}
        for name, path in paths.items():
            resp = page.goto(base + path)
            assert resp is not None and resp.status == 200, (name, resp.status if resp else None)
            if shots is not None:
                shots.mkdir(exist_ok=True)
                page.screenshot(path=str(shots / f"{name}.png"))
            notice = page.locator("#partial-notice")
            shown = notice.count() == 1 and notice.is_visible()
            seen[name] = {"h1": page.locator("h1").inner_text(),
                          "notice": notice.inner_text() if shown else None,
                          "role": notice.get_attribute("role") if shown else None,
                          "builds": page.locator("#total-builds").inner_text() if name == "overview" else None}
        return seen
    finally:
        gen.close()  # the browser and Playwright stop (chromium()'s finally)


async def api_partial(api: Api, sid: str) -> dict[str, list[str]]:
    """``partial`` of every API answer built from storage or the report, each checked against the
    OpenAPI document the service serves."""
    asks = {"sessions": ("/api/v1/sessions", {"limit": 500}, "SessionPage"),
            "trends": ("/api/v1/trends", {}, "TrendReply"),
            "target": ("/api/v1/targets/history", {"target": TARGET}, "TargetHistory"),
            "report": ("/api/v1/report", {}, "AnalyticsReport"),
            "tests": ("/api/v1/tests", {}, "TestsReply"),
            "test": ("/api/v1/tests/history", {"name": TEST}, "TestHistoryReply"),
            "failures": ("/api/v1/failures", {}, "FailuresReply")}
    out: dict[str, list[str]] = {}
    for name, (path, params, component) in asks.items():
        status, _, body = await api.get(path, **params)
        assert status == 200, (name, body)
        api.check(body, component)
        field = "partial_notes" if name == "report" else "partial"
        assert field in api.doc["components"]["schemas"][component]["properties"], component  # documented
        # The report's `partial` was a boolean before partitions (kept); the notes are apart.
        out[name] = body["partial_notes"] if name == "report" else body["partial"]
        if name == "report":
            assert body["partial"] == bool(body["partial_notes"])
    return out


async def test_a_partition_away_is_said_on_every_page_and_in_the_api_until_it_is_back(
        settings: Settings, nc: Any, redis_client: Any, tmp_path: Path) -> None:
    sp = settings.with_(storage_partitions=P)
    subjects = Subjects(settings.namespace)
    client = StorageClient(nc, subjects, timeout=10.0)
    logs = [tmp_path / f"p{k}.log" for k in range(P)]
    procs: list[subprocess.Popen[bytes]] = []
    services: list[Any] = []
    try:
        procs += [spawn(settings, k, logs[k]) for k in range(P)]

        async def whole(n: int | None = None) -> bool:
            return await all_answer(client, procs, logs, n)

        await eventually(whole, "every partition answers")
        analyzer = AnalyzerService(sp, sp.nats_url or "", sp.redis_url or "")
        await analyzer.start()
        services.append(analyzer)
        web = WebService(sp, sp.nats_url or "", sp.redis_url or "")
        await web.start()
        services.append(web)

        now = time.time()
        first = builds(0, 30, now)
        await publish(nc, subjects, first)
        await eventually(lambda: whole(len(first)), "the first builds stored")
        mine = [s for s in first if partition_of(s.id, P) == VICTIM]
        live = [s for s in first if partition_of(s.id, P) != VICTIM]
        assert mine and live
        sid = next(s.id for s in reversed(live) if s.outcome == "success")  # a build the others hold
        paths = {"overview": "/", "sessions": "/sessions", "build": f"/sessions/{sid}",
                 "target": "/targets/" + quote(TARGET, safe=""), "tests": "/tests",
                 "test": "/tests/" + quote(TEST, safe="")}

        async with aiohttp.ClientSession() as http:
            api = Api(web, http)
            _, _, api.doc = await api.get("/api/v1/openapi.json")
            assert all(v == [] for v in (await api_partial(api, sid)).values())
            before = await asyncio.to_thread(look, web.url, paths)
            assert all(p["notice"] is None for p in before.values()), before
            assert before["overview"]["builds"] == str(len(first))

            procs[VICTIM].send_signal(signal.SIGKILL)
            procs[VICTIM].wait(10)
            # Builds go on: the victim's share waits in its durable consumer.
            second = builds(100, 15, now)
            await publish(nc, subjects, second)
            live += [s for s in second if partition_of(s.id, P) != VICTIM]

            async def said() -> bool:
                _, _, page = await api.get("/api/v1/sessions", limit=500)
                return page["partial"] == [NOTE] and len(page["sessions"]) == len(live)

            await eventually(said, "the sessions answer names the partition away, with the others' builds")
            assert all(v == [NOTE] for v in (await api_partial(api, sid)).values())
            during = await asyncio.to_thread(look, web.url, paths, tmp_path / "screenshots")
            for name, seen in during.items():
                assert seen["notice"] is not None and SHOWN in seen["notice"], (name, seen)
                assert seen["role"] == "status", name
            assert during["overview"]["builds"] == str(len(live))  # smaller, and said so above it

            procs[VICTIM] = spawn(settings, VICTIM, logs[VICTIM])
            await eventually(lambda: whole(len(first) + len(second)), "the partition back and caught up")
            assert all(v == [] for v in (await api_partial(api, sid)).values())
            after = await asyncio.to_thread(look, web.url, paths)
            assert all(p["notice"] is None for p in after.values()), after
            assert after["overview"]["builds"] == str(len(first) + len(second))
            assert [p["h1"] for p in after.values()] == [p["h1"] for p in before.values()]
    finally:
        for svc in reversed(services):
            await svc.stop()
        stop_all(procs)


def test_the_notice_names_every_partition_away_and_is_absent_when_whole() -> None:
    from buildtel.services.web.views import partial_notice

    assert partial_notice([]) is None
    assert partial_notice([NOTE, NOTE]) == SHOWN
    many = [f"partial: partition {k} did not answer" for k in (10, 2, 0)]
    assert partial_notice(many) == ("Partial answer: partitions 0, 2 and 10 did not answer — builds stored there "
                                    "are missing from this page.")
    # A note of another form is said in its own words (never dropped).
    assert (partial_notice(["partial: the index was busy"]) or "").startswith("Partial answer: the index was busy —")
