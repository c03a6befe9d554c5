"""Per-target capture of make and ninja wherever they run in the command's process tree: under
``sh -c``, a script, ``cmake --build`` or a recursive make.

``buildtel run`` starts the command with the capture library (``preload.py``) in
``LD_PRELOAD``.  Every process of the tree loads it and inherits it; it records
nothing except in processes whose executable is make or ninja:

* **make** writes an ``M`` line when it starts and ``S``/``F`` lines per recipe line,
  exactly as for ``buildtel run -- make`` (``make.py``).  The target name reaches
  recipes through ``MAKEFILES`` (a makefile of one line, ``export BUILDTEL_TARGET =
  $@``, that GNU make reads before the project's and passes on to sub-makes).
* **ninja** writes an ``N`` line when it starts (its executable, cwd and argv) and an
  ``L`` line when it opens its ``.ninja_log`` for appending (path, and the size then:
  where this run's lines start, however late the parent reads it).  Each log is then
  tailed like ``buildtel run -- ninja`` (``ninja.py``).

make and ninja hand the library on only to children that may start a build tool (a
word naming make, cmake or ninja in their argv, e.g. ``$(MAKE) -C sub``): compilers
run without it.  Lines of one file, in the order processes wrote them; one lane
allocator for the whole tree, so make recipes and ninja edges never share a lane at
the same time.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from buildtel.shared.capture.lanes import LaneAllocator
from buildtel.shared.capture.make import MakeCapture
from buildtel.shared.capture.ninja import NinjaCapture
from buildtel.shared.capture.preload import preload_path
from buildtel.shared.capture.shellwrap import TARGET_VAR
from buildtel.shared.capture.tail import FileTail

# CMake's try_compile builds projects of its own while configuring (CMakeFiles/CMakeScratch or
# CMakeTmp): they are not the user's targets, so their edges and recipes are counted, not reported.
_SCRATCH = ("/CMakeFiles/CMakeScratch/", "/CMakeFiles/CMakeTmp/")


def _scratch(path: str) -> bool:
    return any(s in path + "/" for s in _SCRATCH)


class TreeCapture:
    kind = "tree"

    def __init__(self, cache_dir: Path, *, jobs: int | None = None) -> None:
        self.cache_dir = cache_dir
        self.jobs = jobs
        self.active = False
        self.reason = ""
        self.lanes = LaneAllocator()
        self.make = MakeCapture(cache_dir)
        self.make.lanes = self.lanes
        self.ninjas: dict[Path, NinjaCapture] = {}
        self.ninja_runs = 0  # ninja processes seen (N lines)
        self.scratch = 0  # try_compile builds of CMake seen and left out
        self._scratch_pids: set[bytes] = set()
        self._pending_invocations: list[tuple[str, Path, list[str]]] = []
        self._tmp: Path | None = None
        self._tail: FileTail | None = None
        self.bad_lines = 0
        self.t0 = time.time()  # the spawn: no edge of this run began before it

    @property
    def worker_count(self) -> int:
        return self.jobs or 0  # unknown until the tools start: utilisation is then not computed

    @property
    def running(self) -> int:
        return self.make.running

    def prepare(self, argv: list[str], env: dict[str, str]) -> list[str]:
        lib = preload_path(self.cache_dir)
        if lib is None:
            self.reason = "no C compiler to build the capture library"
            return argv
        if any(c.isspace() for c in str(lib)) or ":" in str(lib):
            self.reason = f"a blank or ':' in the capture library's path {lib}"
            return argv
        self._tmp = Path(tempfile.mkdtemp(prefix="buildtel-tree-"))
        events, mk = self._tmp / "events", self._tmp / "target.mk"
        events.touch()
        mk.write_text(f"# buildtel run: name each recipe's target (shared/capture/tree.py)\nexport {TARGET_VAR} = $@\n")
        orig = env.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{lib} {orig}".strip()
        env["BUILDTEL_CAPTURE_EVENTS"] = str(events)
        if orig:
            env["BUILDTEL_ORIG_LD_PRELOAD"] = orig
        env["MAKEFILES"] = f"{env['MAKEFILES']} {mk}" if env.get("MAKEFILES") else str(mk)
        self._tail = FileTail(events, from_end=False)
        self.t0 = time.time()
        self.active = True
        return argv

    def poll(self, *, final: bool = False) -> list[dict[str, Any]]:
        if self._tail is None:
            return []
        make_lines: list[bytes] = []
        for line in self._tail.poll():
            try:
                self._line(line, make_lines)
            except (ValueError, IndexError):
                self.bad_lines += 1
        out = self.make.feed(make_lines, final=final)
        for cap in self.ninjas.values():
            out.extend(cap.poll(final=final))
        return out

    def _line(self, line: bytes, make_lines: list[bytes]) -> None:
        kind = line[:2]
        if kind == b"M\t":
            _, pid, _ppid, _start, cwd_b = line.split(b"\t", 4)
            if _scratch(cwd_b.decode("utf-8", "replace")):
                self._scratch_pids.add(pid)
                self.scratch += 1
                return
        elif kind in (b"S\t", b"F\t"):
            if line.split(b"\t", 3)[2] in self._scratch_pids:
                return
        elif kind == b"N\t":
            _, pid, _ppid, _start, exe, cwd_b, args = line.split(b"\t", 6)
            cwd = cwd_b.decode("utf-8", "replace")
            argv = [a.decode("utf-8", "replace") for a in args.split(b"\x1f")]
            if _scratch(cwd):
                self._scratch_pids.add(pid)
                self.scratch += 1
                return
            from buildtel.shared.capture.ninja import parse_ninja_args

            if parse_ninja_args(argv, Path(cwd))[3]:  # not a tool (cmake runs -t recompact/restat)
                self.ninja_runs += 1
                self._invocation(exe.decode("utf-8", "replace"), Path(cwd), argv)
            return
        elif kind == b"L\t":
            _, pid, size, path_b = line.split(b"\t", 3)
            path = Path(path_b.decode("utf-8", "replace"))
            if pid in self._scratch_pids or path in self.ninjas:
                return  # a second ninja (or a manifest rebuild) on a log already followed
            cap = NinjaCapture.for_log(path, int(size), self.t0)
            cap.lanes = self.lanes
            self.ninjas[path] = cap
            self._claim_invocations()
            return
        make_lines.append(line)

    def _invocation(self, exe: str, cwd: Path, argv: list[str]) -> None:
        self._pending_invocations.append((exe, cwd, argv))
        self._claim_invocations()

    def _claim_invocations(self) -> None:
        """Attach each ninja run to the log it writes (computed like ``buildtel run -- ninja``)."""
        from buildtel.shared.capture.ninja import log_dir, parse_ninja_args

        left = []
        for exe, cwd, argv in self._pending_invocations:
            d, manifest, _, builds = parse_ninja_args(argv, cwd)
            if not builds:
                continue
            log = (log_dir(d, manifest) / ".ninja_log").resolve()
            cap = next((c for p, c in self.ninjas.items() if p.resolve() == log), None)
            if cap is None:
                left.append((exe, cwd, argv))
            else:
                cap.invocations.append((exe, cwd, argv))
        self._pending_invocations = left

    # -- the end of the run -------------------------------------------------------------------
    def up_to_date(self) -> int | None:
        """Edges ninja needed but did not run; None when not known (a make ran, or ninja could
        not say)."""
        if self.make.makes or not self.ninja_runs:
            return None
        from buildtel.shared.capture.ninja import needed_total

        # A ninja with nothing to do never opens its log for writing: count it on its own.
        total = needed_total(self._pending_invocations)
        if total is None:
            return None
        for cap in self.ninjas.values():
            n = cap.up_to_date()
            if n is None:
                return None
            total += n
        return total

    @property
    def targets(self) -> int:
        return self.make.recipes + sum(c.edges for c in self.ninjas.values())

    def tools(self) -> str:
        seen = []
        if self.make.makes:
            seen.append(f"make ×{self.make.makes}" if self.make.makes > 1 else "make")
        if self.ninja_runs:
            seen.append(f"ninja ×{self.ninja_runs}" if self.ninja_runs > 1 else "ninja")
        return ", ".join(seen)

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
        for cap in self.ninjas.values():
            cap.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._tmp)
            self._tmp = None
