"""A small generated C project buildable with make or ninja (and CMake + Ninja), and the
independent counts the capture tests compare against."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

FILES = 20


def write_sources(root: Path, files: int = FILES) -> list[str]:
    """``src/u<i>.c`` + ``src/main.c``; returns the source names (without directory)."""
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(files):
        body = "\n".join(f"static int f{i}_{k}(int x) {{ int s = 0; "
                         f"for (int j = 0; j < x; j++) s += (j * {k + 1}) ^ {i}; return s; }}" for k in range(6))
        calls = " + ".join(f"f{i}_{k}(x)" for k in range(6))
        (src / f"u{i}.c").write_text(f"{body}\nint unit{i}(int x) {{ return {calls}; }}\n")
        names.append(f"u{i}.c")
    decls = "".join(f"int unit{i}(int);\n" for i in range(files))
    total = " + ".join(f"unit{i}(n)" for i in range(files))
    (src / "main.c").write_text(f"#include <stdio.h>\n{decls}int main(void) {{ int n = 3; "
                                f"printf(\"%d\\n\", {total}); return 0; }}\n")
    names.append("main.c")
    return names


def make_project(root: Path, files: int = FILES, *, shell: str | None = None, fail: str | None = None) -> None:
    """A Makefile: a directory rule, one pattern rule per object, and a link recipe of two lines.
    ``shell`` sets the makefile's own SHELL; ``fail`` makes that object's recipe fail."""
    write_sources(root, files)
    head = f"SHELL := {shell}\n" if shell else ""
    fail_rule = f"build/{fail}.o: src/{fail}.c | build\n\t@echo failing $@ >&2; exit 3\n" if fail else ""
    (root / "Makefile").write_text(
        head + "SRCS := $(wildcard src/*.c)\nOBJS := $(SRCS:src/%.c=build/%.o)\n"
        "app: $(OBJS)\n\t@echo linking $@\n\t$(CC) -o $@ $^\n"
        + fail_rule +
        "build/%.o: src/%.c | build\n\t$(CC) -O1 -c -o $@ $<\n"
        "build:\n\tmkdir -p build\n"
        "clean:\n\trm -rf build app\n.PHONY: clean\n")


def ninja_project(root: Path, files: int = FILES) -> None:
    names = write_sources(root, files)
    lines = ["rule cc\n  command = cc -O1 -c $in -o $out\n  description = CC $out\n",
             "rule link\n  command = cc $in -o $out\n  description = LINK $out\n"]
    objs = []
    for n in names:
        obj = f"obj/{n[:-2]}.o"
        objs.append(obj)
        lines.append(f"build {obj}: cc src/{n}\n")
    lines.append(f"build app: link {' '.join(objs)}\n")
    (root / "build.ninja").write_text("".join(lines))


def cmake_project(root: Path, files: int = FILES) -> None:
    write_sources(root, files)
    (root / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.10)\nproject(demo C)\nfile(GLOB SRCS src/*.c)\nadd_executable(app ${SRCS})\n")


def make_recipes_to_run(root: Path) -> list[str]:
    """Targets whose recipe a build from clean runs, as make itself says (``-n --trace``),
    independently of the capture."""
    out = subprocess.run(["make", "-n", "--trace"], cwd=root, capture_output=True, text=True, check=True).stdout
    # make 4.x traces each target it runs a recipe for: "update target 'X' due to: …" or,
    # for a target that does not exist and has no prerequisites to blame, "target 'X' does not exist".
    return re.findall(r"^\S+:\d+: (?:update )?target '([^']+)' (?:due to|does not exist)", out, re.MULTILINE)


def ninja_commands(build_dir: Path, ninja: str = "ninja") -> list[str]:
    """Commands of the default targets (``ninja -t commands``): one per edge to build."""
    out = subprocess.run([ninja, "-C", str(build_dir), "-t", "commands"], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def ninja_binary() -> str | None:
    """The system ninja, else the one from the PyPI ``ninja`` package in this environment."""
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(Path(ninja.BIN_DIR) / "ninja")


def ninja_binaries() -> dict[str, str]:
    """Every distinct ninja on this machine by its version (``1.13.2``: the PyPI package of the
    test extra, which exits with a failed edge's code; ``1.11.1``: a distribution's, which exits 1):
    the one first on PATH, the PyPI package's and the usual system places."""
    places = [ninja_binary(), shutil.which("ninja", path="/usr/local/bin:/usr/bin:/bin")]
    try:
        import ninja  # type: ignore[import-not-found]

        places.append(str(Path(ninja.BIN_DIR) / "ninja"))
    except ImportError:
        pass
    found: dict[str, str] = {}
    for path in places:
        if path is None or not Path(path).is_file():
            continue
        version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout.strip()
        found.setdefault(".".join(version.split(".")[:3]), path)
    return found
