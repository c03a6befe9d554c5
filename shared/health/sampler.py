"""What the health checkpoints measure of the machine: the build tree's memory, the host's
memory pressure, and how many commands a given process (ninja) is running.

Linux: a walk of the build's own tree through ``/proc/<pid>/task/<tid>/children``
(tens of microseconds for a ``-j8`` tree; psutil's ``children()`` scans every
process on the host) and ``/proc/meminfo``.  Elsewhere psutil does the same work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class TreeSample:
    rss_bytes: int = 0
    processes: int = 0
    names: dict[int, str] = field(default_factory=dict)  # pid -> comm
    children: dict[int, list[int]] = field(default_factory=dict)

    def running_under(self, name: str) -> int | None:
        """Children of the first process called ``name`` (its running commands), or None."""
        for pid, comm in self.names.items():
            if comm == name:
                return len(self.children.get(pid, ()))
        return None


def sample_tree(root: int, *, names: bool = False) -> TreeSample:
    if os.path.exists(f"/proc/{root}/task"):
        return _sample_proc(root, names)
    return _sample_psutil(root, names)


def _sample_proc(root: int, names: bool) -> TreeSample:
    out = TreeSample()
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                out.rss_bytes += int(f.read().split()[1]) * _PAGE
            kids: list[int] = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    kids.extend(int(c) for c in f.read().split())
            if names:
                with open(f"/proc/{pid}/comm", "rb") as f:
                    out.names[pid] = f.read().decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        out.processes += 1
        out.children[pid] = kids
        stack.extend(kids)
    return out


def _sample_psutil(root: int, names: bool) -> TreeSample:
    import psutil

    out = TreeSample()
    try:
        procs = [psutil.Process(root)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return out
    for p in procs:
        try:
            out.rss_bytes += p.memory_info().rss
            out.children[p.pid] = [c.pid for c in p.children()]
            if names:
                out.names[p.pid] = p.name()
        except psutil.Error:
            continue
        out.processes += 1
    return out


def host_memory_percent() -> float:
    """Share of the host's memory in use (not available to new allocations), in percent."""
    try:
        total = avail = None
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemTotal:"):
                    total = int(line.split()[1])
                elif line.startswith(b"MemAvailable:"):
                    avail = int(line.split()[1])
                if total is not None and avail is not None:
                    return 100.0 * (total - avail) / total if total else 0.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return float(psutil.virtual_memory().percent)
    except Exception:  # noqa: BLE001 - no figure is better than a crash
        return 0.0
