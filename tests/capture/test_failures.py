"""Failed targets keep their output, and the build's console log is kept (docs/failures.md).

Real make and ninja builds through ``buildtel run`` (a subprocess, as a user runs it) with a
collector, storage and the web service on the test NATS and Redis: a compile error, a link error
(undefined reference), a recipe killed by SIGKILL and a failing shell command each leave their
output on the failed target; secrets the build prints are redacted in that output and in the
log; the log is read back by ``buildtel log``, ``buildtel show --failures`` and the API; a log
over ``BUILDER_TELEMETRY_LOG_LIMIT`` keeps its head and tail with a marker.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.service import StorageService
from buildtel.services.web.service import WebService
from buildtel.shared.protocol import BuildSession
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.capture.project import ninja_binary
from tests.util import running, stack_env

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
NINJA = ninja_binary()
SECRET = "abcd1234efgh5678ijkl9012"
GH_TOKEN = "ghp_" + "A1b2C3d4E5" * 4

pytestmark = pytest.mark.timeout(180)

MAKEFILE = f"""\
all: ok.txt bad.o app secret.txt killed.txt shellfail.txt
ok.txt:
\techo fine > ok.txt
bad.o: bad.c
\tcc -c bad.c -o bad.o
app: main.c
\tcc main.c -o app
secret.txt:
\t@echo "AWS_SECRET_ACCESS_KEY={SECRET}"; echo "using token {GH_TOKEN}"; false
killed.txt:
\techo about to die; kill -9 $$$$
shellfail.txt:
\techo checking; test -f /nonexistent/input || (echo "Error: /nonexistent/input is missing" >&2; exit 3)
"""
BAD_C = "int broken(void) { return 1 }\n"
MAIN_C = "int missing_fn(void);\nint main(void) { return missing_fn(); }\n"
NINJA_FILE = """\
rule cc
  command = cc -c $in -o $out
rule link
  command = cc $in -o $out
