"""The dashboard in a real browser (Debian's Chromium through Playwright) against a real farm
(``farm.py``: ``buildtel up``, the demo, real make builds, keys): every page loads with no console
error and no failed request, the timeline has a bar per target, filters change the rows,
acknowledging an alert changes the feed, and nothing is shown without a key.  A screenshot of each
page is kept in the farm's data directory (``screenshots/``), for CI to pick up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from tests.browser import chromium
from tests.web.farm import FARM_TIMEOUT_S, Farm, get_json, ready

# The module's first test also pays for its farm (farm.py: a stack, 30 demo builds, make builds,
# keys), which next to other load took over the suite's 120 s; a test's own steps stay well inside.
pytestmark = pytest.mark.timeout(FARM_TIMEOUT_S)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from chromium()


@pytest.fixture(scope="module")
def loaded(farm: Farm) -> Farm:
    """The farm once every build is stored and the demo's alert is out (ids filled in)."""

    async def wait() -> None:
        async with aiohttp.ClientSession() as http:
            await ready(farm, http)

    _in_thread(wait())
    return farm


def _in_thread(coro: Any) -> Any:
    """Run ``coro`` to its end on a loop of its own thread (pytest-asyncio may own this one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class Watched:
    """A page whose console errors and failed requests are collected."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("console", lambda m: self.problems.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        page.on("response", lambda r: self.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)


def _login(browser: Browser, farm: Farm, key: str) -> BrowserContext:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.goto(farm.web + "/")
    assert page.url.startswith(farm.web + "/login")
    page.fill("#key", farm.keys[key])
    page.click("form.login button[type=submit]")
    page.wait_for_url(farm.web + "/")
    page.close()
    return ctx


def _shot(page: Page, farm: Farm, name: str) -> None:
    out = farm.cache / "screenshots"
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)


def _pages(farm: Farm) -> dict[str, str]:
    i = farm.ids
    return {"overview": "/", "overview-7d": "/?days=7", "builds": "/sessions", "build": f"/sessions/{i['ok']}",
            "build-failed": f"/sessions/{i['failed']}", "demo-build": f"/sessions/{i['demo']}",
            "target": "/targets/" + quote(i["target"], safe=""), "alerts": "/alerts",
            "compare": f"/compare/{i['rec_a']}/{i['rec_b']}", "build-tests": f"/sessions/{i['tests_flaky']}",
            "tests": "/tests", "test": "/tests/" + quote("farm.unit::test_flaky", safe=""),
            "target-tests": "/targets/junit.xml"}


def test_every_page_loads_without_errors_and_is_kept_as_a_screenshot(browser: Browser, loaded: Farm) -> None:
    ctx = _login(browser, loaded, "read")
    try:
        for name, path in _pages(loaded).items():
            w = Watched(ctx.new_page())
            w.page.goto(loaded.web + path)
            w.page.wait_for_load_state("load")
            if w.page.locator("[data-chart]").count():
                w.page.wait_for_selector(".uplot")  # the charts were drawn
            assert w.page.locator("h1").count() == 1, name
            assert not w.problems, (name, w.problems)
            _shot(w.page, loaded, name)
            w.page.close()
        assert len(list((loaded.cache / "screenshots").glob("*.png"))) == len(_pages(loaded))
    finally:
        ctx.close()


