"""A target's page lists the tests that target ran (docs/tests.md#which-target-ran-a-test), from
real builds: a make build under ``buildtel run --junit`` whose ``build/report.xml`` target runs a
real pytest that fails one time in two, a ninja edge whose pytest fails, and a recorded Bazel
stream (``buildtel import bep``) whose test failed and passed on retry.

Storage, the collector and the web service run on the tests' real NATS and Redis; the builds and
imports are ``buildtel`` processes; every wait is a poll with a deadline."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.service import StorageService
from buildtel.services.web.service import WebService
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.junit.stack import cli, eventually, git_repo
from tests.junit.test_junit_live import FLAKY
from tests.util import running

# Real builds as processes on a loaded machine: four make runs of pytest.
pytestmark = pytest.mark.timeout(300)

DATA = Path(__file__).resolve().parents[1] / "data" / "bep"
KAHLYS = DATA / "kahlys-battools_bazel7.1.2_test_build_events.json"

# unit_test writes a report as ctest would (no target writes a file of that name): its case is
# attributed by its suite's name; `elsewhere` names no target and stays unattributed.
MAKEFILE = """\
.PHONY: all prep unit_test build/report.xml
all: unit_test build/report.xml
prep:
\tmkdir -p build
unit_test: prep
\tprintf '<testsuite><testcase classname="unit_test" name="adds" time="0.1"/><testcase classname="elsewhere" \
name="y"/></testsuite>' > build/ctest-like.xml
build/report.xml: prep
\t{python} -m pytest -q -p no:cacheprovider test_flaky.py --junitxml=$@
"""


class Rows(HTMLParser):
    """The cells' text of each body row of ``<table id=...>``, and the links in them."""

    def __init__(self, table: str) -> None:
        super().__init__()
        self.table, self.inside, self.rows, self.links = table, False, [], []  # type: ignore[var-annotated]
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.inside = a.get("id") == self.table
        elif self.inside and tag == "tr":
            self.rows.append([])
            self.links.append([])
        elif self.inside and tag == "td":
            self._cell = []
        elif self.inside and tag == "a" and self.rows:
            self.links[-1].append(a.get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = False
        elif tag == "td" and self._cell is not None and self.rows:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table(html: str, table_id: str) -> tuple[list[list[str]], list[list[str]]]:
    p = Rows(table_id)
    p.feed(html)
    return [r for r in p.rows if r], [links for r, links in zip(p.rows, p.links, strict=True) if r]


@pytest.fixture
async def site(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[tuple[Settings, str]]:
    quick = settings.with_(fsync=False)
    urls = (quick.nats_url or "", quick.redis_url or "")
    web = WebService(quick, *urls)
    async with running(StorageService(quick, *urls), CollectorService(quick, *urls), web):
        yield quick, web.url


async def _page(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.text()


async def _stored(nc: Any, settings: Settings, n: int) -> list[Any]:
    client = StorageClient(nc, Subjects(settings.namespace))

    async def probe() -> list[Any]:
        got = await client.summaries(limit=100)
        return got if len(got) >= n else []

    return await eventually(probe, timeout=60)


async def test_a_make_target_that_writes_a_junit_report_lists_its_tests_and_flakes(
        site: tuple[Settings, str], nc: Any, tmp_path: Path) -> None:
    settings, web = site
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "test_flaky.py").write_text(FLAKY)
    (repo / "Makefile").write_text(MAKEFILE.format(python=sys.executable))
    git_repo(repo)
    codes = []
    for _ in range(4):
        code, _, err = await cli(settings, "run", "--junit", "build/*.xml", "--", "make", cwd=repo)
        codes.append(code)
        assert "junit: 2 report(s), 4 test(s)" in err and "; 3 attributed to a build target" in err, err
    assert codes == [0, 2, 0, 2]  # pytest fails every second run: make says 2
    [newest, *_] = await _stored(nc, settings, 4)
    full = await StorageClient(nc, Subjects(settings.namespace)).get(newest.id)
    assert sorted((c.suite, c.name, c.target) for c in full.tests) == [
        ("elsewhere", "y", ""), ("test_flaky", "test_sometimes", "build/report.xml"),
        ("test_flaky", "test_steady", "build/report.xml"), ("unit_test", "adds", "unit_test")]

    html = await _page(f"{web}/targets/{quote('build/report.xml', safe='')}")
    rows, links = table(html, "target-tests")
    # Flaky first: failed twice and passed twice on one commit; then the steady one.
    assert [r[:5] for r in rows] == [["test_flaky::test_sometimes", "4", "2", "2", "0"],
                                     ["test_flaky::test_steady", "4", "4", "0", "0"]]
    assert rows[0][5].replace(" ", "") == "flaky50%" and rows[1][5] == "no" and rows[0][6] != "—" and rows[1][6] == "—"
    assert links[0] == ["/tests/test_flaky%3A%3Atest_sometimes"]
    assert 'class="flaky"' in html and "4 with test results" in html

    code, out, err = await cli(settings, "tests", "--target", "build/report.xml", "--json")
    assert code == 0, err
    assert [(t["test"], t["flaky"]) for t in json.loads(out)["tests"]] == [
        ("test_flaky::test_sometimes", True), ("test_flaky::test_steady", False)]

    rows, _ = table(await _page(f"{web}/targets/unit_test"), "target-tests")
    assert [r[:3] for r in rows] == [["unit_test::adds", "4", "4"]]

    html = await _page(f"{web}/targets/prep")  # built every time, ran no test
    assert 'id="target-tests"' not in html and 'id="no-target-tests"' in html and "/tests?test=prep" in html


async def test_a_failed_ninja_edge_is_the_target_of_the_report_it_wrote(
        site: tuple[Settings, str], nc: Any, tmp_path: Path) -> None:
    settings, web = site
    (tmp_path / "test_fail.py").write_text("def test_no():\n    assert 1 == 2\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "build.ninja").write_text(
        "rule pytest\n"
        f"  command = {sys.executable} -m pytest -q -p no:cacheprovider ../test_fail.py --junitxml=$out\n"
        "build reports/fail.xml: pytest\n")
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")  # the `ninja` test dependency
    code, _, err = await cli(settings, "run", "--junit", "out/reports/*.xml", "--", ninja, "-C", "out", cwd=tmp_path)
    assert code == 1 and "1 attributed to a build target" in err, err  # ninja logs no failed edge:
    [s] = await _stored(nc, settings, 1)  # the console's FAILED: line names it
    full = await StorageClient(nc, Subjects(settings.namespace)).get(s.id)
    assert [(c.name, c.outcome, c.target) for c in full.tests] == [("test_no", "failed", "reports/fail.xml")]
    rows, _ = table(await _page(f"{web}/targets/{quote('reports/fail.xml', safe='')}"), "target-tests")
    assert [r[:4] for r in rows] == [["test_fail::test_no", "1", "0", "1"]]


async def test_a_bazel_tests_page_shows_the_test_that_flaked_on_retry(site: tuple[Settings, str], nc: Any) -> None:
    settings, web = site
    code, _, err = await cli(settings, "import", "bep", str(KAHLYS))
    assert code == 0, err
    await _stored(nc, settings, 1)
    # --runs_per_test=2: geninter_test failed its first run and passed its second (Bazel's FLAKY).
    label = "//go/cmd/geninter:geninter_test"
    html = await _page(f"{web}/targets/{quote(label, safe='')}")
    rows, links = table(html, "target-tests")
    assert [r[:5] for r in rows] == [["//go/cmd/geninter::geninter_test", "2", "1", "1", "0"]]
    assert rows[0][5].replace(" ", "") == "flaky50%"
    assert rows[0][8] == "passed"  # its last attempt (Bazel's retry), not its first
    assert links[0] == [f"/tests/{quote('//go/cmd/geninter::geninter_test', safe='')}"]
    rows, _ = table(await _page(f"{web}/targets/{quote('//go/pkg/alfred:alfred_test', safe='')}"), "target-tests")
    assert [r[:6] for r in rows] == [["//go/pkg/alfred::alfred_test", "2", "2", "0", "0", "no"]]