build bad.o: cc bad.c
build main.o: cc main.c
build app: link main.o
"""


@pytest.fixture
async def services(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[WebService]:
    async with running(*(cls(settings, settings.nats_url or "", settings.redis_url or "")
                         for cls in (CollectorService, StorageService, WebService))) as started:
        yield started[-1]


def _env(settings: Settings, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, **stack_env(settings), BUILDER_TELEMETRY_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO), **extra)
    if NINJA:
        env["PATH"] = f"{Path(NINJA).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


async def _cli(args: list[str], cwd: Path, env: dict[str, str], *,
               merged: bool = False) -> subprocess.CompletedProcess[str]:
    """``merged``: stderr into stdout, as on a terminal or in a CI log (one pipe for the build)."""
    return await asyncio.to_thread(subprocess.run, [PY, "-m", "buildtel.cli.main", *args], cwd=cwd, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                                   text=True, timeout=150, check=False)


async def _build(argv: list[str], cwd: Path, env: dict[str, str], *,
                 merged: bool = False) -> tuple[subprocess.CompletedProcess[str], str]:
    res = await _cli(["run", "--", *argv], cwd, env, merged=merged)
    line = [x for x in (res.stdout if merged else res.stderr).splitlines() if x.startswith("buildtel: session ")][-1]
    return res, line.split()[2]


async def _stored(nc: Any, settings: Settings, sid: str) -> BuildSession:
    client = StorageClient(nc, Subjects(settings.namespace))
    for _ in range(400):  # bounded: the collector completes the session, storage keeps it
        try:
            return await client.get(sid)
        except Exception:  # noqa: BLE001 - not stored yet
            await asyncio.sleep(0.05)
    raise AssertionError(f"session {sid} was not stored")


async def _http(web: WebService, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(web.url + path) as resp:
        return resp.status, resp.content_type, await resp.text()


@pytest.mark.parametrize("merged", [True, False], ids=["one-pipe", "two-pipes"])
async def test_make_failures_keep_their_output(settings, nc, services, tmp_path: Path, merged: bool) -> None:
    """``one-pipe``: stdout and stderr to the same place (a terminal, a CI log): exact order;
    ``two-pipes``: apart, so the order across them is the order read (docs/failures.md)."""
    root = tmp_path / "proj"
    root.mkdir()
    (root / "Makefile").write_text(MAKEFILE)
    (root / "bad.c").write_text(BAD_C)
    (root / "main.c").write_text(MAIN_C)
    env = _env(settings, tmp_path)
    res, sid = await _build(["make", "-k", "-j1"], root, env, merged=merged)
    assert res.returncode == 2, res.stdout  # make's own code passes through
    # The terminal still got the build's output, unchanged, each stream where it belongs (and the
    # secret: it is the user's own console).
    assert "error:" in (res.stdout if merged else res.stderr) and f"AWS_SECRET_ACCESS_KEY={SECRET}" in res.stdout
    assert "buildtel: warning" not in res.stdout + (res.stderr or ""), res.stdout
    s = await _stored(nc, settings, sid)
    failed = {t.name: t for t in s.targets if t.status == "failed"}
    assert set(failed) == {"bad.o", "app", "secret.txt", "killed.txt", "shellfail.txt"}
    assert failed["killed.txt"].exit_code == 137
    out = {f.target: f for f in s.failures}
    assert set(out) == set(failed)
    assert all(f.attributed for f in out.values()), [f.note for f in out.values()]
    text = {k: "\n".join(f.output) for k, f in out.items()}
    # compile error
    assert "bad.c:1:" in text["bad.o"] and "error:" in text["bad.o"] and "cc -c bad.c" in text["bad.o"]
    assert out["bad.o"].errors[0].startswith("bad.c:1:") and out["bad.o"].signature.startswith("bad.c:N:N: error:")
    # link error
    assert "undefined reference to `missing_fn'" in text["app"]
    assert any("undefined reference" in e for e in out["app"].errors)
    assert "missing_fn" in (out["app"].signature or "")
    # SIGKILL and a failing shell command: their output, and make's own word on them
    assert "about to die" in text["killed.txt"] and "Killed" in text["killed.txt"]
    assert "Error: /nonexistent/input is missing" in text["shellfail.txt"]
    assert out["shellfail.txt"].signature == "Error: input is missing"
    if merged:  # one stream in the order written: each failed recipe's lines, none of its neighbours'
        assert text["killed.txt"].splitlines() == ["echo about to die; kill -9 $$", "about to die",
                                                   "make: *** [Makefile:11: killed.txt] Killed"]
        assert all("echo fine" not in t for k, t in text.items() if k != "bad.o")  # the passing recipe's echo
    # secrets redacted in the target's output...
    assert SECRET not in text["secret.txt"] and GH_TOKEN not in text["secret.txt"]
    assert "AWS_SECRET_ACCESS_KEY=[REDACTED]" in text["secret.txt"] and "[REDACTED]" in text["secret.txt"]
    # ...and in the log, which `buildtel log` prints whole
    assert s.log is not None and s.log.object == sid and not s.log.error and s.log.cut_bytes == 0
    log = await _cli(["log", sid], root, env)
    assert log.returncode == 0, log.stderr
    assert SECRET not in log.stdout and GH_TOKEN not in log.stdout and "AWS_SECRET_ACCESS_KEY=[REDACTED]" in log.stdout
    assert "undefined reference to `missing_fn'" in log.stdout and "echo fine > ok.txt" in log.stdout
    assert "make: *** [Makefile:5: bad.o] Error 1" in log.stdout
    one = await _cli(["log", sid, "app", "--json"], root, env)
    assert json.loads(one.stdout)["output"] == out["app"].output
    shown = await _cli(["show", sid, "--failures"], root, env)
    assert shown.returncode == 0, shown.stderr
    assert "== bad.o" in shown.stdout and "error:" in shown.stdout and "about to die" in shown.stdout
    plain = (await _cli(["show", sid], root, env)).stdout  # the plain view says what is kept
    assert f"buildtel show {sid} --failures" in plain and f"buildtel log {sid}" in plain
    doc = json.loads((await _cli(["show", sid, "--failures", "--json"], root, env)).stdout)
    assert [f["target"] for f in doc["failures"]] == [t.name for t in s.targets if t.status == "failed"]
    # the API: the whole log as text, the output in the session's JSON, the page shows it in a <pre>
    status, ctype, body = await _http(services, f"/api/v1/sessions/{sid}/log")
    assert (status, ctype) == (200, "text/plain") and body == log.stdout
    status, _, body = await _http(services, f"/api/v1/sessions/{sid}")
    assert status == 200 and json.loads(body)["failures"][0]["target"] == "bad.o"


async def test_ninja_failures_are_targets_with_output(settings, nc, services, tmp_path: Path) -> None:
    assert NINJA, "ninja: the test extras install it (PyPI package 'ninja')"
    root = tmp_path / "nproj"
    root.mkdir()
    (root / "build.ninja").write_text(NINJA_FILE)
    (root / "bad.c").write_text(BAD_C)
    (root / "main.c").write_text(MAIN_C)
    env = _env(settings, tmp_path)
    res, sid = await _build(["ninja", "-k", "0", "-j2"], root, env)
    assert res.returncode == 1, res.stderr
    s = await _stored(nc, settings, sid)
    # ninja's log has only the edge that succeeded; the failed ones come from its FAILED lines
    assert {t.name: t.status for t in s.targets} == {"main.o": "success", "bad.o": "failed", "app": "failed"}
    out = {f.target: f for f in s.failures}
    assert out["bad.o"].output[0] == "cc -c bad.c -o bad.o" and "error:" in "\n".join(out["bad.o"].output)
    assert "undefined reference to `missing_fn'" in "\n".join(out["app"].output)
    assert out["bad.o"].errors and not out["bad.o"].errors[0].startswith("cc ")
    shown = await _cli(["show", sid, "--failures"], root, env)
    assert "== app" in shown.stdout and "undefined reference" in shown.stdout
    page_status, _, page = await _http(services, f"/sessions/{sid}")  # the dashboard: open without keys
    assert page_status == 200 and '<pre class="output">' in page and "missing_fn" in page
    assert page.index('id="failures-h"') < page.index('id="targets-h"')


async def test_log_over_the_limit_keeps_head_and_tail(settings, nc, services, tmp_path: Path) -> None:
    env = _env(settings, tmp_path, BUILDER_TELEMETRY_LOG_LIMIT="8192")
    script = 'i=0; while [ $i -lt 3000 ]; do echo "line $i of the build"; i=$((i+1)); done; exit 7'
    res, sid = await _build(["sh", "-c", script], tmp_path, env)
    assert res.returncode == 7
    assert res.stdout.splitlines()[-1] == "line 2999 of the build"  # the terminal got all of it
    s = await _stored(nc, settings, sid)
    assert s.log is not None and s.log.cut_bytes > 0 and s.log.kept_bytes == 8192
    assert s.log.bytes == len(res.stdout.encode())
    text = (await _cli(["log", sid], tmp_path, env)).stdout
    lines = text.splitlines()
    assert lines[0] == "line 0 of the build" and lines[-1] == "line 2999 of the build"
    marker = [x for x in lines if x.startswith("[buildtel: ")]
    assert len(marker) == 1 and f"{s.log.cut_bytes} bytes" in marker[0] and "cut here" in marker[0]
    assert len(text.encode()) < 8192 + 300


async def test_no_log_has_no_log(settings, nc, services, tmp_path: Path) -> None:
    env = _env(settings, tmp_path)
    res = await _cli(["run", "--no-log", "--", "sh", "-c", "echo hello; exit 3"], tmp_path, env)
    assert res.returncode == 3 and "hello" in res.stdout
    sid = [x for x in res.stderr.splitlines() if x.startswith("buildtel: session ")][-1].split()[2]
    s = await _stored(nc, settings, sid)
    assert s.log is None and s.failures == []
    status, ctype, body = await _http(services, f"/api/v1/sessions/{sid}/log")
    assert (status, ctype) == (404, "application/problem+json") and "no build log" in body
    res = await _cli(["log", sid], tmp_path, env)
    assert res.returncode == 2 and "no build log" in res.stderr


async def test_a_log_that_cannot_be_stored_does_not_fail_the_build(settings, nc, services, tmp_path: Path) -> None:
    """The logs bucket is gone (and the agent may not declare it): the build's code passes
    through, one warning says so, and the session keeps the failures and why the log is missing."""
    await nc.jetstream().delete_stream(f"OBJ_{Subjects(settings.namespace).logs_bucket}")
    env = _env(settings, tmp_path)
    res, sid = await _build(["sh", "-c", "echo 'src/x.c:3:1: error: nope' >&2; exit 4"], tmp_path, env, merged=True)
    assert res.returncode == 4
    assert "buildtel: warning: build log not stored: " in res.stdout, res.stdout
    s = await _stored(nc, settings, sid)
    assert s.outcome == "failed" and s.log is not None and not s.log.object
    assert s.log.error.startswith("build log not stored: ") and s.log.bytes == len("src/x.c:3:1: error: nope\n")
    status, _, body = await _http(services, f"/api/v1/sessions/{sid}/log")
    assert status == 404 and "build log not stored" in body
