"""Capture a :class:`BuildEnvironment` on the agent: machine, user, VCS, tools, redacted env.

In two stages, so the facts a farm keys its history on are never lost:

1. :class:`EnvironmentSnapshot` (the constructor) reads machine facts and the
   checkout's commit, branch and remote *before* the build starts, synchronously:
   ``uname``, ``sysconf`` and a few small ``.git`` files (``buildtel.shared.vcs``), well
   under a millisecond.  It also starts ``git status`` (for ``dirty``) without
   waiting for it.
2. :meth:`EnvironmentSnapshot.probe` runs the slow probes (``TOOL --version``,
   each bounded by ``TOOL_TIMEOUT_S``) and collects ``git status``; ``buildtel
   run`` calls it in a low-priority thread while the build runs.

:meth:`EnvironmentSnapshot.result` may be called at any time: whatever has not
answered yet is listed in ``BuildEnvironment.missing_probes`` with the reason
(``tool_versions.gcc``, ``vcs.dirty``, ...), never silently absent, so a diff can
tell "not probed" from "not installed".
"""

from __future__ import annotations

import getpass
import os
import platform
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping

from buildtel.shared.protocol import BuildEnvironment, VcsInfo
from buildtel.shared.vcs import StatusProbe, read_vcs

TOOL_TIMEOUT_S = 1.0
DEFAULT_TOOLS = ("cc", "gcc", "clang", "make", "ninja", "cmake", "bazel", "go", "cargo", "java")


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _tool_version(tool: str, path: str) -> tuple[str | None, str | None]:
    """(first line of ``TOOL --version``, None) or (None, why there is none)."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, errors="replace",
                             timeout=TOOL_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"{tool} --version did not answer within {TOOL_TIMEOUT_S:.1f} s"
    except OSError as exc:
        return None, f"cannot run {tool} --version: {exc.strerror or exc}"
    lines = (out.stdout.strip() or out.stderr.strip()).splitlines()  # some tools print it on stderr
    if out.returncode != 0 or not lines:
        return None, f"{tool} --version failed (exit {out.returncode})"
    return lines[0][:200], None


def vcs_info(cwd: str) -> VcsInfo | None:
    """Commit, branch, remote and dirty of the checkout ``cwd`` is in (None outside one)."""
    read = read_vcs(cwd)
    if read.info is not None and read.dirs is not None:
        read.info.dirty = StatusProbe(read.dirs.worktree).result(wait=True)[0] is True
    return read.info


def tool_versions(tools: tuple[str, ...] = DEFAULT_TOOLS) -> dict[str, str]:
    found: dict[str, str] = {}
    for tool in tools:
        path = shutil.which(tool)
        version = _tool_version(tool, path)[0] if path else None
        if version:
            found[tool] = version
    return found


class EnvironmentSnapshot:
    """A build's environment, captured in stages (see the module docstring); thread-safe."""

    def __init__(self, cwd: str | None = None, environ: Mapping[str, str] | None = None,
                 tools: tuple[str, ...] = DEFAULT_TOOLS) -> None:
        t0 = time.perf_counter()
        self.cwd = cwd or os.getcwd()
        # Redacted in result(), off the build's start path; a copy, since the caller's may change.
        self._environ = dict(os.environ if environ is None else environ)
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = ""
        self._base = BuildEnvironment(
            os=platform.system(), os_release=platform.release(), arch=platform.machine(),
            cpus=os.cpu_count() or 0, memory_bytes=_memory_bytes(), hostname=socket.gethostname(),
            user=user, cwd=self.cwd, python=platform.python_version())
        vcs = read_vcs(self.cwd, self._environ)
        self._vcs, self._missing = vcs.info, dict(vcs.missing)
        self._status = StatusProbe(vcs.dirs.worktree) if vcs.info is not None and vcs.dirs is not None else None
        # Tools to probe: the installed ones (a PATH lookup, no process); one that is not
        # installed is a fact, not a missing probe.
        self._tools = {t: p for t in tools if (p := shutil.which(t, path=self._environ.get("PATH")))}
        self._versions: dict[str, str] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()
        self.fast_s = time.perf_counter() - t0  # what the build's start waited for

    def probe(self, stop: threading.Event | None = None) -> None:
        """The slow probes: tool versions (each bounded), then ``git status`` (bounded).
        ``stop`` set: the result was already taken; the remaining probes are skipped."""
        for tool, path in self._tools.items():
            if stop is not None and stop.is_set():
                return
            version, why = _tool_version(tool, path)
            with self._lock:
                if version is not None:
                    self._versions[tool] = version
                else:
                    self._failed[tool] = why or "no answer"
        if self._status is not None:
            self._status.result(wait=True)

    def close(self) -> None:
        """Stop ``git status`` if it still runs (when :meth:`result` will not be called)."""
        if self._status is not None:
            self._status.result(wait=False)

    def result(self, pending: str = "not probed yet") -> BuildEnvironment:
        """The environment as known now; each probe without an answer is named in
        ``missing_probes``, unanswered ones with ``pending`` as the reason."""
        from buildtel.shared.redaction import redact_env

        with self._lock:
            versions, failed = dict(self._versions), dict(self._failed)
        missing = dict(self._missing)
        for tool in self._tools:
            if tool not in versions:
                missing[f"tool_versions.{tool}"] = failed.get(tool, pending)
        vcs = None
        if self._vcs is not None:
            vcs = VcsInfo(system=self._vcs.system, commit=self._vcs.commit, branch=self._vcs.branch,
                          remote=self._vcs.remote)
            if self._status is not None:
                dirty, why = self._status.result(wait=False)
                vcs.dirty = dirty is True
                if dirty is None:
                    missing["vcs.dirty"] = why or pending
        b = self._base
        return BuildEnvironment(os=b.os, os_release=b.os_release, arch=b.arch, cpus=b.cpus,
                                memory_bytes=b.memory_bytes, hostname=b.hostname, user=b.user, cwd=b.cwd,
                                python=b.python, tool_versions=versions, vcs=vcs,
                                env=redact_env(self._environ), missing_probes=missing)


def capture(
    cwd: str | None = None,
    environ: Mapping[str, str] | None = None,
    tools: tuple[str, ...] = DEFAULT_TOOLS,
) -> BuildEnvironment:
    """Snapshot this machine for a build started in ``cwd``, every probe run to its bound;
    ``env`` is redacted here."""
    snap = EnvironmentSnapshot(cwd, environ, tools)
    snap.probe()
    return snap.result()
