"""Capture a :class:`BuildEnvironment` on the agent: machine, user, tools, VCS, redacted env.

Everything here is best effort and bounded in time: a missing ``git`` or a slow
tool never delays the build by more than ``TOOL_TIMEOUT_S`` per probe.
"""

from __future__ import annotations

import getpass
import os
import platform
import socket
import subprocess
from collections.abc import Mapping

from shared.protocol import BuildEnvironment, VcsInfo
from shared.redaction import redact_env, redact_text

TOOL_TIMEOUT_S = 1.0
DEFAULT_TOOLS = ("cc", "gcc", "clang", "make", "ninja", "cmake", "bazel", "go", "cargo", "java")


def _run(args: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(
            args, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def vcs_info(cwd: str) -> VcsInfo | None:
    commit = _run(["git", "rev-parse", "HEAD"], cwd)
    if commit is None:
        return None
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd)
    remote = _run(["git", "remote", "get-url", "origin"], cwd)
    if remote:  # credentials in the URL (user-info, ?token=) must not leave the agent
        remote = redact_text(remote)
    return VcsInfo(commit=commit, branch=branch, dirty=bool(status), remote=remote)


def tool_versions(tools: tuple[str, ...] = DEFAULT_TOOLS) -> dict[str, str]:
    import shutil

    found: dict[str, str] = {}
    for tool in tools:
        if shutil.which(tool) is None:
            continue
        out = _run([tool, "--version"])
        if out:
            found[tool] = out.splitlines()[0][:200]
    return found


def capture(
    cwd: str | None = None,
    environ: Mapping[str, str] | None = None,
    tools: tuple[str, ...] = DEFAULT_TOOLS,
) -> BuildEnvironment:
    """Snapshot this machine for a build started in ``cwd``; ``env`` is redacted here."""
    cwd = cwd or os.getcwd()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return BuildEnvironment(
        os=platform.system(),
        os_release=platform.release(),
        arch=platform.machine(),
        cpus=os.cpu_count() or 0,
        memory_bytes=_memory_bytes(),
        hostname=socket.gethostname(),
        user=user,
        cwd=cwd,
        python=platform.python_version(),
        tool_versions=tool_versions(tools),
        vcs=vcs_info(cwd),
        env=redact_env(os.environ if environ is None else environ),
    )
