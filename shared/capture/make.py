"""Per-recipe targets of a GNU make run: make's own children, timed from inside make or by a
SHELL wrapper.

**Preload** (preferred: a dynamically linked GNU make that spawns with
``posix_spawn``, i.e. glibc builds of make 4.x): make runs with
``LD_PRELOAD=libbuildtel-make.so`` (``shellwrap.PRELOAD_SOURCE``), which wraps
make's ``posix_spawn`` and ``waitpid``/``wait``/``wait3``: every child make starts
with ``BUILDTEL_TARGET`` in its environment is a recipe line, timed from spawn to
reap, with its ``wait4`` rusage.  Children get the environment without the
library (the user's own ``LD_PRELOAD`` restored).  ``--eval='export
BUILDTEL_TARGET = $@'`` names the target: make expands exported variables per
recipe line in the target's context.  No process is added per recipe and
``SHELL`` is untouched, so recipes run exactly as without telemetry.

**Wrapper** (any other make, e.g. static or vfork-only): ``make ARGS -f <the
makefile make would have read> -f <buildtel.mk>``.  Makefiles are read in
command-line order, so ours is read *last* and sees the ``SHELL`` the project
settled on::

    BUILDTEL_REAL_SHELL := $(SHELL)
    override SHELL := <wrapper> <events file> $(BUILDTEL_REAL_SHELL)
    export BUILDTEL_TARGET = $@

so every line runs as ``<wrapper> <events> <real shell> <flags> <line>``.  The
simpler ``make SHELL=…`` would silently replace a makefile's own ``SHELL :=
/bin/bash``, and pattern-specific ``%: SHELL += …`` is inherited by prerequisites
(measured: it nests); ``-f`` ordering has neither problem.  Costs one exec per line.

Both write the same ``S``/``F`` lines (``shellwrap.py``) to a file tailed here.
One *target* is one recipe: make runs a target's lines one after another, each
starting the instant the previous one is reaped, so lines of one (make process,
target) are folded together and the target is reported finished once no further
line has started ``LINGER_S`` after its last one ended (at once when the build
ends).  Its status is that of its last line (make stops a recipe at a failing
line unless the line is ``-``-prefixed).

Not broken down: recipes of recursive sub-makes (each ``$(MAKE) -C dir`` line is
one target timing the whole sub-make), dry runs and other non-building
invocations (``-n``, ``-q``, ``-p``, ``-t``, ``--version``, ``--help``).  See
``docs/live-capture.md``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildtel.shared.capture.lanes import LaneAllocator
from buildtel.shared.capture.preload import make_can_preload, preload_path
from buildtel.shared.capture.shellwrap import TARGET_VAR, wrapper_path
from buildtel.shared.capture.tail import FileTail

LINGER_S = 1.0
MAKE_NAMES = frozenset({"make", "gmake"})
DEFAULT_MAKEFILES = ("GNUmakefile", "makefile", "Makefile")
_SHORT_WITH_ARG = frozenset("CfIoWE")
_SHORT_OPTIONAL = frozenset("jlO")
_SHORT_NO_BUILD = frozenset("nqpvht")
_LONG_WITH_ARG = frozenset({"--directory", "--file", "--makefile", "--include-dir", "--what-if", "--new-file",
                            "--assume-new", "--old-file", "--assume-old", "--eval"})
_LONG_NO_BUILD = frozenset({"--just-print", "--dry-run", "--recon", "--question", "--print-data-base",
                            "--version", "--help", "--touch"})


def is_make(argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).name in MAKE_NAMES


@dataclass
class MakeArgs:
    dirs: list[str]
    files: list[str]
    jobs: int | None  # None: not given; 0: unlimited (-j without a number)
    builds: bool  # False for -n/-q/-p/-t/--version/--help
    end: int  # index where options end ("--") or len(argv)


def parse_make_args(argv: list[str]) -> MakeArgs:
    dirs: list[str] = []
    files: list[str] = []
    jobs: int | None = None
    builds = True
    end = len(argv)
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            end = i
            break
        if a.startswith("--"):
            name, eq, val = a.partition("=")
            if name in _LONG_NO_BUILD:
                builds = False
            elif name == "--jobs":
                if eq:
                    jobs = int(val) if val.isdigit() else 0
                elif i + 1 < len(argv) and argv[i + 1].isdigit():
                    i += 1
                    jobs = int(argv[i])
                else:
                    jobs = 0
            elif name in _LONG_WITH_ARG:
                if not eq and i + 1 < len(argv):
                    i += 1
                    val = argv[i]
                if name == "--directory":
                    dirs.append(val)
                elif name in ("--file", "--makefile"):
                    files.append(val)
        elif a.startswith("-") and len(a) > 1:
            k = 1
            while k < len(a):
                c = a[k]
                if c in _SHORT_WITH_ARG:
                    val = a[k + 1:]
                    if not val and i + 1 < len(argv):
                        i += 1
                        val = argv[i]
                    if c == "C":
                        dirs.append(val)
                    elif c == "f":
                        files.append(val)
                    break
                if c in _SHORT_OPTIONAL:
                    digits = re.match(r"\d*", a[k + 1:]).group()  # type: ignore[union-attr]
                    if c == "j":
                        if digits:
                            jobs = int(digits)
                        elif k + 1 == len(a) and i + 1 < len(argv) and argv[i + 1].isdigit():
                            i += 1
                            jobs = int(argv[i])
                        else:
                            jobs = 0
                    k += 1 + len(digits)
                    continue
                if c in _SHORT_NO_BUILD:
                    builds = False
                k += 1
        i += 1
    return MakeArgs(dirs, files, jobs, builds, end)


def jobs_from_makeflags(makeflags: str) -> int | None:
    m = re.search(r"(?:^|\s)(?:-j|--jobs=)(\d+)", makeflags)
    return int(m.group(1)) if m else None


@dataclass
class _Recipe:
    target: str
    lane: int
    start: float
    end: float
    running: bool
    status: int = 0
    cpu_us: int = 0
    maxrss_kib: int = 0
    lines: int = 0
    linger_until: float = 0.0


class MakeCapture:
    """``prepare`` rewrites make's argv; ``poll`` turns the wrapper's lines into events."""

    kind = "make"

    def __init__(self, cache_dir: Path, *, cwd: Path | None = None, method: str = "auto") -> None:
        """``method``: "preload", "wrapper" or "auto" (preload when make allows it)."""
        self.cache_dir = cache_dir
        self.method = method
        self.cwd = cwd or Path.cwd()
        self.jobs: int | None = None
        self.active = False  # the wrapper is in place
        self.reason = ""  # why not, when it is not
        self.lanes = LaneAllocator()
        self._tmp: Path | None = None
        self._tail: FileTail | None = None
        self._open: dict[tuple[bytes, bytes], _Recipe] = {}
        self.bad_lines = 0
        self._prefix: dict[bytes, str] = {}  # make pid -> "sub/" for sub-makes in other directories
        self.makes = 0  # make processes that loaded the library (sub-makes included)
        self.recipes = 0  # targets reported

    @property
    def running(self) -> int:
        """Recipes with a line running now (not those between lines or lingering)."""
        return sum(r.running for r in self._open.values())

    @property
    def worker_count(self) -> int:
        return 1 if self.jobs is None else self.jobs

    def prepare(self, argv: list[str], env: dict[str, str]) -> list[str]:
        args = parse_make_args(argv)
        self.jobs = args.jobs if args.jobs is not None else jobs_from_makeflags(env.get("MAKEFLAGS", ""))
        if not args.builds:
            self.reason = "make does not build in this mode"
            return argv
        if self.method in ("auto", "preload") and make_can_preload(argv[0]):
            lib = preload_path(self.cache_dir)
            if lib is not None and _make_word(str(lib)) and ":" not in str(lib):
                return self._prepare_preload(argv, env, args, lib)
        if self.method == "preload":
            self.reason = "this make cannot be preloaded (static, not ELF, or no posix_spawn)"
            return argv
        return self._prepare_wrapper(argv, args)

    def _prepare_preload(self, argv: list[str], env: dict[str, str], args: MakeArgs, lib: Path) -> list[str]:
        """make loads the library (LD_PRELOAD), which times what make spawns and reaps and hands
        its children an environment without itself; ``--eval`` (read before the makefiles, and
        passed to sub-makes in MAKEFLAGS) exports the target name to every recipe."""
        self._tmp = Path(tempfile.mkdtemp(prefix="buildtel-make-"))
        events = self._tmp / "events"
        events.touch()
        orig = env.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{lib} {orig}".strip()
        env["BUILDTEL_CAPTURE_EVENTS"] = str(events)
        if orig:
            env["BUILDTEL_ORIG_LD_PRELOAD"] = orig
        self._tail = FileTail(events, from_end=False)
        self.method, self.active = "preload", True
        return [*argv[:args.end], f"--eval=export {TARGET_VAR} = $@", *argv[args.end:]]

    def _prepare_wrapper(self, argv: list[str], args: MakeArgs) -> list[str]:
        files = list(args.files)
        if not files:
            base = self.cwd
            for d in args.dirs:
                base = base / d
            found = next((n for n in DEFAULT_MAKEFILES if (base / n).is_file()), None)
            if found is None:
                self.reason = f"no makefile in {base}"
                return argv
            files = [found]  # relative, as make would resolve it after -C
        wrapper = wrapper_path(self.cache_dir)
        if wrapper is None:
            self.reason = "no C compiler and no bash >= 5 to build the shell wrapper"
            return argv
        tmp = Path(tempfile.mkdtemp(prefix="buildtel-make-"))
        events, mk = tmp / "events", tmp / "buildtel.mk"
        words = [_make_word(str(wrapper)), _make_word(str(events))]
        if None in words:
            shutil.rmtree(tmp, ignore_errors=True)
            self.reason = "a blank or one of $#\\ in the wrapper's path"
            return argv
        self._tmp = tmp
        events.touch()
        mk.write_text(
            "# buildtel run: time every recipe line (shared/capture/make.py); read after the project's makefiles\n"
            "BUILDTEL_REAL_SHELL := $(SHELL)\n"
            f"override SHELL := {words[0]} {words[1]} $(BUILDTEL_REAL_SHELL)\n"
            f"export {TARGET_VAR} = $@\n")
        self._tail = FileTail(events, from_end=False)
        extra = [a for f in [*(files if not args.files else []), str(mk)] for a in ("-f", f)]
        self.method, self.active = "wrapper", True
        return argv[:args.end] + extra + argv[args.end:]

    def poll(self, *, final: bool = False) -> list[dict[str, Any]]:
        if self._tail is None:
            return []
        return self.feed(self._tail.poll(), final=final)

    def feed(self, lines: list[bytes], *, final: bool = False) -> list[dict[str, Any]]:
        """Fold event lines into targets (``tree.py`` feeds the make lines of a whole process tree)."""
        out: list[dict[str, Any]] = []
        for line in lines:
            try:
                self._line(line, out)
            except (ValueError, IndexError):
                self.bad_lines += 1
        now = time.monotonic()
        for key, r in list(self._open.items()):
            if final or (not r.running and now >= r.linger_until):
                del self._open[key]
                out.append(self._finished(r, cancelled=r.running))
        return out

    def _line(self, line: bytes, out: list[dict[str, Any]]) -> None:
        if line.startswith(b"M\t"):  # a make started (the root one, or a sub-make)
            self.makes += 1
            return
        if line.startswith(b"D\t"):  # the directory a make runs its recipes in (after -C)
            _, mpid, cwd = line.split(b"\t", 2)
            rel = os.path.relpath(os.fsdecode(cwd), self.cwd)
            if rel != ".":  # a sub-make's targets are named from where the build was started
                self._prefix[mpid] = rel + "/"
            return
        if line.startswith(b"S\t"):
            _, _pid, mpid, start_b, target_b = line.split(b"\t", 4)
            key = (mpid, target_b)
            r = self._open.get(key)
            if r is not None:  # the next line of the same recipe: the job slot is still its own
                if not r.running and not self.lanes.reopen(r.lane, r.start):
                    self.lanes.release(r.lane, r.start)  # another target took the lane meanwhile
                    r.lane = self.lanes.assign(r.start)
                r.running = True
                return
            if not target_b:
                return
            start = float(start_b)
            target = self._prefix.get(mpid, "") + target_b.decode("utf-8", "replace")
            lane = self.lanes.assign(start)
            self._open[key] = _Recipe(target, lane, start, start, True)
            out.append({"event": "target_started", "target": target, "worker": self.lanes.name(lane), "ts": start})
        elif line.startswith(b"F\t"):
            _, _pid, mpid, start_b, end_b, status, ut, st, rss, target_b = line.split(b"\t", 9)
            key = (mpid, target_b)
            r = self._open.get(key)
            if not target_b:
                return
            if r is None:  # its S line was lost (never expected): the F line alone still times it
                start = float(start_b)
                target = self._prefix.get(mpid, "") + target_b.decode("utf-8", "replace")
                lane = self.lanes.assign(start)
                r = self._open[key] = _Recipe(target, lane, start, start, True)
                out.append({"event": "target_started", "target": target, "worker": self.lanes.name(lane),
                            "ts": start})
            r.end = max(r.end, float(end_b))
            r.status = int(status)
            r.cpu_us += int(ut) + int(st)
            r.maxrss_kib = max(r.maxrss_kib, int(rss))
            r.lines += 1
            r.running = False
            r.linger_until = time.monotonic() + LINGER_S
            self.lanes.close(r.lane, r.start, r.end)

    def _finished(self, r: _Recipe, *, cancelled: bool) -> dict[str, Any]:
        end = time.time() if cancelled else r.end
        if cancelled:
            self.lanes.close(r.lane, r.start, end)
        if cancelled or r.status in (-2, -15, -1):  # SIGINT/SIGTERM/SIGHUP: stopped, not broken
            status = "cancelled"
        else:
            status = "success" if r.status == 0 else "failed"
        rec: dict[str, Any] = {
            "event": "target_finished", "target": r.target, "start": r.start, "duration_s": max(end - r.start, 0.0),
            "status": status, "worker": self.lanes.name(r.lane), "ts": end,
            "exit_code": None if cancelled else (r.status if r.status >= 0 else 128 - r.status),
            "kind": "recipe",
        }
        self.recipes += 1
        if r.lines and r.cpu_us:
            rec["cpu_s"] = r.cpu_us / 1e6
        if r.maxrss_kib:
            rec["peak_rss_bytes"] = r.maxrss_kib * 1024
        return rec

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._tmp)
            self._tmp = None


def _make_word(path: str) -> str | None:
    """A path usable as one word of make's SHELL (make splits it on blanks), or None."""
    return None if any(c.isspace() for c in path) or any(c in path for c in "$#\\") else path


