"""Importers that keep what the tools wrote, end to end: ``buildtel`` as a process (where a user runs
it) against real NATS and a real storage service, on real files (``tests/data``, copied from the
shared data) and real ninja runs.

* a build's clang traces merged into one session answer "which headers cost this build most";
* a CMake profile (no wall clock) says where its start came from, and the stored session too;
* ``import ninja --last-build`` imports only the newest build of an appended log;
* an import that pushes the store past its retention count says how many sessions go, first.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.services.storage.service import StorageService
from buildtel.shared.importers.chrome_trace import parse_chrome_trace
from buildtel.shared.importers.common import iso
from buildtel.shared.importers.ninja import parse_ninja_log
from buildtel.shared.phases import HEADER
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.importers.importer_samples import NINJA, TRACE, ninja_builds, ninja_edges
from tests.importers.ninja_runs import project, run
from tests.util import run_cli as cli

CLANG = [TRACE / "clang-zlib-adler32.c.json", TRACE / "clang-zlib-deflate.c.json", TRACE / "clang-registry.cpp.json.gz"]
CMAKE = TRACE / "cmake-zlib-clang-configure.json.gz"
APPENDED = NINJA / "zstd-release-then-incremental.ninja_log"
MAX_SESSIONS = 3


@pytest.fixture
async def storage(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[Settings]:
    quick = settings.with_(fsync=False, max_sessions=MAX_SESSIONS)
    async with StorageService(quick, quick.nats_url or "", quick.redis_url or ""):
        yield quick




async def stored_count(client: StorageClient, want: int) -> None:
    """Wait (generous deadline) until storage holds ``want`` sessions: it stores asynchronously."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if (await client.stats()).sessions == want:
                return
        except StorageError:
            pass
        assert time.monotonic() < deadline, f"storage never held {want} sessions"
        await asyncio.sleep(0.1)


