"""Failure classes and groups of real builds (docs/failures.md "Failure classes").

Real ``buildtel run`` make builds (subprocesses, as a user runs them) of a git checkout, with a
collector, storage and the web service on the test NATS and Redis, all with a farm's rules file
(``BUILDER_TELEMETRY_FAILURE_RULES``): a compiler error is ``code``, a recipe killed by SIGKILL
and one that prints ENOSPC's text are ``infra``, a farm rule reclassifies an error no built-in
rule knows, and a target that failed and then passed on the same commit is ``flaky``; two builds
group by signature in ``buildtel failures`` and ``GET /api/v1/failures``.  A ^C'd build is
stored as cancelled.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.service import StorageService
from buildtel.services.web.service import WebService
from buildtel.shared.failclass import Evidence, classify
from buildtel.shared.protocol import BuildSession
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.capture.test_failures import BAD_C, PY, REPO, _build, _cli
from tests.util import running, stack_env

pytestmark = pytest.mark.timeout(240)

MAKEFILE = """\
all: bad.o killed.txt nospace.txt mirror.txt flaky.txt
bad.o: bad.c
\tcc -c bad.c -o bad.o
killed.txt:
\techo about to die; kill -9 $$$$
nospace.txt:
\techo writing; echo "cp: error writing 'out/big.bin': No space left on device" >&2; exit 1
mirror.txt:
\techo fetching; echo "fetch: artifact mirror returned 503" >&2; exit 1
flaky.txt:
\ttest -f pass-now || (echo "AssertionError: expected 1 but got 2" >&2; exit 1)
"""
RULES = """\
[[rule]]
name = "mirror"
class = "infra"
pattern = "artifact mirror returned 50[0-9]"
"""
MIRROR = "fetch: artifact mirror returned 503"


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "failure-rules.toml"
    path.write_text(RULES)
    return path


@pytest.fixture
async def web(settings: Settings, nc: Any, redis_client: Any, rules_file: Path) -> AsyncIterator[WebService]:
    farm = settings.with_(failure_rules=rules_file)  # the farm's rules where failures are classified
    async with running(*(cls(farm, farm.nats_url or "", farm.redis_url or "")
                         for cls in (CollectorService, StorageService, WebService))) as started:
        yield started[-1]


def _env(settings: Settings, tmp_path: Path, rules: Path) -> dict[str, str]:
    return dict(os.environ, **stack_env(settings), BUILDER_TELEMETRY_CACHE_DIR=str(tmp_path / "cache"),
                BUILDER_TELEMETRY_FAILURE_RULES=str(rules), PYTHONPATH=str(REPO))


async def _stored(nc: Any, settings: Settings, sid: str) -> BuildSession:
    """The session once stored: a generous deadline (the collector's grace, storage's fetch, a loaded machine)."""
    client = StorageClient(nc, Subjects(settings.namespace))
    deadline = time.monotonic() + 120
    while True:
        try:
            return await client.get(sid)
        except Exception:  # noqa: BLE001 - not stored yet
            assert time.monotonic() < deadline, f"session {sid} was not stored"
            await asyncio.sleep(0.1)


def _checkout(root: Path) -> None:
    root.mkdir()
    (root / "Makefile").write_text(MAKEFILE)
    (root / "bad.c").write_text(BAD_C)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for cmd in (["init", "-q"], ["add", "Makefile", "bad.c"], ["commit", "-q", "-m", "one commit"]):
        subprocess.run([*git, *cmd], cwd=root, check=True, capture_output=True)


async def _get(web: WebService, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(web.url + path) as resp:
        return resp.status, resp.content_type, await resp.text()


async def test_classes_of_real_failures_and_their_groups_across_builds(settings, nc, web, tmp_path: Path,
                                                                       rules_file: Path) -> None:
    root = tmp_path / "proj"
    _checkout(root)
    env = _env(settings, tmp_path, rules_file)
    res, first = await _build(["make", "-k", "-j1"], root, env)
    assert res.returncode == 2, res.stderr
    s = await _stored(nc, settings, first)
    assert s.environment is not None and s.environment.vcs is not None and s.environment.vcs.commit
    by = {f.target: f for f in s.failures}
    assert {t: (f.failure_class, f.class_rule) for t, f in by.items()} == {
        "bad.o": ("code", "compiler"), "killed.txt": ("infra", "signal"), "nospace.txt": ("infra", "no-space"),
        "mirror.txt": ("infra", "farm:mirror"), "flaky.txt": ("code", "test-assertion")}
    assert by["killed.txt"].exit_code == 137
    sig = by["bad.o"].signature  # gcc quotes with ' or ‘’ by locale
    assert sig is not None and sig.startswith("bad.c:N:N: error: expected ") and sig.endswith(" token")
    assert classify(Evidence(text=MIRROR, exit_code=1)) == ("unknown", "")  # the farm's rule made it infra
    shown = await _cli(["show", first, "--failures"], root, env)
    assert "class      infra (rule farm:mirror)" in shown.stdout and "class      code (rule compiler)" in shown.stdout

    (root / "pass-now").write_text("")  # the same commit: flaky.txt passes this time
    res, second = await _build(["make", "-k", "-j1"], root, env)
    assert res.returncode == 2, res.stderr
    s2 = await _stored(nc, settings, second)
    assert {t.name: t.status for t in s2.targets}["flaky.txt"] == "success"

    out = await _cli(["failures", "--json"], root, env)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    groups = {tuple(g["targets"]): g for g in reply["groups"]}
    assert reply["sessions_read"] == 2 and reply["failures_total"] == 9
    bad = groups[("bad.o",)]
    assert (bad["failure_class"], bad["count"], bad["sessions"], bad["example_sessions"]) == (
        "code", 2, 2, [second, first])
    assert groups[("nospace.txt",)]["signature"] == "cp: error writing 'big.bin': No space left on device"
    assert bad["signature"] == sig
    assert bad["first_seen"] < bad["last_seen"] and "error: expected " in bad["example_error"]
    assert {t: (g["failure_class"], g["count"]) for (t,), g in groups.items() if t != "bad.o"} == {
        "killed.txt": ("infra", 2), "nospace.txt": ("infra", 2), "mirror.txt": ("infra", 2),
        "flaky.txt": ("flaky", 1)}  # failed, then passed on the same commit
    assert groups[("mirror.txt",)]["class_rule"] == "farm:mirror"

    text = await _cli(["failures", "--class", "infra"], root, env)
    assert text.returncode == 0, text.stderr
    rows = [line for line in text.stdout.splitlines()[1:] if "e.g. build" not in line]
    assert len(rows) == 3 and all(" infra " in r for r in rows), text.stdout
    assert "No space left on device" in text.stdout and "3 of 5 group(s)" in text.stderr

    status, _, body = await _get(web, "/api/v1/failures?class=flaky")
    assert status == 200, body
    (flaky,) = json.loads(body)["groups"]
    assert flaky["targets"] == ["flaky.txt"] and flaky["example_sessions"] == [first]
    status, ctype, body = await _get(web, "/api/v1/failures?class=broken")
    assert (status, ctype) == (400, "application/problem+json") and "class" in body
    status, _, page = await _get(web, f"/sessions/{first}")
    assert status == 200 and 'id="failure-classes"' in page
    assert 'class="badge fc-infra"' in page and "bad.c:N:N: error: expected" in page


async def test_a_build_stopped_by_ctrl_c_is_stored_cancelled(settings, nc, web, tmp_path: Path,
                                                             rules_file: Path) -> None:
    root = tmp_path / "slow"
    root.mkdir()
    (root / "Makefile").write_text("slow:\n\techo started; sleep 120\n")
    env = _env(settings, tmp_path, rules_file)
    # A terminal's ^C goes to the whole foreground process group: buildtel run and the build.
    proc = subprocess.Popen([PY, "-m", "buildtel.cli.main", "run", "--", "make"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    started = threading.Event()
    errs: list[str] = []

    def watch() -> None:  # the only reader of its stdout
        assert proc.stdout is not None
        for out_line in proc.stdout:
            if out_line.strip() == "started":
                started.set()

    def collect() -> None:
        assert proc.stderr is not None
        errs.extend(proc.stderr)

    readers = [threading.Thread(target=f, daemon=True) for f in (watch, collect)]
    for t in readers:
        t.start()
    try:
        assert await asyncio.to_thread(started.wait, 120), "the recipe never started"
        os.killpg(proc.pid, signal.SIGINT)
        try:
            await asyncio.to_thread(proc.wait, 180)
        except subprocess.TimeoutExpired:
            ps = subprocess.run(["ps", "-o", "pid,stat,etime,args", "-g", str(proc.pid)], capture_output=True,
                                text=True, check=False).stdout
            raise AssertionError(f"buildtel run still running 180 s after ^C:\n{ps}\n{''.join(errs)}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for t in readers:
            t.join(30)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    err = "".join(errs)
    assert proc.returncode in (2, 130), err  # make's code passes through
    line = [x for x in err.splitlines() if x.startswith("buildtel: session ")][-1]
    assert " cancelled in " in line, err
    s = await _stored(nc, settings, line.split()[2])
    assert (s.outcome, s.exit_code) == ("cancelled", proc.returncode)
    shown = await _cli(["sessions", "--outcome", "cancelled", "--json"], root, env)
    assert [x["id"] for x in json.loads(shown.stdout)] == [s.id]


async def test_a_session_stored_by_an_older_version_still_shows_its_failures(settings, nc, web, tmp_path: Path,
                                                                            rules_file: Path) -> None:
    # The bytes an older version stored: an importer's text in TargetMetrics.error (the array's last
    # element) and a `buildtel run` record without class, exit code or source; nothing of the new fields.
    sid = "c" * 32
    target = ["imp.o", 1.0, 2.0, 1.0, "failed", "miss", "", "a", 1, None, None, None, None, 1, [], [],
              "FAILED: imp.o\ncc -c imp.c\n/src/imp.c:3:1: error: unknown type name 'x'"]
    old = {"type": "session", "id": sid, "name": "old build", "start": 1.0, "finish": 9.0, "duration_s": 8.0,
           "outcome": "failed", "exit_code": 2,
           "targets": [target, ["run.o", 2.0, 3.0, 1.0, "failed", "miss", "", "a", 137]],
           "failures": [{"target": "run.o", "output": ["about to die", "make: *** [Makefile:5: run.o] Killed"],
                         "errors": ["make: *** [Makefile:5: run.o] Killed"],
                         "signature": "make: *** [Makefile:N: run.o] Killed"}]}
    await nc.jetstream().publish(Subjects(settings.namespace).sessions_completed, msgspec.msgpack.encode(old),
                                 headers={"Nats-Msg-Id": sid})
    await _stored(nc, settings, sid)
    env = _env(settings, tmp_path, rules_file)
    shown = await _cli(["show", sid, "--failures", "--json"], tmp_path, env)
    assert shown.returncode == 0, shown.stderr
    rows = {r["target"]: r for r in json.loads(shown.stdout)["failures"]}
    assert (rows["imp.o"]["failure_class"], rows["imp.o"]["source"], rows["imp.o"]["signature"]) == (
        "code", "import", "imp.c:N:N: error: unknown type name 'x'")
    assert (rows["run.o"]["failure_class"], rows["run.o"]["exit_code"]) == ("infra", 137)
    assert rows["run.o"]["output"] == ["about to die", "make: *** [Makefile:5: run.o] Killed"]
    for target in ("imp.o", "run.o"):  # `buildtel log ID TARGET` gives the same classified records
        one = await _cli(["log", sid, target, "--json"], tmp_path, env)
        assert one.returncode == 0, one.stderr
        assert json.loads(one.stdout) == {"session_id": sid, **rows[target]}
    groups = json.loads((await _cli(["failures", "--json"], tmp_path, env)).stdout)["groups"]
    assert {(g["targets"][0], g["failure_class"], g["example_sessions"][0]) for g in groups} == {
        ("imp.o", "code", sid), ("run.o", "infra", sid)}
    status, _, page = await _get(web, f"/sessions/{sid}")
    assert status == 200 and "unknown type name" in page and 'class="badge fc-infra"' in page
