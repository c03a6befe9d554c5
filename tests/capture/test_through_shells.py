"""Real builds run *through* something under ``buildtel run`` (``sh -c``, a script,
``cmake --build`` of a Makefile generator, a recursive make): every make recipe and ninja edge is
a target of the session, a build tool the capture cannot see is named in one line at the end, and
a second run with nothing to do says how many targets were up to date (or that it is not known)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from buildtel.shared.subjects import Subjects
from tests.capture import test_live_builds as live
from tests.capture.project import (
    cmake_project,
    make_project,
    make_recipes_to_run,
    ninja_commands,
)
from tests.capture.test_live_builds import NINJA, _env, _run, _session
from tests.util import completed_sessions

collector = live.collector  # the fixture: a collector on the test stack

pytestmark = pytest.mark.timeout(240)


def _end_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("buildtel: ") and "session " not in ln]
    assert len(lines) == 1, stderr
    return lines[0]


async def test_sh_c_cmake_then_ninja_records_every_edge_and_then_the_up_to_date_count(
        settings, nc, collector, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    cmake_project(root)
    env = _env(settings, tmp_path)
    cmd = ["sh", "-c", "cmake -S . -B build -G Ninja >/dev/null && ninja -C build"]
    res, _ = await _run(cmd, root, env)
    assert res.returncode == 0, res.stderr
    s = await _session(nc, settings)
    assert s.command == cmd
    expected = ninja_commands(root / "build", NINJA or "ninja")
    assert len(s.targets) == len(expected) == 22
    assert sum(t.name.endswith(".c.o") for t in s.targets) == 21 and any(t.name == "app" for t in s.targets)
    assert all(t.kind == "edge" and t.status == "success" for t in s.targets)
    assert not any("CMakeScratch" in t.name or "cmTC_" in t.name for t in s.targets)  # cmake's own probes
    line = _end_line(res.stderr)
    assert "22 targets captured (ninja); 0 up to date" in line and "try_compile builds left out" in line
    assert s.up_to_date == 0

    res, _ = await _run(cmd, root, env)
    assert res.returncode == 0, res.stderr
    assert "0 targets captured (ninja); 22 up to date (not rebuilt)" in _end_line(res.stderr)
    sessions = await completed_sessions(nc.jetstream(), Subjects(settings.namespace), 2, timeout=30)
    again = next(x for x in sessions if x.id != s.id)
    assert again.up_to_date == 22 and not again.targets  # the avoided work is stored with the session


async def test_a_script_that_runs_make_records_every_recipe(settings, nc, collector, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    make_project(root, shell="/bin/sh")
    expected = make_recipes_to_run(root)
    (root / "build.sh").write_text("#!/bin/sh\nset -e\necho building\nmake -j2 \"$@\"\n")
    (root / "build.sh").chmod(0o755)
    res, _ = await _run(["./build.sh"], root, _env(settings, tmp_path))
    assert res.returncode == 0, res.stderr
    s = await _session(nc, settings)
    assert sorted(t.name for t in s.targets) == sorted(expected)
    assert all(t.kind == "recipe" and t.status == "success" for t in s.targets)
    assert "23 targets captured (make); up-to-date targets not known" in _end_line(res.stderr)


async def test_nested_make_records_the_sub_makes_recipes_under_their_directory(
        settings, nc, collector, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    make_project(root)
    make_project(root / "sub", files=3)
    (root / "Top.mk").write_text("all: app subdir\nsubdir:\n\t$(MAKE) -C sub\n.PHONY: subdir\ninclude Makefile\n")
    sub_expected = make_recipes_to_run(root / "sub")
    res, _ = await _run(["make", "-j2", "-f", "Top.mk"], root, _env(settings, tmp_path))
    assert res.returncode == 0, res.stderr
    assert (root / "sub" / "app").exists()
    s = await _session(nc, settings)
    names = sorted(t.name for t in s.targets)
    top = [n for n in names if not n.startswith("sub/")]
    assert sorted(n for n in names if n.startswith("sub/")) == sorted(f"sub/{n}" for n in sub_expected)
    assert "subdir" in top and "app" in top and sum(n.endswith(".o") for n in top) == 21
    assert len(names) == 23 + 1 + len(sub_expected)


async def test_cmake_build_of_a_makefile_generator_records_every_object(settings, nc, collector,
                                                                        tmp_path: Path) -> None:
    root = tmp_path / "proj"
    cmake_project(root)
    env = _env(settings, tmp_path)
    await asyncio.to_thread(subprocess.run, ["cmake", "-G", "Unix Makefiles", "-S", str(root), "-B", str(root / "b")],
                            env=env, check=True, capture_output=True)
    res, _ = await _run(["cmake", "--build", "b", "--parallel", "2"], root, env)
    assert res.returncode == 0, res.stderr
    s = await _session(nc, settings)
    objects = sorted(t.name for t in s.targets if t.name.endswith(".c.o"))
    assert objects == sorted(f"b/CMakeFiles/app.dir/src/{n}.o" for n in [f"u{i}.c" for i in range(20)] + ["main.c"])
    assert any(t.name == "b/app" for t in s.targets)
    assert len({t.name for t in s.targets}) == len(s.targets)  # sub-makes' targets do not collide
    assert "targets captured (make ×" in _end_line(res.stderr)


async def test_a_build_tool_capture_cannot_see_is_named_in_one_line(settings, nc, collector, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    make_project(root, files=2)
    (root / "build.py").write_text("import subprocess\nfor n in ('u0', 'u1'):\n"
                                   "    subprocess.run(['cc', '-c', f'src/{n}.c', '-o', f'{n}.o'], check=True)\n")
    res, _ = await _run(["python3", "build.py"], root, _env(settings, tmp_path))
    assert res.returncode == 0, res.stderr
    assert (root / "u1.o").exists()
    s = await _session(nc, settings)
    assert s.targets == []
    assert _end_line(res.stderr).startswith("buildtel: no per-target data: no make or ninja ran under this command")
