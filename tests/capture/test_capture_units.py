"""The capture's parts on their own: make's command line, the lanes, the file tail, the wrapper's
semantics (a recipe behaves exactly as without it) and the folding of recipe lines into targets."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from buildtel.shared.capture.lanes import LaneAllocator
from buildtel.shared.capture.live import LiveSource
from buildtel.shared.capture.make import MakeCapture, parse_make_args
from buildtel.shared.capture.ninja import NinjaCapture, parse_cmake_args, parse_ninja_args
from buildtel.shared.capture.shellwrap import wrapper_path
from buildtel.shared.capture.tail import FileTail

# Both capture methods are exercised; preload needs a dynamically linked GNU make (Linux distros'
# make is), the wrapper a C compiler.  Missing tools fail these tests, they never skip them.
METHODS = ["preload", "wrapper"]


@pytest.mark.parametrize(("argv", "dirs", "files", "jobs", "builds"), [
    (["make"], [], [], None, True),
    (["make", "-j2", "all"], [], [], 2, True),
    (["make", "-j", "4", "-C", "sub", "-f", "GNUmakefile.x"], ["sub"], ["GNUmakefile.x"], 4, True),
    (["make", "-skj8", "-Csub"], ["sub"], [], 8, True),
    (["make", "--jobs=3", "--directory=a", "--file", "x.mk"], ["a"], ["x.mk"], 3, True),
    (["make", "-j"], [], [], 0, True),
    (["make", "-n"], [], [], None, False),
    (["make", "-kn", "-j2"], [], [], 2, False),
    (["make", "--dry-run"], [], [], None, False),
    (["make", "-f", "-n"], [], ["-n"], None, True),  # "-n" is the makefile's name here
    (["make", "-j2", "--", "-n"], [], [], 2, True),  # after "--": a target
])
def test_make_command_lines_are_understood(argv, dirs, files, jobs, builds) -> None:
    a = parse_make_args(argv)
    assert (a.dirs, a.files, a.jobs, a.builds) == (dirs, files, jobs, builds)


def test_ninja_and_cmake_command_lines(tmp_path: Path) -> None:
    d, manifest, jobs, builds = parse_ninja_args(["ninja", "-C", "out", "-j", "6", "app"], tmp_path)
    assert (d, manifest, jobs, builds) == (tmp_path / "out", tmp_path / "out" / "build.ninja", 6, True)
    assert parse_ninja_args(["ninja", "-t", "commands"], tmp_path)[3] is False
    assert parse_ninja_args(["ninja", "-n"], tmp_path)[3] is False
    (tmp_path / "b").mkdir()
    assert parse_cmake_args(["cmake", "--build", "b"], tmp_path, {}) is None  # not configured for Ninja
    (tmp_path / "b" / "build.ninja").write_text("")
    assert parse_cmake_args(["cmake", "--build", "b", "--parallel", "3"], tmp_path, {}) == (tmp_path / "b", 3)
    assert parse_cmake_args(["cmake", "--build", "b", "--", "-j5"], tmp_path, {}) == (tmp_path / "b", 5)
    assert parse_cmake_args(["cmake", "--build", "b"], tmp_path, {"CMAKE_BUILD_PARALLEL_LEVEL": "7"}) == (
        tmp_path / "b", 7)


def test_ninja_log_is_looked_for_in_the_manifests_builddir(tmp_path: Path) -> None:
    (tmp_path / "build.ninja").write_text("ninja_required_version = 1.5\nbuilddir = out/logs\nrule x\n")
    cap = NinjaCapture.for_argv(["ninja"], {}, cwd=tmp_path)
    assert cap is not None and cap.log_path == tmp_path / "out" / "logs" / ".ninja_log"


def test_lanes_never_overlap_even_when_intervals_arrive_out_of_order() -> None:
    import random

    rng = random.Random(4)
    lanes = LaneAllocator()
    jobs = []
    slots = [0.0] * 4  # a -j4 schedule: each job starts when the earliest slot frees
    for _ in range(400):
        k = min(range(4), key=lambda i: slots[i])
        start = slots[k] + rng.random() * 0.01
        end = start + rng.random() * 2
        slots[k] = end
        jobs.append((start, end))
    placed: dict[int, list[tuple[float, float]]] = {}
    for start, end in sorted(jobs, key=lambda j: j[1]):  # reported when they end, like ninja
        placed.setdefault(lanes.assign(start, end), []).append((start, end))
    for intervals in placed.values():
        intervals.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(intervals))
    assert 4 <= lanes.lanes <= 6

    open_lanes = LaneAllocator()  # make: open at start, closed at the end
    a = open_lanes.assign(0.0)
    b = open_lanes.assign(0.5)
    assert (a, b) == (0, 1)
    open_lanes.close(a, 0.0, 1.0)
    assert open_lanes.assign(1.0) == 0
    assert open_lanes.reopen(0, 0.0) is False  # the lane went to another target meanwhile
    open_lanes.close(1, 0.5, 2.0)
    assert open_lanes.reopen(1, 0.5) and open_lanes._ends[1][-1] == math.inf  # the recipe's next line
    assert open_lanes.assign(2.5) == 2


def test_the_tail_returns_whole_lines_and_survives_a_rewrite(tmp_path: Path) -> None:
    p = tmp_path / "log"
    p.write_bytes(b"old 1\nold 2\n")
    tail = FileTail(p, from_end=True)
    assert tail.poll() == []
    with open(p, "ab") as f:
        f.write(b"new 1\nnew")
    assert tail.poll() == [b"new 1"]
    with open(p, "ab") as f:
        f.write(b" 2\n")
    assert tail.poll() == [b"new 2"]
    # Recompaction: the file is replaced by one holding the old lines, then appended to.
    tmp = tmp_path / "log.recompact"
    tmp.write_bytes(b"old 1\nold 2\nnew 1\nnew 2\nnew 3\n")
    os.replace(tmp, p)
    assert tail.poll() == [b"new 3"]
    assert tail.rewrites == 1
    tail.close()
    missing = FileTail(tmp_path / "later", from_end=True)
    (tmp_path / "later").write_bytes(b"# header\nfirst\n")
    assert missing.poll() == [b"# header", b"first"]


def test_recipe_lines_fold_into_one_target_per_recipe(tmp_path: Path, monkeypatch) -> None:
    import buildtel.shared.capture.make as make_mod

    monkeypatch.setattr(make_mod, "LINGER_S", 0.05)
    cap = MakeCapture(tmp_path)
    cap._tail = FileTail(tmp_path / "events", from_end=False)
    (tmp_path / "events").write_text(
        "S\t10\t1\t100.000000\tapp\n"
        "S\t11\t1\t100.100000\tlib.o\n"
        "F\t10\t1\t100.000000\t100.500000\t0\t1000\t0\t100\tapp\n"  # line 1 of app
        "S\t12\t1\t100.500100\tapp\n"
        "F\t11\t1\t100.100000\t100.700000\t2\t0\t0\t0\tlib.o\n"
        "F\t12\t1\t100.500100\t101.000000\t0\t2000\t0\t300\tapp\n"  # line 2 of app
        "S\t13\t1\t101.000000\tstuck\n")
    recs = cap.poll()
    assert [(r["event"], r["target"]) for r in recs] == [("target_started", "app"), ("target_started", "lib.o"),
                                                         ("target_started", "stuck")]
    assert recs[0]["worker"] != recs[1]["worker"]
    assert recs[2]["worker"] == recs[0]["worker"]  # app's two lines ended at 101.0, as stuck started
    time.sleep(0.1)
    recs = cap.poll()
    done = {r["target"]: r for r in recs}
    assert set(done) == {"app", "lib.o"}
    assert done["app"]["duration_s"] == pytest.approx(1.0) and done["app"]["status"] == "success"
    assert done["app"]["cpu_s"] == pytest.approx(0.003) and done["app"]["peak_rss_bytes"] == 300 * 1024
    assert done["lib.o"]["status"] == "failed" and done["lib.o"]["exit_code"] == 2
    assert cap.running == 1
    final = cap.poll(final=True)
    assert [(r["target"], r["status"]) for r in final] == [("stuck", "cancelled")]
    cap.close()


@pytest.mark.parametrize("method", METHODS)
def test_capture_changes_nothing_a_recipe_can_see(tmp_path: Path, monkeypatch, method: str) -> None:
    """Same output and exit code with and without the wrapper, the makefile's own SHELL and
    .SHELLFLAGS kept, quoting, continuation lines, ignored errors and $(SHELL) in a recipe."""
    (tmp_path / "Makefile").write_text(
        "SHELL := /bin/bash\n.SHELLFLAGS := -eu -o pipefail -c\nX = hello\n"
        "all: one two three four\n"
        "one:\n\t@echo \"one $(X)\" 'single $$HOME-ish' \\\n\t  continued\n\t@for i in 1 2; do echo loop $$i; done\n"
        "two:\n\t@printf '%s\\n' \"tab\tin\" | cat\n\t@echo $$BASH_VERSION | cut -c1 | tr 0-9 N\n"
        "three:\n\t-@false\n\t@echo after-ignored\n"
        "four:\n\t@echo target=$@\n\t@$(SHELL) -c 'echo nested $$0' | sed s/bash/SH/\n\t@true plain command\n"
        "\t@echo preload=[$$LD_PRELOAD] env=[$${BUILDTEL_CAPTURE_EVENTS-}$${BUILDTEL_TARGET-}]\n")
    monkeypatch.chdir(tmp_path)
    user_env = dict(os.environ, LD_PRELOAD="libm.so.6")  # the user's own preload reaches the recipes
    plain = subprocess.run(["make", "-s"], cwd=tmp_path, env=user_env, capture_output=True, text=True, check=False)
    assert "preload=[libm.so.6] env=[]" in plain.stdout
    src = LiveSource(tmp_path / "cache", make_method=method)
    env = dict(user_env)
    argv = src.prepare(["make", "-s"], env)
    assert src.capture is not None and src.capture.method == method, src.note
    wrapped = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert wrapped.returncode == plain.returncode == 0
    assert wrapped.stdout == plain.stdout and "loop 2" in plain.stdout and "N" in plain.stdout
    assert wrapped.stderr == plain.stderr
    recs = src.capture.poll(final=True)
    finished = [r for r in recs if r["event"] == "target_finished"]
    assert sorted(r["target"] for r in finished) == ["four", "one", "three", "two"]  # "all" has no recipe
    three = next(r for r in finished if r["target"] == "three")
    assert three["status"] == "success"  # its last line succeeded
    src.capture.close()


@pytest.mark.parametrize("method", METHODS)
def test_a_failing_or_killed_recipe_is_reported_and_make_sees_the_same_status(tmp_path: Path, monkeypatch,
                                                                              method: str) -> None:
    (tmp_path / "Makefile").write_text("all: bad\nbad:\n\t@exit 7\n")
    monkeypatch.chdir(tmp_path)
    src = LiveSource(tmp_path / "cache", make_method=method)
    env = dict(os.environ)
    argv = src.prepare(["make"], env)
    res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    plain = subprocess.run(["make"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert res.returncode == plain.returncode == 2
    assert res.stderr == plain.stderr and "Error 7" in res.stderr
    rec = [r for r in src.capture.poll(final=True) if r["event"] == "target_finished"]  # type: ignore[union-attr]
    assert [(r["target"], r["status"], r["exit_code"]) for r in rec] == [("bad", "failed", 7)]
    src.capture.close()  # type: ignore[union-attr]

    (tmp_path / "Makefile").write_text("all:\n\t@sleep 30\n")
    src = LiveSource(tmp_path / "cache", make_method=method)
    env = dict(os.environ)
    argv = src.prepare(["make"], env)
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    got: list[dict] = []
    while not got and time.monotonic() < deadline:
        got = src.capture.poll()  # type: ignore[union-attr]
        time.sleep(0.02)
    proc.terminate()  # make forwards SIGTERM to the wrapper, which passes it to the recipe
    proc.wait(10)
    assert proc.returncode != 0
    rec = [r for r in src.capture.poll(final=True) if r["event"] == "target_finished"]  # type: ignore[union-attr]
    assert len(rec) == 1 and rec[0]["status"] == "cancelled" and rec[0]["duration_s"] < 10
    src.capture.close()  # type: ignore[union-attr]


def test_no_capture_when_make_would_not_build_or_has_no_makefile(tmp_path: Path, monkeypatch) -> None:
    src = LiveSource(tmp_path / "cache")
    assert src.prepare(["make", "-n"], {}) == ["make", "-n"] and src.capture is None
    assert "does not build" in src.note
    monkeypatch.chdir(tmp_path)
    src = LiveSource(tmp_path / "cache", make_method="wrapper")
    assert src.prepare(["make"], {}) == ["make"] and "no makefile" in src.note
    src = LiveSource(tmp_path / "cache", capture=False)
    assert src.prepare(["make"], {}) == ["make"] and src.note == ""


def test_the_wrapper_is_built_once_per_cache_dir(tmp_path: Path) -> None:
    first = wrapper_path(tmp_path)
    assert first is not None, "building the SHELL wrapper needs a C compiler (cc)"
    mtime = first.stat().st_mtime_ns
    assert wrapper_path(tmp_path) == first and first.stat().st_mtime_ns == mtime


def test_a_plain_command_gets_health_checkpoints_only(tmp_path: Path) -> None:
    src = LiveSource(tmp_path / "cache", health_interval_s=0.1)
    env = dict(os.environ)
    argv = src.prepare(["sleep", "0.5"], env)
    proc = subprocess.Popen(argv)
    src.spawned(proc.pid)
    done = threading.Event()
    recs: list[dict] = []
    t = threading.Thread(target=lambda: recs.extend(src.targets(done)))
    t.start()
    proc.wait()
    done.set()
    t.join(5)
    assert recs and all(r["event"] == "health" for r in recs)
    assert len(recs) >= 3 and recs[-1]["completed_tasks"] == 0 and recs[-1]["status"] == "healthy"
    assert any(r["memory_bytes"] > 0 for r in recs)


def test_a_capture_that_breaks_mid_build_ends_the_capture_not_the_health(tmp_path: Path) -> None:
    class Broken:
        kind, worker_count, running = "make", 2, 0

        def poll(self, *, final: bool = False) -> list[dict]:
            raise OSError("events file vanished")

        def close(self) -> None:
            pass

    src = LiveSource(tmp_path / "cache", health_interval_s=0.05)
    src.prepare(["true"], {})
    src.capture = Broken()  # type: ignore[assignment]
    done = threading.Event()
    recs: list[dict] = []
    t = threading.Thread(target=lambda: recs.extend(src.targets(done)))
    t.start()
    time.sleep(0.4)
    done.set()
    t.join(5)
    assert not t.is_alive() and "events file vanished" in src.note
    assert recs and all(r["event"] == "health" for r in recs)
