"""The process side of ``buildtel run`` (``cli/cmd_run.py``): waiting for the command with its
rusage, sampling its process tree's memory, the signals that reach ``buildtel run`` while it
runs, and how the run ended (``run_outcome``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

from buildtel.shared.importers.common import STOPPED_CODES

SAMPLE_INTERVAL_S = 0.25  # process-tree memory sampling; a /proc walk of the tree costs ~30 µs
NICENESS = 10  # the environment probes yield CPU to the build they describe


class TreeSampler(threading.Thread):
    """Peak RSS of the command's process tree, summed over its processes, sampled."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="buildtel-sampler")
        self.pid = pid
        self.peak_rss = 0
        self._stop_ev = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._fast = os.path.exists(f"/proc/{pid}/task/{pid}/children")

    def run(self) -> None:
        interval = 0.05  # the first samples come quickly, so short commands get one too
        while not self._stop_ev.wait(interval):
            try:
                rss = self._sample_proc() if self._fast else self._sample_psutil()
            except Exception:  # noqa: BLE001 - the tree changes under us; next time
                rss = 0
            self.peak_rss = max(self.peak_rss, rss)
            interval = min(interval * 2, SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(1.0)

    def _sample_proc(self) -> int:
        # Linux: walk only our tree via /proc/<pid>/task/<tid>/children; psutil's
        # children() scans every process on the host, which costs more on a busy farm node.
        total, stack = 0, [self.pid]
        while stack:
            pid = stack.pop()
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    total += int(f.read().split()[1]) * self._page
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                        stack.extend(int(c) for c in f.read().split())
            except (OSError, ValueError, IndexError):
                continue  # exited between the listing and the read
        return total

    def _sample_psutil(self) -> int:
        import psutil

        root = psutil.Process(self.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total


def wait_child(proc: subprocess.Popen[bytes]) -> tuple[int, Any]:
    """Wait for the child: (exit code, 128+n for signal n; its rusage or None without wait4).

    wait4's rusage covers the child and every descendant it reaped, and nothing else
    this process ran (RUSAGE_CHILDREN would also count the environment probes).
    """
    if hasattr(os, "wait4"):
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code  # so Popen never waits for it again
    else:  # pragma: no cover - not POSIX
        code, usage = proc.wait(), None
    return (128 - code if code < 0 else code), usage


class SignalGuard:
    """While the command runs: ^C reaches it directly (same process group), so we ignore SIGINT
    rather than die first; SIGTERM/SIGHUP sent to us are passed on.  ``received`` lists the
    signals that came: the build was stopped, not failed (``run_outcome``).  Made before the
    command is spawned (a ^C at once must not kill us first and lose the session); ``pid`` is set
    once it runs (a SIGTERM before that is noted, not forwarded: the command gets none)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in ((signal.SIGINT, self._note), (signal.SIGTERM, self._forward),
                             (signal.SIGHUP, self._forward)):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except (ValueError, OSError, AttributeError):
                continue

    def _note(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)

    def _forward(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signum)
        except OSError:
            pass

    def restore(self) -> None:
        for sig, old in self._previous.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass
        self._previous = {}


def run_outcome(code: int, received: list[int]) -> str:
    """``success``, ``cancelled`` or ``failed``: cancelled when the command did not succeed and
    ``buildtel run`` got SIGINT, SIGTERM or SIGHUP while it ran (^C at a terminal reaches both),
    or the command ended with 129, 130 or 143 (SIGHUP, SIGINT or SIGTERM: the importers' rule,
    ``STOPPED_CODES``; docs/protocol.md)."""
    if code == 0:
        return "success"
    return "cancelled" if received or code in STOPPED_CODES else "failed"


def lower_thread_priority() -> None:
    # Linux applies setpriority to a single thread (and the processes it spawns): the
    # environment probes (git, cc --version, ...) run while the build does, so they give way
    # to it.  Only this thread: the rest of the wrapper must not be starved on a loaded node
    # when the build ends and the session is flushed.
    if sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
    except (OSError, AttributeError):
        pass
