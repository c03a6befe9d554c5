"""``buildtel demo`` on the embedded default: the farm's builds are all stored and reported,
including the build three agents shared, and the injected regression raises its alert."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_stores_every_build_and_catches_its_regression(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env["BUILDER_TELEMETRY_CACHE_DIR"] = str(tmp_path / ".builder-cache")
    res = subprocess.run([sys.executable, "-m", "services.cli.main", "demo", "--builds", "18", "--targets", "60"],
                         env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "builds published 18, sessions stored 18" in out
    m = re.search(r"distributed build \w+: 3 agents \(agent-01, agent-02, agent-03\), 60 targets", out)
    assert m, out
    assert "== Analyzer report (last 18 builds) ==" in out and "Builds: 18" in out
    assert re.search(r"regression\s+//src/\S+\s+[\d.]+ s -> [\d.]+ s \(\+\d+%", out), out
    assert "injected regression caught" in out