async def test_merged_clang_traces_rank_headers_across_files(storage: Settings, nc: Any) -> None:
    code, out, err = await cli(storage, "import", "chrome-trace", "--merge", *map(str, CLANG), "--json")
    assert code == 0, err
    (s,) = [x for f in json.loads(out)["files"] for x in f["sessions"]]
    assert (s["state"], s["targets"], s["name"]) == ("stored", 3, "clang build (3 compiles)")
    await stored_count(StorageClient(nc, Subjects(storage.namespace)), 1)

    # What the three compiles' header: phases add up to, computed here from each file alone.
    per_file = [parse_chrome_trace(p.read_bytes(), source=str(p)).sessions[0].targets[0] for p in CLANG]
    sums: dict[str, float] = {}
    for t in per_file:
        for p in t.phases:
            if p.name.startswith(HEADER):
                sums[p.name[len(HEADER):]] = sums.get(p.name[len(HEADER):], 0.0) + p.duration_s
    code, out, err = await cli(storage, "show", s["id"], "--headers", "--json", "--top", "5")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["compiles"] == 3 and doc["total_s"] == pytest.approx(sum(sums.values()))
    ranked = sorted(sums.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert [(c["name"], pytest.approx(c["total_s"])) for c in doc["costs"]] == ranked
    assert doc["not_listed"] == len(sums) - 5
    zlib_h = "/home/builder/src/src/zlib/zlib.h"  # included by both zlib files: one row, both counted
    code, out, err = await cli(storage, "show", s["id"], "--headers", "--json", "--top", "1000")
    (row,) = [c for c in json.loads(out)["costs"] if c["name"] == zlib_h]
    assert row["compiles"] == 2 and row["total_s"] == pytest.approx(sums[zlib_h])

    code, out, err = await cli(storage, "show", s["id"], "--templates")
    assert code == 0, err
    assert "templates: " in out and " in 1 compile(s)" in out and "std::" in out  # only the C++ file has any


async def test_cmake_profile_start_comes_from_the_file_or_start(storage: Settings, nc: Any, tmp_path: Path) -> None:
    trace = tmp_path / "profile.json.gz"
    shutil.copy(CMAKE, trace)
    mtime = 1_796_000_000.0
    os.utime(trace, (mtime, mtime))
    duration = parse_chrome_trace(CMAKE.read_bytes(), file_mtime=mtime).sessions[0].duration_s

    code, out, err = await cli(storage, "import", "chrome-trace", str(trace), "--dry-run")
    assert code == 0, err
    assert "no wall clock (CMake profiles record a monotonic clock, not the time of day)" in out
    assert f"its start, {iso(mtime - duration)}, was taken from the file's modification time" in out
    assert "start taken from the file's modification time (the trace has no wall clock)" in out

    code, out, err = await cli(storage, "import", "chrome-trace", str(trace), "--json")
    assert code == 0, err
    doc = json.loads(out)["files"][0]
    assert any("taken from the file's modification time" in w["message"] for w in doc["warnings"])
    await stored_count(StorageClient(nc, Subjects(storage.namespace)), 1)
    # The id is the content's: the same profile with another --start is the session already stored.
    code, out, err = await cli(storage, "import", "chrome-trace", str(trace), "--start", "2026-11-28T02:30:00Z")
    assert code == 0, err
    assert "buildtel: " + str(trace) + ": start 2026-11-28T02:30:00.000Z taken from --start" in err
    assert "no wall clock" not in err and out.startswith("already stored ")
    code, out, err = await cli(storage, "show", doc["sessions"][0]["id"], "--json")
    shown = json.loads(out)
    assert shown["labels"]["time_source"] == "file_mtime"
    assert shown["labels"]["start_from"] == "the file's modification time (the trace has no wall clock)"
    assert shown["start"] == pytest.approx(mtime - duration)


async def test_last_build_of_a_real_appended_log(storage: Settings, tmp_path: Path) -> None:
    root = project(tmp_path / "p")
    first = await asyncio.to_thread(run, root)
    later = time.time() + 5  # a source newer than its object: the second run rebuilds that edge only
    os.utime(root / "src" / "u0.c", (later, later))
    second = await asyncio.to_thread(run, root)
    assert (first.exit_code, second.exit_code) == (0, 0)
    assert "[1/1]" in second.output.read_text()
    log = str(root / ".ninja_log")

    code, out, err = await cli(storage, "import", "ninja", log, "--dry-run", "--json")
    whole = json.loads(out)["files"][0]["sessions"]
    assert len(whole) == 2
    code, out, err = await cli(storage, "import", "ninja", log, "--last-build", "--dry-run", "--json")
    assert code == 0, err
    doc = json.loads(out)["files"][0]
    (last,) = doc["sessions"]
    assert last["id"] == whole[1]["id"] and last["targets"] == 1  # obj/u0.o, the newest build's one edge
    assert doc["details"]["builds_skipped"] == 1

    # The shared data's appended zstd log: release build then an incremental one.
    edges = [ninja_edges(b) for b in ninja_builds(APPENDED)]
    code, out, err = await cli(storage, "import", "ninja", str(APPENDED), "--last-build", "--dry-run")
    assert code == 0, err
    assert (f"--last-build: importing the newest only, 1 earlier build(s) with {len(ninja_builds(APPENDED)[0])} "
            "entries left out") in out
    assert f": {len(edges[1])} targets ({len(edges[1])} ok" in out and "ninja build 2/2" in out
    assert "ninja build 1/2" not in out


async def test_import_says_how_many_sessions_it_evicts(storage: Settings, nc: Any, tmp_path: Path) -> None:
    client = StorageClient(nc, Subjects(storage.namespace))
    code, out, err = await cli(storage, "import", "ninja", str(APPENDED))  # 2 sessions (2026-11-28T02:26)
    assert code == 0, err
    assert "retention: the store holds 0 of at most 3 sessions" in err and "evicts no session" in err
    await stored_count(client, 2)
    older, newer = parse_ninja_log(APPENDED.read_bytes()).sessions

    # Two clang compiles of 02:32 on top of 2 stored, 3 kept: the oldest stored one (build 1) goes.
    args = ["import", "chrome-trace", *map(str, CLANG[:2])]
    code, out, err = await cli(storage, *args, "--dry-run")
    assert code == 0, err
    assert "retention: the store holds 2 of at most 3 sessions (BUILDER_TELEMETRY_MAX_SESSIONS); 2 of the " \
           "imported session(s) are new" in out
    assert "storing them will evict 1 session(s), oldest first: 1 of the stored sessions" in out
    code, out, err = await cli(storage, *args, "--dry-run", "--json")
    assert json.loads(out)["retention"] == {"stored": 2, "max_sessions": 3, "new": 2, "evicts": 1,
                                            "evicts_imported": 0, "expired_imported": 0, "retention_days": 90.0}
    code, out, err = await cli(storage, "import", "chrome-trace", str(CMAKE), "--dry-run",
                               "--start", "2026-11-01T00:00:00Z")
    assert "storing them evicts no session" in out  # 2 + 1 = 3: still within the count

    code, out, err = await cli(storage, *args)
    assert code == 0, err
    assert "buildtel: retention: storing them will evict 1 session(s), oldest first: 1 of the stored sessions" in err
    await stored_count(client, MAX_SESSIONS)
    deadline = time.monotonic() + 60
    while await client.exists(older.id):  # the retention loop drops it soon after
        assert time.monotonic() < deadline, "storage kept more than its retention count"
        await asyncio.sleep(0.1)
    assert await client.exists(newer.id)

    # An import older than everything stored is itself the one that goes, and says so.
    code, out, err = await cli(storage, "import", "chrome-trace", str(CMAKE), "--dry-run",
                               "--start", "2026-11-01T00:00:00Z")
    assert "storing them will evict 1 session(s), oldest first: 0 of the stored sessions and 1 of the " \
           "imported ones (older than every session kept)" in out
