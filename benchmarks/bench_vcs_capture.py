"""What a build's start waits for: the environment's fast stage (docs/sdk.md, ``buildtel run``).

Median of 20 runs in the given repository (default: this one) of
- reading commit, branch and remote from the ``.git`` files (``buildtel.shared.vcs.read_vcs``);
- the whole fast stage, machine facts included, which also starts ``git status``
  (``buildtel.shared.environment.EnvironmentSnapshot``);
- for comparison, ``git status`` to completion and the three ``git`` commands the agent ran before.

Run: ``.venv/bin/python benchmarks/bench_vcs_capture.py [REPO]``
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from buildtel.shared.environment import EnvironmentSnapshot
from buildtel.shared.vcs import read_vcs

RUNS = 20


def _median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.2f} ms"


def main() -> None:
    repo = sys.argv[1] if len(sys.argv) > 1 else "."
    files, fast, status, spawned = [], [], [], []
    for _ in range(RUNS):
        t = time.perf_counter()
        read = read_vcs(repo)
        files.append(time.perf_counter() - t)
        assert read.info is not None and read.info.commit, f"{repo} is not a git checkout with a commit"
        snap = EnvironmentSnapshot(repo)  # the default tools: their PATH lookup is part of it
        fast.append(snap.fast_s)
        t = time.perf_counter()
        snap._status.result(wait=True)  # git status only; the tool probes are not the point here
        status.append(snap.fast_s + time.perf_counter() - t)
        snap.close()
        t = time.perf_counter()
        for args in (["rev-parse", "HEAD"], ["rev-parse", "--abbrev-ref", "HEAD"], ["remote", "get-url", "origin"]):
            subprocess.run(["git", *args], cwd=repo, capture_output=True, check=False)
        spawned.append(time.perf_counter() - t)
    print(f"VCS files (commit, branch, remote): {_median_ms(files)}")
    print(f"fast stage (machine + VCS + start git status): {_median_ms(fast)}")
    print(f"... until git status finished: {_median_ms(status)}")
    print(f"three git commands, as before: {_median_ms(spawned)}")


if __name__ == "__main__":
    main()
