"""Ask the build tool which files a build used: make's database and ninja's graph and deps log.

Both queries run *after* the build, with the build's own arguments and
environment, so they see what the build saw: make re-reads the dependency files
``-MMD`` wrote (headers included) and resolves implicit rules for the goals;
ninja's deps log holds the headers the compiler reported.

``make -pn`` executes nothing except what make always runs under ``-n``: lines
that invoke ``$(MAKE)`` (recursive make, itself under ``-n``) and the recipes
that remake a makefile which is itself a target.  Paths come back relative to
the tool's directory (``-C``) or absolute; the caller sorts them into the tree
and outside it.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

QUERY_TIMEOUT_S = 120.0
MAX_OUTPUT = 256 * 1024 * 1024

MAKE_NAMES = frozenset({"make", "gmake", "gnumake"})
NINJA_NAMES = frozenset({"ninja", "ninja-build", "samu"})


class QueryFailed(RuntimeError):
    pass


def detect(argv: Sequence[str]) -> str | None:
    """The tool the command runs directly (``make``/``ninja``), else ``None`` (use the tree scan)."""
    if not argv:
        return None
    name = os.path.basename(argv[0])
    if name in MAKE_NAMES:
        return "make"
    if name in NINJA_NAMES:
        return "ninja"
    return None


def _run(args: list[str], cwd: Path, env: Mapping[str, str]) -> str:
    try:
        proc = subprocess.run(args, cwd=cwd, env=dict(env), capture_output=True, timeout=QUERY_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise QueryFailed(f"{' '.join(args[:3])}…: {exc}") from None
    # make -n exits non-zero when a recipe would fail; the database is printed regardless.
    if not proc.stdout:
        raise QueryFailed(f"{' '.join(args)} printed nothing (exit {proc.returncode}): "
                          f"{proc.stderr.decode(errors='replace')[:300]}")
    if len(proc.stdout) > MAX_OUTPUT:
        raise QueryFailed("tool output too large")
    return proc.stdout.decode(errors="surrogateescape")


Found = tuple[set[str], set[str]]  # (every path the build used, those read before it wrote anything)


def inputs(tool: str, argv: Sequence[str], root: Path, env: Mapping[str, str]) -> Found:
    """The paths the build used, and the subset the tool reads before building (makefiles, the
    build file): a file in that subset that the build then rewrote was still read first."""
    if tool == "make":
        return make_inputs(argv, root, env)
    if tool == "ninja":
        return ninja_inputs(argv, root, env)
    raise QueryFailed(f"no input query for {tool!r}")


# -- make ---------------------------------------------------------------------------------------
_RULE = re.compile(r"^((?:[^:#\t\\\s]|\\.)(?:[^:\\]|\\.)*?):{1,2}(?:\s+(.*))?$")
_VAR = re.compile(r"^(CURDIR|MAKEFILE_LIST|\.DEFAULT_GOAL) :?= ?(.*)$")
_ENTER = re.compile(r"^\S*make(?:\[\d+\])?: Entering directory ['`](.*)'$")


def _make_goals(argv: Sequence[str]) -> list[str]:
    """Goals on make's command line: words that are not options, option values or VAR=value."""
    goals: list[str] = []
    takes_value = {"-C", "-f", "-I", "-o", "-W", "-j", "-l", "--file", "--directory", "--include-dir",
                   "--old-file", "--what-if", "--makefile", "--assume-old", "--assume-new", "--new-file"}
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg in takes_value:
            skip = arg not in {"-j", "-l"}  # -j and -l take an optional value: a bare -j is common
            continue
        if arg.startswith("-") or "=" in arg:
            continue
        if arg.isdigit():
            continue  # the value of a preceding -j/-l
        goals.append(arg)
    return goals


def parse_make_database(text: str, goals: Sequence[str]) -> Found:
    """Paths (absolute, or joined to the database's CURDIR) of the goals' prerequisite closure
    plus the makefiles read.  Each database in ``text`` (recursive makes print one each) is
    parsed on its own; sub-makes' goals are unknown, so all their rules count."""
    out: set[str] = set()
    makefiles: set[str] = set()
    for i, db in enumerate(re.split(r"^# Make data base, printed on .*$", text, flags=re.MULTILINE)[1:]):
        used, read = _one_database(db, goals if i == 0 else None)
        out |= used
        makefiles |= read
    return out, makefiles


