"""``buildtel demo`` on the embedded default: the farm's builds are all stored and reported,
including the build three agents shared, and the injected regression raises its alert; the
analyzer's report covers every build and no log line reaches the output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_stores_every_build_and_catches_its_regression(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env["BUILDER_TELEMETRY_CACHE_DIR"] = str(tmp_path / ".builder-cache")
    res = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "demo", "--builds", "18", "--targets", "60"],
                         env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "builds published 18, sessions stored 18" in out
    m = re.search(r"distributed build \w+: 3 agents \(agent-01, agent-02, agent-03\), 60 targets", out)
    assert m, out
    # The analyzer's report covers every build of the demo (it used to print before it had them all).
    assert re.search(r"== Analyzer report \(this demo's 18 builds, branch demo-[0-9a-f]{8}\) ==", out), out
    assert "Builds: 18 from" in out and "INCOMPLETE" not in out
    # ... and agrees with the summary of what storage holds above it.
    stored = re.search(r"outcomes: (\d+) success, (\d+) failed", out)
    analyzed = re.search(r"Outcome: (\d+) succeeded, (\d+) failed", out)
    assert stored and analyzed and stored.groups() == analyzed.groups(), out
    # No log line (JSON or otherwise) in what the user reads; they are in the data directory's demo.log.
    for line in (out + res.stderr).splitlines():
        if line.lstrip().startswith("{"):
            try:
                assert "event" not in json.loads(line), line
            except ValueError:
                pass
        assert '"level":' not in line and "[warning" not in line and "[info" not in line, line
    assert (tmp_path / ".builder-cache" / "demo.log").stat().st_size > 0
    # The dashboard's address, for this demo's builds, and how to keep it running.
    assert re.search(r"Dashboard: http://127\.0\.0\.1:\d+/\?branch=demo-[0-9a-f]{8}", out), out
    assert "'buildtel demo --serve' keeps it" in res.stderr
    assert re.search(r"regression\s+//src/\S+\s+[\d.]+ s -> [\d.]+ s \(\+\d+%", out), out
    assert "injected regression caught" in out
