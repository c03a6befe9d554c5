"""``buildtel run --junit`` and ``buildtel import junit`` end to end: real pytest reports, the
collector folding ``test_results`` events, storage's tests endpoints, ``buildtel tests``."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.service import StorageService
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.junit.stack import cli, eventually, git_repo

# Fails on the 2nd, 4th… run: "one time in two", decided by a counter the test keeps, not by luck.
FLAKY = '''
import pathlib

def test_steady():
    assert True

def test_sometimes():
    counter = pathlib.Path(__file__).with_name("runs.txt")
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    assert n % 2 == 0, "odd run; password=hunter2 token ghp_abcdefghijklmnopqrstuvwxyz0123456789"
'''


@pytest.fixture
async def stack(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[Settings]:
    quick = settings.with_(fsync=False)
    services = [StorageService(quick, quick.nats_url or "", quick.redis_url or ""),
                CollectorService(quick, quick.nats_url or "", quick.redis_url or "")]
    for svc in services:
        await svc.start()
    yield quick
    for svc in reversed(services):
        await svc.stop()


async def _stored(nc: Any, settings: Settings, n: int) -> list[Any]:
    client = StorageClient(nc, Subjects(settings.namespace))

    async def probe() -> list[Any]:
        got = await client.summaries(limit=100)
        return got if len(got) >= n else []

    return await eventually(probe)


async def test_flaky_test_run_through_buildtel_run_is_reported_with_its_rate(stack: Settings, nc: Any,
                                                                              tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "test_flaky.py").write_text(FLAKY)
    commit = git_repo(repo)
    codes = []
    for _ in range(4):
        code, _, err = await cli(stack, "run", "--junit", "build/**/*.xml", "--", sys.executable, "-m", "pytest",
                                 "-q", "-p", "no:cacheprovider", "test_flaky.py", "--junitxml=build/out/report.xml",
                                 cwd=repo)
        codes.append(code)
        assert "junit: 1 report(s), 2 test(s)" in err, err
    assert codes == [0, 1, 0, 1]  # pytest's own exit code, passed through
    sessions = await _stored(nc, stack, 4)
    client = StorageClient(nc, Subjects(stack.namespace))
    full = await client.get(sessions[0].id)
    assert len(full.tests) == 2 and full.environment.vcs.commit == commit

    code, out, err = await cli(stack, "tests", "--flaky", "--json")
    assert code == 0, err
    reply = json.loads(out)
    assert reply["sessions_read"] == 4
    [flaky] = reply["tests"]
    assert flaky["test"] == "test_flaky::test_sometimes"
    assert (flaky["runs"], flaky["passed"], flaky["failed"], flaky["flaky_commits"]) == (4, 2, 2, 1)
    assert flaky["flake_rate"] == 0.5
    assert len(flaky["flaky_sessions"]) == 2 and flaky["last_flake"] is not None

    code, out, _ = await cli(stack, "tests", "--history", "test_flaky::test_sometimes", "--json")
    runs = json.loads(out)["runs"]
    assert [r["outcome"] for r in runs] == ["failed", "passed", "failed", "passed"]  # newest first
    failure = runs[0]["message"]
    assert "odd run" in failure and "hunter2" not in failure and "ghp_" not in failure and "[REDACTED]" in failure

    code, out, _ = await cli(stack, "tests")
    assert code == 0 and "test_flaky::test_steady" in out and "50%" in out


async def test_a_bad_report_never_breaks_the_build(stack: Settings, nc: Any, tmp_path: Path) -> None:
    bad = tmp_path / "reports" / "bad.xml"
    script = f"import pathlib; p = pathlib.Path({str(bad)!r}); p.parent.mkdir(); p.write_text('<testsuite><x'); " \
             "raise SystemExit(3)"
    code, _, err = await cli(stack, "run", "--junit", str(tmp_path / "reports" / "*.xml"), "--", sys.executable, "-c",
                             script, cwd=tmp_path)
    assert code == 3
    assert "buildtel: warning: junit:" in err and "not well-formed XML" in err and "1 report(s) refused" in err
    [s] = await _stored(nc, stack, 1)
    full = await StorageClient(nc, Subjects(stack.namespace)).get(s.id)
    assert full.tests == [] and full.exit_code == 3


async def test_old_reports_are_not_read(stack: Settings, nc: Any, tmp_path: Path) -> None:
    old = tmp_path / "old.xml"
    old.write_text('<testsuite name="s"><testcase name="stale"/></testsuite>')
    import os

    os.utime(old, (1_600_000_000, 1_600_000_000))  # written long before this build
    code, _, err = await cli(stack, "run", "--junit", "*.xml", "--", sys.executable, "-c", "pass", cwd=tmp_path)
    assert code == 0 and "junit:" not in err


async def test_import_junit_stores_one_session_and_refuses_malformed_files_whole(stack: Settings, nc: Any,
                                                                                  tmp_path: Path) -> None:
    a, b, bad = tmp_path / "a.xml", tmp_path / "b.xml", tmp_path / "bad.xml"
    a.write_text('<testsuites><testsuite name="A"><testcase classname="A" name="one" time="0.5"/></testsuite>'
                 '</testsuites>')
    b.write_text('<testsuite name="B"><testcase classname="B" name="two"><error message="boom"/></testcase>'
                 '</testsuite>')
    bad.write_text('<testsuite name="B"><testcase classname="B" name="two">')
    code, _, err = await cli(stack, "import", "junit", str(a), str(bad))
    assert code == 2 and "nothing was imported" in err
    code, out, err = await cli(stack, "import", "junit", "--commit", "c" * 40, str(a), str(b), "--json")
    assert code == 0, err
    [file_a, file_b] = json.loads(out)["files"]
    [sess] = file_a["sessions"]
    assert file_b["sessions"] == [] and sess["tests"] == 2 and sess["outcome"] == "failed"
    [stored] = await _stored(nc, stack, 1)
    assert stored.id == sess["id"]
    full = await StorageClient(nc, Subjects(stack.namespace)).get(stored.id)
    assert [(t.suite, t.name, t.outcome) for t in full.tests] == [("A", "one", "passed"), ("B", "two", "error")]
    code, out, _ = await cli(stack, "import", "junit", "--commit", "c" * 40, str(a), str(b))
    assert code == 0 and out.startswith("already stored")


async def test_100k_cases_import_and_live_run_are_stored_whole_over_the_message_limit(stack: Settings, nc: Any,
                                                                                       tmp_path: Path) -> None:
    from benchmarks.bench_tests import generate
    from buildtel.shared.bigmsg import SESSION_MSG_BYTES
    from buildtel.shared.codec import encode

    report = tmp_path / "big.xml"
    counts = generate(report, 100_000, fail_every=10)  # 10,000 failures with messages: well over 8 MiB
    code, _, err = await cli(stack, "import", "junit", "--commit", "a" * 40, str(report))
    assert code == 0, err
    code, _, err = await cli(stack, "run", "--junit", str(report), "--", sys.executable, "-c",
                             f"import os; os.utime({str(report)!r})", cwd=tmp_path)
    assert code == 0 and "junit: 1 report(s), 100000 test(s)" in err, err
    client = StorageClient(nc, Subjects(stack.namespace))
    for s in await _stored(nc, stack, 2):
        full = await client.get(s.id)
        assert len(full.tests) == 100_000 and full.tests_dropped == 0
        assert sum(t.outcome == "failed" for t in full.tests) == counts["failed"]
        assert len(encode(full)) > SESSION_MSG_BYTES  # so it went through the object store
