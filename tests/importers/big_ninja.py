"""A generated ``.ninja_log`` of one build with any number of edges (the huge-session tests).

64 parallel jobs, each edge 50-400 ms, written in the order ninja writes them (by end
time), format v5 with an mtime of the edge's end: what a 638,000-edge build's log looks like.
"""

from __future__ import annotations

import heapq
from pathlib import Path

BASE_NS = 1795833144000000000  # the mtime clock of the first edge (ns)


def write_ninja_log(path: Path, edges: int, jobs: int = 64) -> Path:
    free = [(0, j) for j in range(jobs)]
    ends: list[tuple[int, int, int]] = []
    for i in range(edges):
        t, j = heapq.heappop(free)
        d = 50 + (i * 7919) % 350
        ends.append((t + d, t, i))
        heapq.heappush(free, (t + d, j))
    ends.sort()
    with path.open("w") as f:
        f.write("# ninja log v5\n")
        f.writelines(f"{start}\t{end}\t{BASE_NS + end * 1_000_000}\tobj/dir{i % 997}/sub{i % 31}/file_{i}.cc.o\t"
                     f"{(i * 2654435761) & 0xFFFFFFFFFFFFFFFF:x}\n" for end, start, i in ends)
    return path