def test_the_timeline_has_a_bar_per_target_and_marks_the_critical_path(browser: Browser, loaded: Farm) -> None:
    async def session() -> Any:
        async with aiohttp.ClientSession() as http:
            return await get_json(http, f"{loaded.web}/api/v1/sessions/{loaded.ids['demo']}", loaded.keys["read"])

    s = _in_thread(session())
    ctx = _login(browser, loaded, "read")
    try:
        page = ctx.new_page()
        page.goto(f"{loaded.web}/sessions/{s['id']}")
        assert page.locator("#timeline rect.bar").count() == len(s["targets"])
        assert page.locator("#timeline rect.bar.crit").count() >= 1
        assert page.locator("#targets tbody tr").count() == len(s["targets"])
        # The targets table sorts by a column with the keyboard.
        page.locator("#targets thead th").nth(3).locator("button").focus()
        page.keyboard.press("Enter")
        assert page.locator("#targets thead th").nth(3).get_attribute("aria-sort") == "ascending"
        first = page.locator("#targets tbody tr").first.locator("td").nth(3).get_attribute("data-v")
        assert float(first or "nan") == min(t["duration_s"] for t in s["targets"])
        # A failed build lists its failed target first.
        page.goto(f"{loaded.web}/sessions/{loaded.ids['failed']}")
        assert "broken" in page.locator("#targets tbody tr").first.inner_text()
        assert page.locator("#timeline rect.bar.failed").count() == 1
    finally:
        ctx.close()


def test_a_builds_tests_show_which_failed_and_which_are_flaky_and_link_to_their_history(
        browser: Browser, loaded: Farm) -> None:
    ctx = _login(browser, loaded, "read")
    try:
        page = ctx.new_page()
        # The build where test_flaky failed: failed first, marked flaky (it passed on the same commit
        # in the build before), with its assertion message.
        page.goto(f"{loaded.web}/sessions/{loaded.ids['tests_flaky']}")
        assert "2 passed, 1 failed" in page.locator("#tests-h").inner_text()
        first = page.locator("#tests tbody tr").first
        assert "farm.unit::test_flaky" in first.inner_text()
        assert "failed" in first.locator("td").nth(1).inner_text()
        assert "flaky 50 %" in first.locator("td").nth(3).inner_text()
        assert "expected 3, got 4" in first.locator("td").nth(4).inner_text()
        # ... and the build where it passed shows no failure but the same flaky mark.
        page.goto(f"{loaded.web}/sessions/{loaded.ids['tests_ok']}")
        assert "3 passed, 0 failed" in page.locator("#tests-h").inner_text()
        assert page.locator("#tests .badge").count() == 1
        # Its history: two runs on one commit, one failed; the builds where it flaked are linked.
        page.goto(f"{loaded.web}/sessions/{loaded.ids['tests_flaky']}")
        page.locator("#tests tbody tr").first.locator("a").click()
        page.wait_for_url("**/tests/farm.unit*")
        assert page.locator("h1").inner_text() == "Test farm.unit::test_flaky"
        assert page.locator(".strip .cell").count() == 2
        assert page.locator(".strip .cell.failed").count() == 1
        assert "yes, 50 %" in page.locator(".tiles").inner_text()
        assert page.locator(f"a[href='/sessions/{loaded.ids['tests_flaky']}']").count() >= 1
        # The tests page: the flaky one listed, the slowest first among the slowest.
        page.goto(f"{loaded.web}/tests")
        assert [r.inner_text().split("\t")[0] for r in page.locator("#flaky tbody tr").all()] == [
            "farm.unit::test_flaky"]
        assert page.locator("#slowest tbody tr").first.inner_text().startswith("farm.unit::test_slow")
        # A build without test results has no tests section.
        page.goto(f"{loaded.web}/sessions/{loaded.ids['ok']}")
        assert page.locator("#tests").count() == 0
        # The page of the target that wrote the report lists its tests, the flaky one first and marked,
        # sortable from the keyboard like the other tables.
        page.goto(f"{loaded.web}/targets/junit.xml")
        rows = page.locator("#target-tests tbody tr")
        assert rows.count() == 3
        assert rows.first.locator("td").first.inner_text() == "farm.unit::test_flaky"
        assert "flaky 50 %" in rows.first.locator(".badge.warn").inner_text()
        assert page.locator("#target-tests .badge.warn").count() == 1
        assert [rows.first.locator("td").nth(k).inner_text() for k in (1, 2, 3)] == ["2", "1", "1"]
        page.locator("#target-tests thead th").nth(7).locator("button").focus()
        page.keyboard.press("Enter")
        assert page.locator("#target-tests thead th").nth(7).get_attribute("aria-sort") == "ascending"
        assert rows.last.locator("td").first.inner_text() == "farm.unit::test_slow"  # 2.5 s: the longest
        rows.filter(has_text="farm.unit::test_flaky").locator("a").click()
        page.wait_for_url("**/tests/farm.unit*")
        assert page.locator("h1").inner_text() == "Test farm.unit::test_flaky"
        # A target that ran no test says so, and links to the tests named like it.
        page.goto(f"{loaded.web}/targets/lib.o")
        assert page.locator("#target-tests").count() == 0
        assert page.locator("#no-target-tests a[href='/tests?test=lib.o']").count() == 1
    finally:
        ctx.close()


