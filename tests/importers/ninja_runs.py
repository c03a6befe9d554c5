"""Real ninja runs for the outcome tests: a small C project whose build succeeds, stops on a
compile error or on an edge killed by SIGKILL, or is interrupted with SIGINT while a slow edge runs.

Each run keeps what ``buildtel import ninja`` takes: the ``.ninja_log``, ninja's console output
(stdout and stderr together, as a terminal shows them) and its exit code.  The interrupted run
never sleeps on a guess: the slow edge creates a marker file as it starts and the signal is sent
only once the marker exists (the edge then sleeps far longer than any test waits)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.capture.project import ninja_binary

NINJA = ninja_binary()
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
GOOD = 3  # objects that compile
BAD_SOURCE = "int broken(void) { return 1 }\n"  # missing ';': every C compiler refuses it


@dataclass
class NinjaRun:
    log: Path  # the .ninja_log
    output: Path  # console output
    exit_code: int


def project(root: Path, *, bad: bool = False, slow: bool = False, killed: bool = False) -> Path:
    """``obj/u<i>.o`` for GOOD sources; ``bad``: ``obj/bad.o`` after them fails to compile;
    ``slow``: ``slow.stamp`` after them touches ``started.marker`` and sleeps 600 s; ``killed``:
    ``killed.stamp`` after them is killed by SIGKILL (its shell kills itself, as the OOM killer would)."""
    assert NINJA and CC, "the outcome tests need ninja (test extra) and a C compiler"
    (root / "src").mkdir(parents=True, exist_ok=True)
    objs = []
    lines = [f"rule cc\n  command = {CC} -c $in -o $out\n  description = CC $out\n",
             f"rule slow\n  command = touch {root / 'started.marker'} && sleep 600 && touch $out\n"
             "  description = SLOW $out\n"]
    for i in range(GOOD):
        (root / "src" / f"u{i}.c").write_text(f"int unit{i}(int x) {{ return x * {i + 1}; }}\n")
        objs.append(f"obj/u{i}.o")
        lines.append(f"build obj/u{i}.o: cc src/u{i}.c\n")
    after = " ".join(objs)  # implicit deps: with -j1 the good objects finish (and are logged) first
    if bad:
        (root / "src" / "bad.c").write_text(BAD_SOURCE)
        lines.append(f"build obj/bad.o: cc src/bad.c | {after}\n")
        objs.append("obj/bad.o")
    if slow:
        lines.append(f"build slow.stamp: slow | {after}\n")
        objs.append("slow.stamp")
    if killed:
        lines.append(f"rule kill\n  command = kill -9 $$$$\n  description = KILL $out\n"
                     f"build killed.stamp: kill | {after}\n")
        objs.append("killed.stamp")
    lines.append(f"build all: phony {' '.join(objs)}\ndefault all\n")
    (root / "build.ninja").write_text("".join(lines))
    return root


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # A blocked signal stays blocked across exec, and ninja waits for work with the mask it was
    # started with (pselect): SIGINT blocked in the thread that started it, ninja never sees it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _signals_of(pid: int) -> str:
    """The signal lines of /proc/PID/status (blocked, ignored, caught), for a failure message."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return " ".join(line.strip() for line in f if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    except OSError as exc:
        return f"(no /proc status: {exc})"


def run(root: Path, *, interrupt: bool = False, timeout: float = 60.0, ninja: str | None = None) -> NinjaRun:
    """Run ``ninja -j1`` in ``root`` (``ninja``: that binary, default NINJA); ``interrupt``: SIGINT
    (as Ctrl-C) once the slow edge started."""
    out = root / "ninja.out"
    env = {**os.environ, "TERM": "dumb"}
    env.pop("NINJA_STATUS", None)  # the default "[%f/%t] " status lines
    with out.open("wb") as sink:
        # Ctrl-C as a terminal sends it: SIGINT at its default in ninja and its commands, whatever
        # disposition this test process has (an ignored signal stays ignored in every program
        # started below it, `sleep` included).
        proc = subprocess.Popen([str(ninja or NINJA), "-j1"], cwd=root, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_default_sigint)
        try:
            if interrupt:
                marker = root / "started.marker"
                deadline = time.monotonic() + timeout
                while not marker.exists():
                    assert proc.poll() is None, f"ninja ended before the slow edge started: {out.read_text()}"
                    assert time.monotonic() < deadline, "the slow edge never started"
                    time.sleep(0.02)
                # What a terminal's Ctrl-C sends ninja's process group.  Once in a loaded full run
                # ninja did not stop within 60 s of one (its output had no "interrupted by user");
                # a user presses Ctrl-C again, and so does this, a bounded number of times.
                for _ in range(4):
                    os.killpg(proc.pid, signal.SIGINT)
                    try:
                        proc.wait(timeout / 4)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                else:
                    raise AssertionError(f"ninja did not stop on SIGINT: {_signals_of(proc.pid)}; "
                                         f"{out.read_text()[-500:]}")
            code = proc.wait(timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return NinjaRun(root / ".ninja_log", out, code)
