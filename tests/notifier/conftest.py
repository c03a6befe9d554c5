"""The notifier's tests: a real aiohttp receiver, alerts published as the analyzer publishes them
(an ``Alert`` on its subject, ``Nats-Msg-Id`` = its id), notifiers on the test NATS and Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from buildtel.services.analyzer.alerts import Alert, alert_id, encode_alert
from buildtel.services.analyzer.api import ensure_alerts_stream
from buildtel.services.analyzer.subjects import AnalyzerSubjects
from buildtel.services.notifier.service import NotifierService
from buildtel.shared.settings import Settings

SECRET = "s3cret-for-tests"
# Short backoffs: every wait in these tests is a bounded poll for a condition.
FAST = """[delivery]
retry_for_s = {retry_for_s}
backoff_initial_s = 0.05
backoff_max_s = 0.3
timeout_s = 2
lease_s = 3
poll_s = 0.05
"""


async def eventually(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.05)


@dataclass
class Got:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP receiver: ``mode`` "up" (200, recorded just before answering), "503", "400"."""

    mode: str = "up"
    delay_s: float = 0.0
    got: list[Got] = field(default_factory=list)
    refused: int = 0
    port: int = 0
    runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode != "up":
            self.refused += 1
            return web.Response(status=int(self.mode))
        self.got.append(Got(request.path.lstrip("/"), dict(request.headers), body))
        return web.Response(status=200, text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.port or site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Down for good: connections are refused until :meth:`start` again (same port)."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def paths(self, path: str) -> list[Got]:
        return [g for g in self.got if g.path == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def make_alert(*, kind: str = "target", branch: str | None = "main", target: str | None = "//app:lib",
               direction: str = "regression", pct: float = 40.0, confidence: float = 0.99,
               detected_at: float | None = None) -> Alert:
    target = target if kind == "target" else None
    series = f"{kind}|{branch or '_'}|{target}" if target else f"{kind}|{branch or '_'}"
    sid = uuid.uuid4().hex
    before = 10.0
    return Alert(id=alert_id(sid, series), kind=kind, direction=direction, series=series,  # type: ignore[arg-type]
                 branch=branch, target=target, cache="miss" if target else None, before_median_s=before,
                 after_median_s=before * (1 + pct / 100), change_pct=pct, confidence=confidence, p_value=0.01,
                 first_session_id=sid, first_session_start=time.time() - 60, last_good_session_id="lg" + sid[:10],
                 last_good_commit="a1b2c3", first_bad_commit="d4e5f6", commit_range="a1b2c3..d4e5f6",
                 detected_session_id=sid, detected_at=time.time() if detected_at is None else detected_at,
                 points_before=30, points_after=6)


async def publish(nc: Any, namespace: str, alerts: list[Alert]) -> None:
    """As the analyzer publishes: on the alert's subject, de-duplicated by its id."""
    js = nc.jetstream()
    subjects = AnalyzerSubjects.of(namespace)
    await ensure_alerts_stream(js, subjects)
    for a in alerts:
        await js.publish(subjects.alert(a.kind, a.branch, a.target), encode_alert(a), headers={"Nats-Msg-Id": a.id})


def write_config(tmp_path: Path, subscriptions: str, *, retry_for_s: float = 30.0, name: str = "alerts.toml") -> Path:
    path = tmp_path / name
    path.write_text(FAST.format(retry_for_s=retry_for_s) + subscriptions)
    path.chmod(0o600)
    return path


def webhook(sub_id: str, receiver: Receiver, extra: str = "") -> str:
    return (f'[[subscription]]\nid = "{sub_id}"\nkind = "webhook"\nurl = "{receiver.url(sub_id)}"\n'
            f'secret = "{SECRET}"\n{extra}\n')


@pytest.fixture
async def notifier(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[
        Callable[..., Awaitable[NotifierService]]]:
    """Start in-process notifiers with a subscriptions file (stopped at the end)."""
    started: list[NotifierService] = []

    async def start(config: Path, **kw: Any) -> NotifierService:
        s = settings.with_(alerts_config=config, **kw.pop("settings", {}))
        svc = NotifierService(s, s.nats_url or "", s.redis_url or "", **kw)
        await svc.start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        await svc.stop()
