"""Imported outcomes end to end: real ninja builds (a compile error, a SIGINT mid-build, a success)
imported by ``buildtel import ninja`` with their output and/or exit code, and without, stored by a
real storage service, listed by ``buildtel sessions --outcome`` and shown by ``buildtel show``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.importers.ninja_runs import project, run
from tests.util import run_cli as cli


async def test_imported_outcomes_are_stored_listed_and_shown(storage: Settings, nc: Any, tmp_path: Path) -> None:
    ok, failed, interrupted = await asyncio.gather(
        asyncio.to_thread(run, project(tmp_path / "ok")),
        asyncio.to_thread(run, project(tmp_path / "failed", bad=True)),
        asyncio.to_thread(run, project(tmp_path / "interrupted", slow=True), interrupt=True))
    assert (ok.exit_code, failed.exit_code, interrupted.exit_code) == (0, 1, 130)
    imports = {
        "failed": [str(failed.log), "--output", str(failed.output), "--exit-code", str(failed.exit_code)],
        "cancelled": [str(interrupted.log), "--exit-code", str(interrupted.exit_code)],
        "success": [str(ok.log), "--output", str(ok.output)],
        "unknown": [str(ok.log)],  # the same log without evidence: another session, outcome unknown
    }
    ids = {}
    for outcome, argv in imports.items():
        code, out, err = await cli(storage, "import", "ninja", *argv, "--json")
        assert code == 0, err
        (s,) = json.loads(out)["files"][0]["sessions"]
        assert (s["state"], s["outcome"]) == ("stored", outcome)
        ids[outcome] = s["id"]
    assert len(set(ids.values())) == 4

    client = StorageClient(nc, Subjects(storage.namespace))
    deadline = time.monotonic() + 30
    while True:  # storage stores what arrives on the stream asynchronously
        try:
            if len(await client.summaries(limit=10)) == 4:
                break
        except StorageError:
            pass
        assert time.monotonic() < deadline, "storage did not store the imported sessions"
        await asyncio.sleep(0.1)

    for outcome, sid in ids.items():
        code, out, err = await cli(storage, "sessions", "--outcome", outcome, "--json")
        assert code == 0, err
        assert [s["id"] for s in json.loads(out)] == [sid], outcome
    code, out, _ = await cli(storage, "sessions")
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert all(f"  {o} " in lines[sid] for o, sid in ids.items())

    code, out, err = await cli(storage, "show", ids["failed"])
    assert code == 0, err
    assert "outcome   failed  exit code 1" in out
    assert "ERRORS of 1 failed target(s)" in out and "\n  obj/bad.o  [code]\n" in out  # a compile error
    diagnostic = next(line for line in failed.output.read_text().splitlines() if "bad.c" in line and "error" in line)
    assert f"    {diagnostic}" in out.splitlines()
    # `show --failures` (and the dashboard, through the same function) shows the imported error text.
    code, out, err = await cli(storage, "show", ids["failed"], "--failures")
    assert code == 0, err
    assert "== obj/bad.o  (exit code 1)" in out and "int broken(void)" in out
    code, out, _ = await cli(storage, "show", ids["unknown"])
    assert "outcome   unknown  exit code -" in out and "ERRORS" not in out
    code, out, _ = await cli(storage, "show", ids["cancelled"], "--json")
    shown = json.loads(out)
    assert (shown["outcome"], shown["exit_code"], shown["labels"]["outcome_evidence"]) == \
        ("cancelled", 130, "exit code 130 (SIGINT)")
