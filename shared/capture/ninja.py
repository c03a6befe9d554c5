"""Per-edge targets of a ninja (or ``cmake --build`` with a Ninja generator) run, from the
``.ninja_log`` it appends to while it builds.

ninja appends one line per output of each edge that *succeeded*, right after the
edge finished (``start_ms end_ms mtime output hash``; parsed by the importer's
line parser, ``shared/importers/ninja.py``, see ``docs/importers.md``).  The log
is tailed from the size it had before the build started, so only this run's
edges are read.  Consecutive lines with the same start, end and hash are one
edge (outputs after the first become zero-length ``output:`` phases, as in the
importer); ninja writes them back to back, so an edge is emitted once a poll
adds nothing to it.

Times in the log are milliseconds since ninja's own clock started (after it read
the manifest, which ``buildtel run`` cannot see); that clock is placed on the
wall clock from the first edge: the wall time its ``mtime`` implies (v5: mtime −
end; v6+: mtime − start, see the importer) when it is plausible, else when the
line was read minus its ``end_ms`` (late by at most one poll).  When ``end_ms``
goes backwards ninja restarted its clock (it rebuilt its own manifest, e.g. a
CMake re-configure) and the clock is placed again.

What the log cannot show: edges that failed or were interrupted (never logged),
when an edge *started* before it finished (``target_started`` is emitted together
with ``target_finished``, backdated), and how many edges remain.  Lanes are
assigned from the intervals (``lanes.py``).  ``.ninja_log`` is looked for in the
build directory (``-C`` / ``cmake --build DIR``), or in the ``builddir`` the
manifest declares.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildtel.shared.capture.lanes import LaneAllocator
from buildtel.shared.capture.tail import FileTail

if TYPE_CHECKING:
    from buildtel.shared.importers.ninja import _Entry

NINJA_NAMES = frozenset({"ninja", "ninja-build"})
_HEADER = re.compile(r"# ninja log v(\d{1,4})")  # as the importer's
_BUILDDIR = re.compile(rb"^builddir\s*=\s*(\S[^\r\n]*?)\s*$", re.MULTILINE)
MANIFEST_SCAN_BYTES = 64 * 1024  # builddir is a top-level binding, declared near the top in practice


def is_ninja(argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).name in NINJA_NAMES


def is_cmake_build(argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).name == "cmake" and any(a == "--build" or a.startswith("--build=")
                                                                for a in argv[1:])


def default_jobs() -> int:
    """ninja's own default parallelism (``GuessParallelism`` in ninja.cc)."""
    cpus = os.cpu_count() or 1
    return 2 if cpus <= 1 else 3 if cpus == 2 else cpus + 2


def _jobs(args: list[str], long_names: tuple[str, ...] = ()) -> int | None:
    for i, a in enumerate(args):
        if a == "--":
            break
        for opt in ("-j", *long_names):
            if a == opt and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            if a.startswith(opt) and a[len(opt):].lstrip("=").isdigit() and len(a) > len(opt):
                return int(a[len(opt):].lstrip("="))
    return None


def parse_ninja_args(argv: list[str], cwd: Path) -> tuple[Path, Path, int | None, bool]:
    """(build dir, manifest, jobs, builds) for a ninja command line."""
    d, manifest, builds = cwd, "build.ninja", True
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("-C", "-f", "-t", "-d", "-w", "-j", "-k", "-l") and i + 1 < len(argv):
            val = argv[i + 1]
            i += 1
        elif len(a) > 2 and a[:2] in ("-C", "-f", "-t", "-d", "-w", "-j", "-k", "-l"):
            val = a[2:]
            a = a[:2]
        else:
            val = ""
        if a == "-C":
            d = d / val
        elif a == "-f":
            manifest = val
        elif a in ("-t", "-n", "--version", "-h", "--help"):
            builds = False  # tools and dry runs write no edges
        i += 1
    return d, d / manifest, _jobs(argv[1:]), builds


def ninja_targets(argv: list[str]) -> list[str]:
    """The targets named on a ninja command line (none: its default targets)."""
    out, i = [], 1
    while i < len(argv):
        a = argv[i]
        if a in ("-C", "-f", "-t", "-d", "-w", "-j", "-k", "-l"):
            i += 2
            continue
        if a == "--":
            out.extend(argv[i + 1:])
            break
        if not a.startswith("-"):
            out.append(a)
        i += 1
    return out


