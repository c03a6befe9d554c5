"""``ReplayEngine``: restore a recording into a fresh sandbox, re-run it, compare the outputs.

What replay will run is limited on purpose: only the command of a manifest in the
*local* store (no command can be passed in), only once that manifest is shown to
be byte for byte the one written at record time (its SHA-256 and a MAC with the
store's key, ``shared/recording/trust.py``; an edited manifest is refused before
anything is restored or run), only with its working directory inside a new
sandbox directory, and the CLI only when asked with ``--execute``, after it has
printed the exact command and environment (:meth:`ReplayEngine.plan`).
Every manifest path is checked again at restore time (a manifest on disk may
have been edited): absolute paths, ``..`` that leaves the sandbox and symlinks
pointing out of it are refused before anything is written, and each file is
created with ``O_EXCL|O_NOFOLLOW`` below a directory whose real path is checked
to be inside the sandbox.  The sandbox is a directory, not a jail: the command
runs with the user's rights, as it did when it was recorded.

The environment is the recorded one, except that variables whose values were
redacted are *left out* (their secret was never stored) and ``PWD`` names the
sandbox.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from buildtel.shared.protocol import Event
from buildtel.shared.recording.capture import PER_RUN_VARS, VOLATILE, scan_tree
from buildtel.shared.recording.manifest import (
    FileEntry,
    RecordingManifest,
    UnsafePath,
    check_entry,
)
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.recording.trust import ManifestUntrusted
from buildtel.shared.redaction import REDACTED
from buildtel.shared.settings import Settings

DEFAULT_TIMEOUT_S = 3600.0


class ReplayError(RuntimeError):
    pass


@dataclass
class ReplayPlan:
    """Exactly what :meth:`ReplayEngine.run` will execute, from a verified manifest."""

    manifest: RecordingManifest
    manifest_sha256: str  # verified against the hash recorded at record time
    command: list[str]
    env: dict[str, str]  # the whole environment of the command, nothing added later
    not_restored_env: list[str]  # recorded with a redacted value: left out
    base: Path  # the sandbox: the tree is restored into base/work, the log is base/replay.log

    @property
    def workdir(self) -> Path:
        return self.base / "work"


@dataclass
class OutputDiff:
    path: str
    expected: str  # recorded sha256
    actual: str | None  # None: the replay did not produce it
    reason: str  # "differs" | "missing"


@dataclass
class ReplayResult:
    recording_id: str
    reproducible: bool
    exit_code: int | None
    recorded_exit_code: int | None
    outputs_checked: int
    differing: list[OutputDiff] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # produced now, not recorded (informational)
    not_restored_env: list[str] = field(default_factory=list)
    not_restored_files: list[str] = field(default_factory=list)  # recorded by hash only
    sandbox: Path | None = None  # kept only when asked
    duration_s: float = 0.0
    log: str = ""  # tail of the command's output

    @property
    def status(self) -> str:
        return "reproducible" if self.reproducible else "not reproducible"


class ReplayEngine:
    def __init__(self, settings: Settings | None = None, *, store: RecordingStore | None = None) -> None:
        self.store = store or RecordingStore.from_settings(settings or Settings())

    # -- reading --------------------------------------------------------------------------------
    def manifest(self, rid: str) -> RecordingManifest:
        return self.store.load_manifest(rid)

    def events(self, rid: str) -> list[Event]:
        """The recording's event stream (by its session id), or a recorded session's stream."""
        sid = rid
        if self.store.has_manifest(rid):
            sid = self.store.load_manifest(rid).session_id or rid
        return self.store.load_events(sid)

    # -- restoring ------------------------------------------------------------------------------
    def restore(self, rid: str | RecordingManifest, dest: Path) -> list[FileEntry]:
        """Write the recording's inputs under ``dest`` (which must be empty or absent).
        Path checks apply whatever the manifest's origin; pass a verified manifest to restore
        exactly what was checked."""
        m = self.manifest(rid) if isinstance(rid, str) else rid
        # Validate everything first so a bad entry aborts before a single byte is written.
        entries = [(check_entry(e), e) for e in m.inputs]
        # Inputs the build itself rewrote were recorded by hash only: nothing to restore, and
        # the replayed build regenerates them (make's .d files are the usual case).
        entries = [(n, e) for n, e in entries if e.kind == "symlink" or e.stored]
        missing = [e.path for _, e in entries if e.kind == "file" and not self.store.has_object(e.sha256)]
        if missing:
            raise ReplayError(f"{len(missing)} input(s) have no content in the store, e.g. {missing[0]!r}")
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise ReplayError(f"sandbox {dest} is not empty")
        real_root = dest.resolve()
        # Files first, symlinks last: no file is ever written through a restored link.
        for norm, e in sorted(entries, key=lambda pe: (pe[1].kind == "symlink", pe[0])):
            target = dest / norm
            parent = target.parent
            parent.mkdir(parents=True, exist_ok=True)
            real_parent = parent.resolve()
            if real_parent != real_root and real_root not in real_parent.parents:
                raise UnsafePath(f"restoring {e.path!r} would leave the sandbox")
            if e.kind == "symlink":
                # Judge the link text from where the link really lands (an earlier link may
                # have moved its directory), not only lexically.
                lands = Path(os.path.normpath(real_parent / (e.target or "")))
                if lands != real_root and real_root not in lands.parents:
                    raise UnsafePath(f"symlink {e.path!r} -> {e.target!r} would point outside the sandbox")
                os.symlink(e.target or "", target)
                continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                for chunk in self.store.read_object(e.sha256):
                    f.write(chunk)
            os.chmod(target, e.mode & 0o755)  # never restore setuid/setgid/sticky or world-write
            if e.mtime_ns:
                # Same mtimes as recorded, so make and ninja take the same decisions.
                os.utime(target, ns=(e.mtime_ns, e.mtime_ns))
        for norm, e in entries:  # a chain of links must not end outside either
            if e.kind == "symlink":
                real = (dest / norm).resolve()
                if real != real_root and real_root not in real.parents:
                    raise UnsafePath(f"symlink {e.path!r} resolves outside the sandbox")
        return [e for _, e in entries]

    def replay_env(self, m: RecordingManifest, workdir: Path) -> tuple[dict[str, str], list[str]]:
        recorded = m.environment.env if m.environment else {}
        # A value with a redacted part (https://[REDACTED]@host) is as unusable as a redacted one.
        env = {k: v for k, v in recorded.items() if REDACTED not in v and k not in PER_RUN_VARS}
        env["PWD"] = str(workdir)
        env.pop("OLDPWD", None)
        # PWD is set above (the redaction rules take its name for a password variable).
        return env, sorted(k for k, v in recorded.items() if REDACTED in v and k != "PWD")

    # -- replaying ------------------------------------------------------------------------------
    def plan(self, rid: str, *, sandbox_root: Path | None = None) -> ReplayPlan:
        """Verify the manifest and decide the command, environment and sandbox; runs nothing.
        Raises ReplayError (with the reason) for a manifest that cannot be trusted or run.
        The sandbox directory exists afterwards: :meth:`run` or :func:`cleanup` removes it."""
        try:
            m, sha = self.store.load_verified_manifest(rid)
        except ManifestUntrusted as exc:
            raise ReplayError(f"refusing to replay: {exc}") from None
        if not m.command:
            raise ReplayError(f"recording {rid} has no command to replay")
        if m.argv_redacted:
            raise ReplayError(f"recording {rid}'s command line held a secret that was redacted; it cannot be re-run")
        if sandbox_root is not None:
            sandbox_root.mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix=f"buildtel-replay-{rid[:8]}-", dir=sandbox_root))
        # The log sits beside the tree (base/work), not in it, so it is never an "extra".
        env, dropped = self.replay_env(m, base / "work")
        return ReplayPlan(manifest=m, manifest_sha256=sha, command=list(m.command), env=env,
                          not_restored_env=dropped, base=base)

    def replay(self, rid: str, *, keep: bool = False, sandbox_root: Path | None = None,
               timeout: float = DEFAULT_TIMEOUT_S) -> ReplayResult:
        """Verify, restore, re-run and compare. The sandbox is deleted afterwards unless ``keep``."""
        return self.run(self.plan(rid, sandbox_root=sandbox_root), keep=keep, timeout=timeout)

    def run(self, plan: ReplayPlan, *, keep: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> ReplayResult:
        """Carry out ``plan``: restore its (verified) manifest, run exactly ``plan.command`` with
        exactly ``plan.env``, compare. The sandbox is deleted afterwards unless ``keep``."""
        m, base, work, env, dropped = plan.manifest, plan.base, plan.workdir, plan.env, plan.not_restored_env
        try:
            self.restore(m, work)
            started = time.monotonic()
            with open(base / "replay.log", "wb") as logf:
                try:
                    proc = subprocess.run(plan.command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                          stderr=subprocess.STDOUT, timeout=timeout, check=False)
                    exit_code: int | None = proc.returncode
                except FileNotFoundError as exc:
                    raise ReplayError(f"cannot run {m.command[0]!r}: {exc}") from None
                except subprocess.TimeoutExpired:
                    exit_code = None
            result = self._compare(m, work, exit_code)
            result.duration_s = time.monotonic() - started
            result.not_restored_env = dropped
            result.not_restored_files = [e.path for e in m.inputs if e.kind == "file" and not e.stored]
            result.log = (base / "replay.log").read_bytes()[-4000:].decode(errors="replace")
            result.sandbox = base if keep else None
            return result
        finally:
            if not keep:
                shutil.rmtree(base, ignore_errors=True)

    def _compare(self, m: RecordingManifest, work: Path, exit_code: int | None) -> ReplayResult:
        now = scan_tree(work, set(), max_files=10_000_000)
        differing: list[OutputDiff] = []
        for out in m.outputs:
            got = now.get(out.path)
            if got is None:
                differing.append(OutputDiff(out.path, out.sha256, None, "missing"))
            elif got.sha256 != out.sha256:
                differing.append(OutputDiff(out.path, out.sha256, got.sha256, "differs"))
        known = {e.path for e in m.inputs} | {e.path for e in m.outputs}
        extra = sorted(p for p in now if p not in known and p.rsplit("/", 1)[-1] not in VOLATILE)
        same_exit = m.exit_code is None or exit_code == m.exit_code
        return ReplayResult(recording_id=m.id, reproducible=not differing and same_exit, exit_code=exit_code,
                            recorded_exit_code=m.exit_code, outputs_checked=len(m.outputs),
                            differing=differing, extra=extra)


def cleanup(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