def _one_database(db: str, goals: Sequence[str] | None) -> Found:
    variables: dict[str, str] = {}
    rules: dict[str, list[str]] = {}
    in_files = False
    for line in db.splitlines():
        if line.startswith("# Files"):
            in_files = True
            continue
        if line.startswith(("# files hash-table stats", "# VPATH Search Paths", "# Finished Make data base")):
            in_files = False
            continue
        m = _VAR.match(line)
        if m:
            variables.setdefault(m.group(1), m.group(2).strip())
            continue
        if not in_files or not line or line[0] in "#\t":
            continue
        r = _RULE.match(line)
        if r is None:
            continue
        target, prereqs = r.group(1), (r.group(2) or "")
        if "=" in prereqs or "%" in target:
            continue  # target-specific variables and pattern rules are not files
        words = [w.replace("\\:", ":") for w in prereqs.split() if w != "|"]
        rules.setdefault(target.replace("\\:", ":"), []).extend(words)
    curdir = variables.get("CURDIR", "")
    if goals is None:
        names = set(rules) | {w for ws in rules.values() for w in ws}
    else:
        start = list(goals) or ([variables[".DEFAULT_GOAL"]] if variables.get(".DEFAULT_GOAL") else [])
        names, todo = set(), list(start)
        while todo:
            name = todo.pop()
            if name in names:
                continue
            names.add(name)
            todo.extend(rules.get(name, []))
    makefiles = set(variables.get("MAKEFILE_LIST", "").split())

    def full(ns: set[str]) -> set[str]:
        return {n if os.path.isabs(n) or not curdir else os.path.join(curdir, n) for n in ns}

    return full(names | makefiles), full(makefiles)


def make_inputs(argv: Sequence[str], root: Path, env: Mapping[str, str]) -> Found:
    text = _run([*argv, "-p", "-n"], root, env)
    if "# Make data base" not in text:
        raise QueryFailed("make did not print its database (is this GNU make?)")
    return parse_make_database(text, _make_goals(argv))


# -- ninja --------------------------------------------------------------------------------------
def _ninja_args(argv: Sequence[str]) -> tuple[list[str], list[str], Path]:
    """(options to keep for queries: -C/-f, goals, build file relative to the ninja dir)."""
    keep: list[str] = []
    goals: list[str] = []
    build_file = Path("build.ninja")
    args = list(argv[1:])
    i = 0
    while i < len(args):
        a = args[i]
        if a in {"-C", "-f"} and i + 1 < len(args):
            keep += [a, args[i + 1]]
            if a == "-f":
                build_file = Path(args[i + 1])
            i += 2
            continue
        if a in {"-j", "-k", "-l", "-d", "-t", "-w"}:
            i += 2
            continue
        if not a.startswith("-"):
            goals.append(a)
        i += 1
    return keep, goals, build_file


def parse_ninja_deps(text: str, targets: set[str] | None) -> set[str]:
    """Dependencies from ``ninja -t deps`` of ``targets`` (all of them when ``None``)."""
    out: set[str] = set()
    current: str | None = None
    for line in text.splitlines():
        if not line.strip():
            current = None
        elif not line.startswith(" "):
            current = line.split(":", 1)[0]
        elif current is not None and (targets is None or current in targets):
            out.add(line.strip())
    return out


def ninja_inputs(argv: Sequence[str], root: Path, env: Mapping[str, str]) -> Found:
    keep, goals, build_file = _ninja_args(argv)
    exe = argv[0]
    directory = root
    if "-C" in keep:
        directory = (root / keep[keep.index("-C") + 1]).resolve()
    closure = {line.strip() for line in _run([exe, *keep, "-t", "inputs", *goals], root, env).splitlines()
               if line.strip()}
    try:
        deps_text = _run([exe, *keep, "-t", "deps"], root, env)
    except QueryFailed:
        deps_text = ""  # an empty deps log prints nothing: no headers to add
    closure |= parse_ninja_deps(deps_text, (closure | set(goals)) if goals else None)
    closure.add(str(build_file))
    build = str(build_file) if build_file.is_absolute() else str(directory / build_file)
    return {p if os.path.isabs(p) else str(directory / p) for p in closure}, {build}
