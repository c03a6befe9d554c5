"""The results link a real Bazel prints (``--bes_results_url`` + its invocation id) opens the build's
session page on the project's real web service: storage, collector, BES endpoint and web started
in this process on the test bus, Bazel 4.2.3 building genrules against them, the link fetched over
HTTP as a browser would."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from buildtel.services.bes.service import BesService
from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.service import StorageService
from buildtel.services.web.service import WebService
from buildtel.shared.settings import Settings
from tests.bes.test_bazel import _bazel, _workspace
from tests.util import running


@pytest.fixture
async def farm(bes_settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[tuple[BesService, WebService]]:
    quick = bes_settings.with_(fsync=False)
    urls = (quick.nats_url or "", quick.redis_url or "")
    bes, web = BesService(quick, *urls, port=0), WebService(quick, *urls, port=0)
    async with running(StorageService(quick, *urls), CollectorService(quick, *urls), bes, web):
        yield bes, web


async def test_the_results_link_bazel_prints_opens_the_session_page(farm: tuple[BesService, WebService],
                                                                     tmp_path) -> None:
    bes, web = farm
    ws = _workspace(tmp_path)
    results = f"{web.url}/sessions/"
    rc, printed = await _bazel(ws, tmp_path, "//:a", "//:b", "//:c", f"--bes_backend={bes.url}",
                               f"--bes_results_url={results}")
    assert rc == 0, printed
    links = set(re.findall(re.escape(results) + r"\S+", printed))
    assert len(links) == 1, printed  # Bazel prints it at the start and at the end of the build
    [link] = links
    invocation = link.removeprefix(results)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", invocation), link
    async with aiohttp.ClientSession() as http:
        deadline = asyncio.get_running_loop().time() + 60
        while True:  # the page exists once storage has the completed session
            async with http.get(link) as resp:
                status, page = resp.status, await resp.text()
            if status == 200 or asyncio.get_running_loop().time() > deadline:
                break
            assert status == 404, (status, page[:500])
            await asyncio.sleep(0.2)
    assert status == 200, page[:500]
    # The build's page: its id, its name as Bazel ran it, its targets and outcome.
    assert invocation.replace("-", "") in page
    assert "bazel build //:a //:b //:c" in page
    assert "//:c" in page and "success" in page