def test_filters_change_the_rows(browser: Browser, loaded: Farm) -> None:
    ctx = _login(browser, loaded, "read")
    try:
        page = ctx.new_page()
        page.goto(f"{loaded.web}/sessions?limit=100")
        everything = page.locator("#sessions tbody tr").count()
        page.select_option("select[name=outcome]", "failed")
        page.click(".filters button[type=submit]")
        page.wait_for_url("**outcome=failed**")
        failed = page.locator("#sessions tbody tr")
        assert 1 <= failed.count() < everything
        for i in range(failed.count()):
            assert "failed" in failed.nth(i).locator("td").nth(1).inner_text()
        page.fill("input[name=branch]", "no-such-branch")
        page.click(".filters button[type=submit]")
        page.wait_for_url("**branch=no-such-branch**")
        assert page.locator("#sessions").count() == 0 and "No build matches" in page.content()
    finally:
        ctx.close()


def test_acknowledging_an_alert_changes_the_feed(browser: Browser, loaded: Farm) -> None:
    ctx = _login(browser, loaded, "write")
    try:
        w = Watched(ctx.new_page())
        w.page.goto(f"{loaded.web}/alerts?status=open")
        item = w.page.locator(f"#alert-{loaded.ids['alert']}")
        assert item.locator("[data-state]").inner_text() == "open"
        item.get_by_role("button", name="Acknowledge", exact=True).click()
        item.locator(".result", has_text="now acknowledged").wait_for()  # the API answered
        # The buttons swap in place: what applies now is to take it back.
        assert item.get_by_role("button", name="Take back acknowledgement").is_visible()
        assert not item.get_by_role("button", name="Acknowledge", exact=True).is_visible()
        w.page.goto(f"{loaded.web}/alerts?status=acknowledged")
        item = w.page.locator(f"#alert-{loaded.ids['alert']}")
        assert item.locator("[data-state]").inner_text() == "acknowledged"
        assert "acknowledged by" in item.inner_text()
        item.get_by_role("button", name="Take back acknowledgement").click()
        item.locator(".result", has_text="now open").wait_for()
        w.page.wait_for_load_state("load")
        assert not w.problems, w.problems
    finally:
        ctx.close()


def test_a_read_key_cannot_change_an_alert_from_the_page(browser: Browser, loaded: Farm) -> None:
    ctx = _login(browser, loaded, "read")
    try:
        page = ctx.new_page()
        page.goto(f"{loaded.web}/alerts")
        item = page.locator(f"#alert-{loaded.ids['alert']}")
        item.get_by_role("button", name="Acknowledge", exact=True).click()
        page.wait_for_selector(f"#alert-{loaded.ids['alert']} .result.error")
        assert "needs 'write' or 'admin'" in item.locator(".result").inner_text()
    finally:
        ctx.close()


