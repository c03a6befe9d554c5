"""Helpers for the storage tests: build realistic BuildSessions.

``reference_session`` is the shape the memory goal is stated for (200 targets,
40 environment variables); tests mostly use smaller ones to stay fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from buildtel.shared.protocol import (
    BuildEnvironment,
    BuildSession,
    Phase,
    SessionTotals,
    TargetMetrics,
    VcsInfo,
    new_session_id,
)

MakeSession = Callable[..., BuildSession]


def build_session(i: int = 0, *, targets: int = 3, env_vars: int = 2, finish: float | None = None,
                  outcome: str = "success", branch: str | None = "main", agents: list[str] | None = None,
                  target_prefix: str = "//pkg:t", session_id: str | None = None) -> BuildSession:
    finish = time.time() - 1000 + i if finish is None else finish
    start = finish - 30.0
    tms = [
        TargetMetrics(name=f"{target_prefix}{j}", start=start + j * 0.01, end=start + j * 0.01 + 0.5, duration_s=0.5,
                      status="success" if outcome == "success" else ("failed" if j == 0 else "success"),
                      cache="local_hit" if j % 3 == 0 else "miss", worker=f"w{j % 8}", agent_id="agent-1",
                      kind="cc_library", mnemonic="CppCompile", cpu_s=0.4, peak_rss_bytes=50_000_000,
                      deps=[f"{target_prefix}{k}" for k in range(max(0, j - 2), j)],
                      phases=[Phase("compile", 0.3), Phase("link", 0.2)])
        for j in range(targets)
    ]
    env = BuildEnvironment(os="linux", os_release="6.1", arch="x86_64", cpus=16, memory_bytes=64 << 30,
                           hostname=f"host-{i % 5}", user="ci", cwd="/src/repo", python="3.11.7",
                           tool_versions={"gcc": "13.2", "make": "4.3"},
                           vcs=VcsInfo(commit=f"{i:040x}", branch=branch, remote="https://git.example/repo.git"),
                           env={f"VAR_{k}": f"value-{k}-{'x' * 20}" for k in range(env_vars)})
    return BuildSession(
        id=session_id or new_session_id(), name=f"build {i}", start=start, finish=finish, duration_s=30.0,
        outcome=outcome, exit_code=0 if outcome == "success" else 1, command=["make", "-j16", "all"],
        labels={"pipeline": "ci", "job": str(i)}, agents=agents if agents is not None else ["agent-1"],
        environment=env, targets=tms, cache_hits=targets // 3, cache_misses=targets - targets // 3,
        cache_hit_rate=(targets // 3) / targets if targets else 0.0,
        totals=SessionTotals(targets=targets, succeeded=targets, target_time_s=0.5 * targets, cpu_s=0.4 * targets,
                             events=targets * 2 + 2),
        cpu_s=0.4 * targets, peak_rss_bytes=50_000_000,
    )


def reference_session(i: int = 0) -> BuildSession:
    return build_session(i, targets=200, env_vars=40)


@pytest.fixture
def make_session() -> MakeSession:
    return build_session
