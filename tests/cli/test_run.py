"""``buildtel run``: exit codes pass through, the bus being down changes nothing for the build,
and with a bus the session's events carry the command, exit code, CPU time and a redacted env."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from buildtel.cli.cmd_run import run_build
from buildtel.shared.bus import connect_nats
from buildtel.shared.engines import free_port
from buildtel.shared.protocol import BuildFinished, BuildStarted, TargetFinished
from buildtel.shared.redaction import REDACTED
from buildtel.shared.tracemodel import session_span_id
from tests.client.helpers import stream_batches
from tests.util import stack_env

PY = sys.executable


def _buildtel(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "buildtel.cli.main", "run", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[2], check=False)


@pytest.fixture
def dead_bus_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BUILDER_TELEMETRY_NATS_URL=f"nats://127.0.0.1:{free_port()}",
               BUILDER_TELEMETRY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
               BUILDER_TELEMETRY_CACHE_DIR=str(tmp_path / "cache"))
    return env


@pytest.fixture
async def bus_env(settings, nc, tmp_path: Path) -> dict[str, str]:
    from buildtel.shared.bus import ensure_streams
    from buildtel.shared.subjects import Subjects

    # No services run in these tests; they would declare the streams (an agent's role may not).
    await ensure_streams(nc.jetstream(), Subjects(settings.namespace))
    env = dict(os.environ, **stack_env(settings))
    env.update(BUILDER_TELEMETRY_NATS_URL=settings.nats_url, BUILDER_TELEMETRY_REDIS_URL=settings.redis_url,
               BUILDER_TELEMETRY_NAMESPACE=settings.namespace, BUILDER_TELEMETRY_CACHE_DIR=str(tmp_path / "cache"),
               MY_API_TOKEN="abc")
    return env


@pytest.mark.parametrize(("script", "code"), [
    ("pass", 0),
    ("raise SystemExit(3)", 3),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 128 + 15),
])
def test_exit_code_passes_through_with_the_bus_down(dead_bus_env, tmp_path: Path, script: str, code: int) -> None:
    marker = tmp_path / "ran"
    t0 = time.monotonic()
    res = _buildtel(["--", PY, "-c", f"open({str(marker)!r}, 'w').close(); {script}"], dead_bus_env)
    elapsed = time.monotonic() - t0
    assert res.returncode == code, res.stderr
    assert marker.exists()
    warnings = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "telemetry bus unreachable" in warnings[0]
    # Killed by SIGTERM (143) is a stopped build, not a failed one (docs/protocol.md, outcome).
    outcome = {0: "success", 3: "failed", 143: "cancelled"}[code]
    assert re.search(rf"^buildtel: session [0-9a-f]{{32}} {outcome} in [0-9.]+s$", res.stderr, re.MULTILINE)
    assert elapsed < 15  # interpreter start-up and imports under a loaded CI box; no waiting on the bus


def test_bus_down_with_the_stack_unresolvable_still_runs_the_command(tmp_path: Path, settings, capfd) -> None:
    def no_stack() -> str:
        raise RuntimeError("no stack here")

    code = run_build([PY, "-c", "raise SystemExit(5)"], settings, url_resolver=no_stack, lower_priority=False)
    assert code == 5
    err = capfd.readouterr().err
    assert "telemetry bus unreachable (RuntimeError: no stack here)" in err


async def test_session_events_carry_command_exit_code_cpu_and_redacted_env(bus_env, settings, tmp_path: Path) -> None:
    out = tmp_path / "child-env"
    burn = ("import os, time\n"
            f"open({str(out)!r}, 'w')"
            ".write(os.environ['BUILDER_TELEMETRY_SESSION_ID'] + ' ' + os.environ['TRACEPARENT'])\n"
            "t = time.process_time()\n"
            "while time.process_time() - t < 0.4: pass\n"
            "raise SystemExit(3)\n")
    res = _buildtel(["--name", "burn", "--label", "ci=yes", "--label", "team=a=b", "--record", "--",
                     PY, "-c", burn, "--api-token=s3cr3t"], bus_env)
    assert res.returncode == 3, res.stderr
    assert "warning" not in res.stderr
    sid, traceparent = out.read_text().split()
    assert f"buildtel: session {sid} failed in " in res.stderr
    # Tools the build runs join the build's trace under its session span.
    assert traceparent == f"00-{sid}-{session_span_id(sid)}-01"

    nc = await connect_nats(settings, settings.nats_url or "", name="test-reader", role="operator")
    try:
        # BuildStarted, the final health checkpoint (always sent) and BuildFinished.
        batches = await stream_batches(nc.jetstream(), settings, events=3)
    finally:
        await nc.close()
    events = sorted((ev for _, b in batches for ev in b.events), key=lambda e: e.seq)
    # Checkpoints do not wait for BuildStarted (docs/sdk.md): it need not be seq 0.
    started, finished = next(e for e in events if isinstance(e, BuildStarted)), events[-1]
    assert isinstance(finished, BuildFinished)
    assert started.session_id == sid and [e.seq for e in events] == list(range(len(events)))
    assert started.name == "burn" and started.labels == {"ci": "yes", "team": "a=b"} and started.record
    assert started.traceparent is None  # not started under a traced job
    assert started.command == [PY, "-c", burn, f"--api-token={REDACTED}"]
    assert started.environment is not None
    assert started.environment.env["MY_API_TOKEN"] == REDACTED
    assert finished.exit_code == 3
    assert finished.cpu_s is not None and finished.cpu_s >= 0.35
    assert finished.peak_rss_bytes and finished.peak_rss_bytes > 1_000_000
    assert started.ts <= finished.ts


class _FakeSource:
    """A TargetSource: adds a variable for the child and reports two targets."""

    def prepare(self, argv: list[str], env: dict[str, str]) -> list[str]:
        env["FAKE_SOURCE"] = "1"
        return argv

    def targets(self, done: threading.Event):
        yield {"target": "a.o", "start": time.time(), "duration_s": 0.1, "exit_code": 0}
        done.wait(5)
        yield {"target": "app", "start": time.time(), "duration_s": 0.2, "status": "failed", "exit_code": 2}


async def test_a_target_source_reports_between_start_and_finish(settings, nc, bus_env) -> None:
    script = "import os, sys; sys.exit(0 if os.environ.get('FAKE_SOURCE') == '1' else 9)"
    code = run_build([PY, "-c", script], settings, sources=[_FakeSource()], quiet=True, lower_priority=False)
    assert code == 0
    batches = await stream_batches(nc.jetstream(), settings, events=4)
    events = sorted((ev for _, b in batches for ev in b.events), key=lambda e: e.seq)
    # Targets are not held back until BuildStarted (which waits for the environment probes), so
    # BuildStarted may come after them in seq; BuildFinished is always last.
    names = [type(e).__name__ for e in events]
    assert sorted(names[:3]) == ["BuildStarted", "TargetFinished", "TargetFinished"] and names[3] == "BuildFinished"
    targets = [e for e in events if isinstance(e, TargetFinished)]
    assert targets[1].status == "failed"


async def test_a_build_run_under_a_traced_job_joins_its_trace(bus_env, settings, tmp_path: Path) -> None:
    out = tmp_path / "child-env"
    caller = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    env = dict(bus_env, TRACEPARENT=caller)
    res = _buildtel(["--", PY, "-c", f"import os; open({str(out)!r}, 'w').write(os.environ['TRACEPARENT'])"], env)
    assert res.returncode == 0, res.stderr
    # "buildtel: session <id> success in …" (the capture line may come before it)
    sid = next(ln.split()[2] for ln in res.stderr.splitlines() if ln.startswith("buildtel: session "))
    assert out.read_text() == f"00-{'ab' * 16}-{session_span_id(sid, 'ab' * 16)}-01"
    nc = await connect_nats(settings, settings.nats_url or "", name="test-reader", role="operator")
    try:
        batches = await stream_batches(nc.jetstream(), settings, events=2)
    finally:
        await nc.close()
    # The run has ended, so all its batches are stored; the health sampler's may come first.
    started = next(ev for _, b in batches for ev in b.events if isinstance(ev, BuildStarted))
    assert started.traceparent == caller


@pytest.mark.parametrize("code, received, outcome", [
    (0, [], "success"), (2, [], "failed"), (137, [], "failed"), (129, [], "cancelled"), (130, [], "cancelled"),
    (143, [], "cancelled"), (2, [2], "cancelled"), (0, [2], "success")])
def test_run_and_the_importers_share_one_exit_code_rule(code: int, received: list[int], outcome: str) -> None:
    """A build ended by SIGHUP/SIGINT/SIGTERM is cancelled, as `buildtel import` says of the same code;
    137 (a step SIGKILLed, e.g. out of memory) is a failure, not a cancel."""
    from buildtel.cli.run_process import run_outcome
    from buildtel.shared.importers.common import outcome_of_exit_code

    assert run_outcome(code, received) == outcome
    if not received:
        assert outcome_of_exit_code(code) == outcome
