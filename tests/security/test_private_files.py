"""Everything the stack writes is its owner's alone, whatever the umask (real `buildtel up` and
`buildtel run --record` in subprocesses started with umask 000)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from buildtel.shared.files import open_private, private_dir, tighten_tree, write_private


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(BUILDER_TELEMETRY_CACHE_DIR=str(cache), BUILDER_TELEMETRY_FINISH_GRACE_S="0.3")
    return env


def _permissive() -> None:  # pragma: no cover - runs in the child
    os.umask(0)


def _open_to_others(root: Path) -> list[str]:
    bad = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if stat.S_IMODE(st.st_mode) & 0o077:
            bad.append(f"{path.relative_to(root)} {oct(stat.S_IMODE(st.st_mode))}")
    return bad


def test_the_stack_writes_only_private_files_under_a_permissive_umask(tmp_path: Path) -> None:
    cache = tmp_path / ".builder-cache"
    # A cache an older version left readable to everyone: tightened on start, with a log line.
    (cache / "telemetry").mkdir(parents=True)
    os.chmod(cache, 0o755)
    os.chmod(cache / "telemetry", 0o755)
    (cache / "telemetry" / "notes.txt").write_bytes(b"x")
    os.chmod(cache / "telemetry" / "notes.txt", 0o644)
    env = _env(cache)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "buildtel.cli.main", "up"], env=env, stdout=out,
                              stderr=subprocess.STDOUT, preexec_fn=_permissive)
    try:
        deadline = time.monotonic() + 60
        while not (cache / "stack.json").exists():
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "buildtel up did not start"
            time.sleep(0.1)
        work = tmp_path / "work"
        work.mkdir()
        (work / "Makefile").write_text("all: a.txt\na.txt:\n\techo hi > a.txt\n")
        run = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "run", "--record", "--", "make"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=120,
                             preexec_fn=_permissive)
        assert run.returncode == 0, run.stderr
        shown = None
        for _ in range(100):
            shown = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "sessions", "--json"], env=env,
                                   capture_output=True, text=True, timeout=60)
            if shown.returncode == 0 and json.loads(shown.stdout):
                break
            time.sleep(0.2)
        assert shown is not None and json.loads(shown.stdout), "the build was stored"
        # The build's own outputs keep the build's umask: telemetry changes nothing of the build.
        assert stat.S_IMODE((work / "a.txt").stat().st_mode) == 0o666
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(30)
    assert "removed group/other access from" in log.read_text()
    bad = _open_to_others(cache)
    assert not bad, "readable or writable by others:\n" + "\n".join(bad)
    assert {"telemetry", "engines", "recordings"} <= {p.name for p in cache.iterdir()}


def test_private_helpers_ignore_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        d = private_dir(tmp_path / "a" / "b")
        write_private(d / "f.json", "{}")
        with open_private(d / "g.log", "ab") as f:
            f.write(b"x")
        assert not _open_to_others(tmp_path / "a")
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "x").write_text("x")
        os.symlink("/etc/passwd", tmp_path / "c" / "link")  # never followed
        assert tighten_tree(tmp_path / "c") == 2 and not _open_to_others(tmp_path / "c")
        assert stat.S_IMODE(Path("/etc/passwd").stat().st_mode) & 0o004
    finally:
        os.umask(old)
