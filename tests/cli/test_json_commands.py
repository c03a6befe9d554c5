"""``--json`` on run, watch and import: stdout holds JSON only, one document (watch: one object per
line), with the fields docs/cli.md promises.  Real ``buildtel`` subprocesses on the test's NATS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from buildtel.shared.bus import ensure_streams
from buildtel.shared.codec import encode
from buildtel.shared.protocol import HealthCheckpoint, is_session_id
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import run_cli as cli
from tests.util import stack_env

NINJA_LOG = b"# ninja log v5\n0\t120\t1700000000000000000\tobj/a.o\t1f2e\n10\t300\t1700000000000000000\tapp\t3c4d\n"


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(stack_env(settings))
    return env




async def test_run_json_is_the_only_thing_on_stdout(settings: Settings, nc: Any) -> None:
    await ensure_streams(nc.jetstream(), Subjects(settings.namespace))  # an agent cannot declare them
    code, out, err = await cli(settings, "run", "--json", "--no-capture", "--", "sh", "-c", "echo built; exit 3")
    assert code == 3, err
    assert out.count("\n") == 1  # one JSON object; the build's own "built" went to stderr
    doc = json.loads(out)
    assert "built" in err
    sid = doc["session_id"]
    assert is_session_id(sid)
    assert doc == {"session_id": sid, "trace_id": sid, "outcome": "failed", "exit_code": 3,
                   "duration_s": doc["duration_s"], "recorded": True, "show": f"buildtel show {sid}", "url": None}


async def test_watch_json_prints_one_checkpoint_object_per_line(settings: Settings, nc: Any) -> None:
    subjects = Subjects(settings.namespace)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "buildtel.cli.main", "--namespace", settings.namespace, "watch", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(settings))
    sid = "ab" * 16
    try:
        # Core NATS keeps nothing for a late subscriber: publish until watch has printed one.
        line = b""
        deadline = time.monotonic() + 60
        seq = 0
        while not line:
            assert time.monotonic() < deadline, "watch printed nothing"
            cp = HealthCheckpoint(session_id=sid, agent_id="agent-1", seq=seq, ts=time.time(), status="degraded",
                                  reasons=["disk almost full"], completed_tasks=seq)
            await nc.publish(subjects.health(sid), encode(cp))
            await nc.flush()
            seq += 1
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 0.5)  # type: ignore[union-attr]
            except TimeoutError:
                continue
        doc = json.loads(line)
        assert doc["session_id"] == sid and doc["status"] == "degraded" and doc["reasons"] == ["disk almost full"]
        assert "eta_s" in doc and "memory_bytes" in doc  # every field stated, defaults too
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    for extra in rest.decode().splitlines():  # anything printed after is one object per line too
        assert json.loads(extra)["session_id"] == sid


async def test_import_json_dry_run_then_stored_then_already_stored(settings: Settings, nc: Any,
                                                                   tmp_path: Path) -> None:
    log = tmp_path / ".ninja_log"
    log.write_bytes(NINJA_LOG)
    code, out, err = await cli(settings, "import", "ninja", str(log), "--dry-run", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["dry_run"] is True
    (file,) = doc["files"]
    assert file["path"] == str(log) and file["format"] == "ninja"
    (session,) = file["sessions"]
    assert session["state"] == "parsed" and session["targets"] == 2
    await ensure_streams(nc.jetstream(), Subjects(settings.namespace))
    for state in ("stored", "already stored"):
        code, out, err = await cli(settings, "import", "ninja", str(log), "--json")
        assert code == 0, err
        stored = json.loads(out)["files"][0]["sessions"][0]
        assert (stored["id"], stored["state"]) == (session["id"], state)