def test_no_page_without_a_key(browser: Browser, loaded: Farm, tmp_path: Path) -> None:
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        for path in _pages(loaded).values():
            page.goto(loaded.web + path)
            assert page.url.startswith(loaded.web + "/login?next="), path
            assert page.locator("#key").count() == 1 and page.locator("h1").inner_text() == "Log in"
            assert page.locator("table, svg.timeline, [data-chart]").count() == 0  # no data on it
        # A wrong key is refused on the login page; a revoked one too.
        for key in ("btk_0123456789ab_" + "x" * 43, loaded.keys["revoked"]):
            page.goto(loaded.web + "/login")
            page.fill("#key", key)
            page.click("form.login button[type=submit]")
            assert "missing, unknown or revoked" in page.locator(".error").inner_text()
        # The login page sends nowhere but this site.
        page.goto(loaded.web + "/login?next=//evil.example/")
        page.fill("#key", loaded.keys["read"])
        page.click("form.login button[type=submit]")
        page.wait_for_url(loaded.web + "/")
    finally:
        ctx.close()


def test_pages_fit_a_phone_screen(browser: Browser, loaded: Farm) -> None:
    """At 390 px nothing makes the page scroll sideways (wide tables scroll inside themselves)."""
    ctx = _login(browser, loaded, "read")
    try:
        page = ctx.new_page()
        page.set_viewport_size({"width": 390, "height": 844})
        for name, path in _pages(loaded).items():
            page.goto(loaded.web + path)
            page.wait_for_load_state("load")
            wide = page.evaluate("document.documentElement.scrollWidth")
            assert wide <= 390, (name, wide)
            _shot(page, loaded, f"{name}-phone")
    finally:
        ctx.close()


def test_flame_graphs_open_in_the_page_and_compare_shows_the_diff(browser: Browser, loaded: Farm) -> None:
    ctx = _login(browser, loaded, "read")
    try:
        w = Watched(ctx.new_page())
        w.page.goto(f"{loaded.web}/sessions/{loaded.ids['demo']}")
        w.page.click("details.flame-box summary")
        frame = w.page.frame_locator("details.flame-box iframe")
        frame.locator("svg").first.wait_for()
        assert frame.locator("text=Flame Graph").count() >= 1 or frame.locator("svg g").count() > 10
        # Two builds of the same Makefile, the second building one target: the diff says so.
        w.page.goto(f"{loaded.web}/compare/{loaded.ids['rec_a']}/{loaded.ids['rec_b']}")
        removed = w.page.locator("#targets-h + ul").inner_text()
        assert "main.o" in removed and "(only in A)" in removed
        w.page.frame_locator("iframe.flame").locator("svg").first.wait_for()
        assert not w.problems, w.problems
    finally:
        ctx.close()


def test_a_running_build_appears_live_and_goes_when_it_finishes(browser: Browser, loaded: Farm,
                                                                tmp_path: Path) -> None:
    """The overview's "Running now" follows the live stream: a build shows while it runs (the
    test decides when it ends: it waits for a file) and leaves the list when it finishes."""
    import subprocess
    import sys

    stop = tmp_path / "stop"
    ctx = _login(browser, loaded, "read")
    build = None
    try:
        w = Watched(ctx.new_page())
        w.page.goto(loaded.web + "/")
        w.page.locator("#live li", has_text="No build running").wait_for()
        script = f"import os, time\nwhile not os.path.exists({str(stop)!r}):\n    time.sleep(0.05)\n"
        build = subprocess.Popen([sys.executable, "-m", "buildtel.cli.main", "run", "--name", "live-one", "--",
                                  sys.executable, "-c", script], env=loaded.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        row = w.page.locator("#live li[data-session]", has_text="live-one")
        row.wait_for(timeout=60_000)
        assert w.page.locator("#running-count").inner_text() == "1"
        stop.write_text("done")
        _out, err = build.communicate(timeout=60)
        assert build.returncode == 0, err
        row.wait_for(state="detached", timeout=60_000)
        assert w.page.locator("#running-count").inner_text() == "0"
        assert not w.problems, w.problems
    finally:
        stop.write_text("done")
        if build is not None and build.poll() is None:
            build.kill()
        ctx.close()
