"""Helpers for the JUnit tests: the CLI as a subprocess against the test's stack, a storage +
collector stack in this process, and a git repository to build in."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from buildtel.shared.settings import Settings
from tests.util import run_cli

REPO = Path(__file__).resolve().parents[2]


async def cli(settings: Settings, *args: str, cwd: Path | None = None, timeout: float = 120) -> tuple[int, str, str]:
    """Run ``buildtel ARGS`` against the test's stack, from the repository (or ``cwd``)."""
    return await run_cli(settings, *args, env_extra={"PYTHONPATH": str(REPO)}, cwd=cwd or REPO, timeout=timeout)


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    """``probe()``'s first truthy answer, polled (the condition is the test's, not a delay)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


def git_repo(path: Path) -> str:
    """A git repository at ``path`` with one commit; its hash."""
    path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "init", "--allow-empty"]):
        subprocess.run(["git", *cmd], cwd=path, env=env, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, check=True, capture_output=True,
                          text=True).stdout.strip()