def needed_total(invocations: Iterable[tuple[str, Path, list[str]]]) -> int | None:
    """:func:`needed_edges` summed over ninja invocations; None as soon as one cannot say."""
    total = 0
    for exe, cwd, argv in invocations:
        n = needed_edges(exe, cwd, argv)
        if n is None:
            return None
        total += n
    return total


def needed_edges(ninja: str, cwd: Path, argv: list[str], timeout: float = 4.0) -> int | None:
    """How many edges the targets of ``argv`` need, built or not: ninja's own ``-t commands``
    (it reads the manifest only: no log is opened, nothing is rebuilt).  None when it fails."""
    d, manifest, _, _ = parse_ninja_args(argv, cwd)
    cmd = [ninja, "-C", str(d), "-f", str(manifest), "-t", "commands", *ninja_targets(argv)]
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return sum(1 for line in res.stdout.splitlines() if line.strip())


def parse_cmake_args(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[Path, int | None] | None:
    """(build dir, jobs) of ``cmake --build DIR …`` when DIR uses a Ninja generator."""
    d: str | None = None
    for i, a in enumerate(argv):
        if a == "--build" and i + 1 < len(argv):
            d = argv[i + 1]
        elif a.startswith("--build="):
            d = a.partition("=")[2]
    if not d or d.startswith("-"):
        return None
    build = cwd / d
    if not (build / "build.ninja").is_file():
        return None  # not a Ninja generator (or not configured yet)
    native = argv[argv.index("--") + 1:] if "--" in argv else []
    jobs = _jobs(native) or _jobs(argv[1:], ("--parallel",))
    if jobs is None and env.get("CMAKE_BUILD_PARALLEL_LEVEL", "").isdigit():
        jobs = int(env["CMAKE_BUILD_PARALLEL_LEVEL"])
    return build, jobs


def _cmake_make_program(build: Path) -> str | None:
    try:
        with open(build / "CMakeCache.txt", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("CMAKE_MAKE_PROGRAM:"):
                    return line.partition("=")[2].strip() or None
    except OSError:
        return None
    return None


def _cmake_targets(argv: list[str]) -> list[str]:
    out: list[str] = []
    end = argv.index("--") if "--" in argv else len(argv)
    for i, a in enumerate(argv[:end]):
        if a in ("--target", "-t") and i + 1 < end:
            out.append(argv[i + 1])
        elif a.startswith("--target="):
            out.append(a.partition("=")[2])
    return out


def log_dir(build_dir: Path, manifest: Path) -> Path:
    """Where ninja keeps .ninja_log: ``$builddir`` when the manifest sets it, else the build dir."""
    try:
        with open(manifest, "rb") as f:
            head = f.read(MANIFEST_SCAN_BYTES)
    except OSError:
        return build_dir
    m = _BUILDDIR.search(head)
    if not m or b"$" in m.group(1):
        return build_dir
    return build_dir / os.fsdecode(m.group(1))


class NinjaCapture:
    kind = "ninja"

    def __init__(self, build_dir: Path, manifest: Path, jobs: int | None) -> None:
        self.build_dir = build_dir
        self.manifest = manifest
        self.jobs = jobs
        self.log_path = log_dir(build_dir, manifest) / ".ninja_log"
        self.lanes = LaneAllocator()
        self.version = 5
        self.bad_lines = 0
        self.active = False
        self.reason = ""
        self._tail: FileTail | None = None
        self._t0 = 0.0
        self._anchor: float | None = None
        self._last_end = -1
        self._pending: list[_Entry] = []
        self._pending_age = 0
        self._n = 0
        self.edges = 0  # edges read from the log in this run
        # ninja runs to count needed edges for (exe, cwd, argv): up to date = needed - run.
        self.invocations: list[tuple[str, Path, list[str]]] = []

    @property
    def worker_count(self) -> int:
        return self.jobs if self.jobs is not None else default_jobs()

    @classmethod
    def for_argv(cls, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> NinjaCapture | None:
        cwd = cwd or Path.cwd()
        if is_ninja(argv):
            d, manifest, jobs, builds = parse_ninja_args(argv, cwd)
            if not builds:
                return None
            return cls(d, manifest, jobs)
        if is_cmake_build(argv):
            found = parse_cmake_args(argv, cwd, env)
            if found is None:
                return None
            cap = cls(found[0], found[0] / "build.ninja", found[1])
            exe = _cmake_make_program(found[0])
            if exe:  # the ninja cmake runs, for the up-to-date count: `ninja [targets]` in the build dir
                cap.invocations.append((exe, found[0], ["ninja", *_cmake_targets(argv)]))
            return cap
        return None

    @classmethod
    def for_log(cls, log_path: Path, offset: int, t0: float) -> NinjaCapture:
        """A log a ninja of the process tree opened (``tree.py``): read from ``offset``, the size
        it had when ninja opened it, before this run's first line."""
        cap = cls(log_path.parent, log_path.parent / "build.ninja", None)
        cap.log_path, cap._t0, cap.active = log_path, t0, True
        cap._tail = FileTail(log_path, from_end=False, offset=offset)
        cap._read_version()
        return cap

    def _read_version(self) -> None:
        assert self._tail is not None
        m = _HEADER.fullmatch(self._tail.header(64).split(b"\n")[0].decode("ascii", "replace"))
        if m:
            self.version = int(m.group(1))

    def up_to_date(self) -> int | None:
        """Edges the run's ninja invocations needed but did not run (they were up to date), from
        ninja's own ``-t commands``; None when not known."""
        if not self.invocations:
            return None
        needed = needed_total(self.invocations)
        return None if needed is None else max(needed - self.edges, 0)

    def prepare(self, argv: list[str], env: dict[str, str]) -> list[str]:
        self._t0 = time.time()
        self._tail = FileTail(self.log_path, from_end=True)
        exe = shutil.which(argv[0], path=env.get("PATH")) if is_ninja(argv) else None
        if exe:
            self.invocations.append((exe, Path.cwd(), list(argv)))
        m = _HEADER.fullmatch(self._tail.header(64).split(b"\n")[0].decode("ascii", "replace"))
        if m:
            self.version = int(m.group(1))
        self.active = True
        return argv

    def poll(self, *, final: bool = False) -> list[dict[str, Any]]:
        # The importer's line parser, imported after the spawn (the importers package is ~25 ms).
        from buildtel.shared.importers.common import ImportFormatError
        from buildtel.shared.importers.ninja import _parse_entry

        if self._tail is None:
            return []
        out: list[dict[str, Any]] = []
        now = time.time()
        lines = self._tail.poll()
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self._n += 1
            if not line:
                continue
            if line.startswith("#"):
                m = _HEADER.fullmatch(line)
                if m:
                    self.version = int(m.group(1))
                continue
            try:
                e = _parse_entry(line, self._n, self.version)
            except ImportFormatError:
                self.bad_lines += 1
                continue
            p = self._pending
            if p and ((p[0].start, p[0].end, p[0].hash) != (e.start, e.end, e.hash)
                      or any(x.output == e.output for x in p)):
                self._edge(p, now, out)
                p = self._pending = []
            p.append(e)
            self._pending_age = 0
        if self._pending:
            self._pending_age += not lines
            if final or self._pending_age >= 1:
                self._edge(self._pending, now, out)
                self._pending = []
        return out

    def _edge(self, edge: list[_Entry], now: float, out: list[dict[str, Any]]) -> None:
        first = edge[0]
        if self._anchor is None or first.end < self._last_end:  # first edge, or ninja restarted its clock
            self._anchor = self._place(first, now)
        self._last_end = first.end
        start = self._anchor + first.start / 1000.0
        duration = (first.end - first.start) / 1000.0
        lane = self.lanes.assign(start, start + duration)
        worker = self.lanes.name(lane)
        self.edges += 1
        out.append({"event": "target_started", "target": first.output, "worker": worker, "ts": start})
        rec: dict[str, Any] = {"event": "target_finished", "target": first.output, "start": start,
                               "duration_s": duration, "worker": worker, "ts": min(start + duration, now),
                               "kind": "edge"}
        if len(edge) > 1:
            from buildtel.shared.protocol import Phase

            rec["phases"] = [Phase(f"output:{e.output}", 0.0) for e in edge[1:]]
        out.append(rec)

    def _place(self, e: _Entry, now: float) -> float:
        latest = now - e.end / 1000.0  # the line was read after the edge ended
        earliest = self._t0 if self._anchor is None else self._anchor
        if e.est is not None and earliest - 1.0 <= e.est <= latest + 0.5:
            return min(max(e.est, earliest), latest)
        return max(latest, earliest)

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
