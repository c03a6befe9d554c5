"""``buildtel report|export|alerts`` as a user runs them (subprocesses) against a live analyzer."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from buildtel.cli.cmd_analyze import parse_when
from buildtel.cli.main import CLIError
from buildtel.services.analyzer.analytics import TelemetryAnalyzer
from buildtel.services.analyzer.api import AnalyzerClient, wait_for_alerts
from buildtel.services.analyzer.service import AnalyzerService
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.service import StorageService
from buildtel.shared.codec import encode
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.analyzer.test_service import _step_history
from tests.util import stack_env


async def _cli(settings: Settings, *args: str, namespace: str | None = None) -> tuple[int, str, str]:
    env = dict(os.environ, **stack_env(settings))
    env.pop("BUILDTEL_DEBUG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "buildtel.cli.main", "--nats-url", settings.nats_url or "", "--redis-url",
        settings.redis_url or "", "--namespace", namespace or settings.namespace, "--cache-dir",
        str(settings.cache_dir), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture
async def loaded(settings: Settings, nc, redis_client) -> AsyncIterator[list]:
    """An analyzer and the storage service it reports from, both holding the same 60 sessions."""
    svc = AnalyzerService(settings, settings.nats_url or "", settings.redis_url or "")
    storage = StorageService(settings.with_(fsync=False), settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    await storage.start()
    sessions = _step_history(n=60, at=35, seed=6)
    js = nc.jetstream()
    for s in sessions:
        await js.publish(Subjects(settings.namespace).sessions_completed, encode(s), headers={"Nats-Msg-Id": s.id})
    client = AnalyzerClient(nc, settings.namespace, timeout=5)
    stored = StorageClient(nc, Subjects(settings.namespace))
    for _ in range(200):
        if (await client.stats()).sessions == len(sessions) and (await stored.stats()).sessions == len(sessions):
            break
        await asyncio.sleep(0.05)
    yield sessions
    await storage.stop()
    await svc.stop()


async def test_report_formats(settings, loaded, tmp_path: Path) -> None:
    code, out, err = await _cli(settings, "report", "--last", "20", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    offline = TelemetryAnalyzer().report(loaded[-20:])
    assert doc["sessions"] == 20
    assert doc["duration"]["median_s"] == pytest.approx(offline.duration.median_s)
    assert [t["name"] for t in doc["targets"]] == [t.name for t in offline.targets]

    code, out, _ = await _cli(settings, "report", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert code == 0 and [r["id"] for r in rows] == [s.id for s in loaded]
    code, out, _ = await _cli(settings, "report", "--format", "csv", "--table", "targets")
    assert code == 0 and {r["name"] for r in csv.DictReader(io.StringIO(out, newline=""))} == {"//svc:build",
                                                                                              "//svc:test"}
    code, out, _ = await _cli(settings, "report", "--since", "2026-01-02", "--until", "2026-01-02T12:00Z")
    assert code == 0 and "Builds: 12 " in out  # hourly builds finishing in that half day
    assert "getting slower" in (await _cli(settings, "report"))[1]


async def test_export_and_alerts(settings, loaded, tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    code, _, err = await _cli(settings, "export", "--format", "csv", "-o", str(target))
    assert code == 0, err
    assert len(list(csv.DictReader(io.StringIO(target.read_text(), newline="")))) == 60
    assert len(list(csv.DictReader(io.StringIO((tmp_path / "out.targets.csv").read_text(), newline="")))) == 2
    code, _, _ = await _cli(settings, "export", "--format", "json", "-o", str(tmp_path / "r.json"))
    doc = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and len(doc["session_rows"]) == 60
    code, _, _ = await _cli(settings, "export", "--format", "summary", "-o", str(tmp_path / "r.txt"))
    assert code == 0 and (tmp_path / "r.txt").read_text().startswith("Builds: 60")

    code, out, _ = await _cli(settings, "alerts")
    lines = [x for x in out.strip().splitlines() if not x.startswith(" ")]  # indented: the explanation
    assert code == 0 and len(lines) == 1 and "REGRESSION" in lines[0] and "build" in lines[0]
    assert "    critical path unchanged" in out  # the same two targets held both builds
    code, out, _ = await _cli(settings, "alerts", "--json", "--branch", "main")
    assert json.loads(out.splitlines()[0])["series"] == "build|main"
    code, out, err = await _cli(settings, "alerts", "--branch", "other")
    assert code == 0 and out == "" and "no alerts" in err


async def test_errors_are_one_line(settings, loaded) -> None:
    code, _, err = await _cli(settings, "report", "--since", "yesterday-ish")
    assert code == 2 and err.count("\n") == 1 and "cannot read 'yesterday-ish' as a date" in err
    code, _, err = await _cli(settings, "report", "--last", "0")
    assert code == 2 and "--last must be at least 1" in err
    code, _, err = await _cli(settings, "report", "--timeout", "1", namespace="nobodyhome")
    assert code == 2 and err.startswith("buildtel: error: ") and err.count("\n") == 1 and "analyzer" in err


async def test_wait_for_alerts_collects_new_alerts(settings, nc, redis_client) -> None:
    svc = AnalyzerService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    try:
        bus = SimpleNamespace(js=nc.jetstream(), settings=settings)
        waiter = asyncio.create_task(wait_for_alerts(bus, timeout=30, count=1))
        await asyncio.sleep(0.5)
        for s in _step_history(n=60, at=30, seed=8):
            await bus.js.publish(Subjects(settings.namespace).sessions_completed, encode(s))
        alerts = await waiter
        assert len(alerts) == 1 and alerts[0].kind == "build"
        assert await wait_for_alerts(bus, timeout=0.5) == []
    finally:
        await svc.stop()


def test_parse_when() -> None:
    assert parse_when("2026-01-31") == 1769817600.0
    assert parse_when("2026-01-31T01:00:00+01:00") == 1769817600.0
    assert parse_when("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_when("1769817600") == 1769817600.0
    with pytest.raises(CLIError):
        parse_when("soon")


async def test_alerts_follow_prints_new_alerts(settings, nc, redis_client) -> None:
    svc = AnalyzerService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "buildtel.cli.main", "--nats-url", settings.nats_url or "", "--redis-url",
        settings.redis_url or "", "--namespace", settings.namespace, "alerts", "--follow", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ, **stack_env(settings)))
    try:
        await asyncio.sleep(2.0)  # the CLI is subscribed
        for s in _step_history(n=60, at=30, seed=10):
            await nc.jetstream().publish(Subjects(settings.namespace).sessions_completed, encode(s))
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert json.loads(line)["direction"] == "regression"
    finally:
        proc.terminate()
        await proc.wait()
        await svc.stop()


async def test_report_has_an_alerts_section_with_states(settings, loaded, redis_client) -> None:
    """The report ends with the alerts whose change began in its window, each with its status; an
    acknowledgement shows there at once, and a window that ends before the change has none."""
    from buildtel.shared import alertstate
    from buildtel.shared.keys import Keys

    code, out, err = await _cli(settings, "report", "--json")
    assert code == 0, err
    section = json.loads(out)["alerts"]
    assert section["error"] is None
    [a] = section["alerts"]
    assert a["kind"] == "build" and a["direction"] == "regression" and a["status"] == "open"
    assert a["change_pct"] > 10 and 0 < a["confidence"] <= 1 and a["series"] == "build|main"
    code, out, _ = await _cli(settings, "report")
    assert code == 0 and "Alerts: 1 began in this window (1 open, 0 acknowledged, 0 muted)" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("open"))
    assert "regression" in line and "build (whole build)" in line and f"{a['change_pct']:+.1f}%" in line

    await alertstate.acknowledge(redis_client, Keys(settings.namespace), a["id"], by="test", note="known")
    code, out, _ = await _cli(settings, "report")
    assert code == 0 and "(0 open, 1 acknowledged, 0 muted)" in out
    assert any(x.strip().startswith("acknowledged") for x in out.splitlines())

    before = loaded[30].finish  # hourly builds; the change starts at build 35
    code, out, _ = await _cli(settings, "report", "--until", str(before))
    assert code == 0 and "Alerts: none began in this window" in out
    code, out, _ = await _cli(settings, "report", "--until", str(before), "--json")
    assert json.loads(out)["alerts"]["alerts"] == []

    # Redis away: the report still prints, and says why its alerts section is empty.
    gone = settings.with_(redis_url="redis://127.0.0.1:1/0")
    code, out, err = await _cli(gone, "report")
    assert code == 0, err
    assert "Builds: 60" in out and "Alerts: not shown (alerts could not be read: " in out
    code, out, _ = await _cli(gone, "report", "--json")
    section = json.loads(out)["alerts"]
    assert code == 0 and section["alerts"] == [] and "could not be read" in section["error"]
