"""Process helpers for ``bench_scale``: service processes, their memory, whole CLI runs under a memory cap.

Memory is read from ``/proc/<pid>/status``: ``VmRSS`` (now) and ``VmHWM`` (peak).  Writing ``5``
to ``/proc/<pid>/clear_refs`` resets a process's peak to its current RSS (Linux >= 4.0, allowed
for the process's owner), so the peak a single request causes is measurable in a long-running
service.  A CLI run's own peak is its rusage (``ru_maxrss``), measured by a small wrapper process (see ``_WRAP``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1024 * 1024


def proc_kb(pid: int, key: str) -> int:
    """``VmRSS``/``VmHWM`` of ``pid`` in kB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss_mb(pid: int) -> float:
    return proc_kb(pid, "VmRSS") / 1024


def hwm_mb(pid: int) -> float:
    return proc_kb(pid, "VmHWM") / 1024


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5", encoding="ascii")
        return True
    except OSError:
        return False


def mem_available_mb() -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def spawn_service(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m <module>`` as its own process, logs (stderr) to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module], env=env, stdout=subprocess.DEVNULL, stderr=out)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class CliRun:
    argv: list[str]
    wall_s: float = 0.0
    returncode: int = 0
    maxrss_mb: float = 0.0  # the CLI process's own peak
    peak_growth_mb: dict[str, float] = field(default_factory=dict)  # watched service: peak - RSS before
    aborted: str = ""  # why the run was stopped early (memory cap), empty when it ran to the end
    stderr_tail: str = ""
    stdout_head: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.aborted

    @property
    def total_mb(self) -> float:
        return self.maxrss_mb + sum(self.peak_growth_mb.values())


# Runs the command and writes "<wall s> <its ru_maxrss kB>" to the file named first.  Why a
# wrapper: on Linux a child's ru_maxrss starts from its parent's peak (exec records the old memory
# map's high-water mark), and this benchmark's own peak (the generated store's index) would hide
# the CLI's; this small interpreter's few MB are the floor instead.
_WRAP = ("import resource, subprocess, sys, time\n"
         "t = time.perf_counter(); rc = subprocess.run(sys.argv[2:]).returncode\n"
         "wall = time.perf_counter() - t\n"
         "open(sys.argv[1], 'w').write(f'{wall} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}')\n"
         "sys.exit(rc)\n")


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its descendants (the wrapper and the CLI it runs)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return sum(rss_mb(q.pid) for q in [p, *p.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0.0


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def run_cli(argv: list[str], env: dict[str, str], watch: dict[str, int], cap_mb: float, out: Path) -> CliRun:
    """Run one whole CLI process; peaks of the ``watch`` processes (name -> pid) measured around it.

    When the CLI plus the watched processes' growth passes ``cap_mb`` the CLI is stopped (SIGTERM)
    and the run marked ``aborted``: a machine shared with others must not be driven out of memory.
    """
    run = CliRun(argv)
    base = {}
    for name, pid in watch.items():
        reset_peak(pid)
        base[name] = rss_mb(pid)
    err = out.with_suffix(".err")
    figures = out.with_suffix(".rusage")
    with open(out, "wb") as so, open(err, "wb") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _WRAP, str(figures), *argv], env=env, stdout=so, stderr=se)
        stop_watch = threading.Event()

        def watcher() -> None:
            while not stop_watch.wait(0.2):
                used = tree_rss_mb(proc.pid) + sum(max(0.0, rss_mb(pid) - base[n]) for n, pid in watch.items())
                if used > cap_mb:
                    after = time.perf_counter() - t0
                    run.aborted = f"memory cap: {used:,.0f} MB > {cap_mb:,.0f} MB after {after:.0f} s"
                    for q in _descendants(proc.pid):
                        q.terminate()
                    return

        th = threading.Thread(target=watcher, daemon=True)
        th.start()
        run.returncode = proc.wait()
        run.wall_s = time.perf_counter() - t0
        stop_watch.set()
        th.join()
    if figures.exists():
        wall, maxrss_kb = figures.read_text().split()
        run.wall_s, run.maxrss_mb = float(wall), int(maxrss_kb) / 1024  # the CLI's own, without the wrapper
    run.peak_growth_mb = {name: max(0.0, hwm_mb(pid) - base[name]) for name, pid in watch.items()}
    run.stderr_tail = err.read_text(errors="replace")[-600:]
    run.stdout_head = out.read_text(errors="replace")[:400]
    return run
