"""Git facts of a checkout, read from the ``.git`` files themselves before a build starts.

The three ``git`` commands used before ran with the other probes in a low-priority thread,
which a busy machine starved past the point where the session start was sent, so commit,
branch and remote were missing exactly when a farm was busy.  Reading ``HEAD``, the loose
ref, ``packed-refs`` and ``config`` is a handful of small file reads, done synchronously
before the build starts: 0.15 ms here against 6-11 ms for the three commands
(``benchmarks/bench_vcs_capture.py``).  Only ``dirty`` needs ``git status`` (it compares
the work tree with the index); :class:`StatusProbe` starts it without waiting and
harvests it later, bounded in time, and says why when it has no answer.

What file reading does not do, by choice: ``url.<base>.insteadOf`` rewrites and
``[include]`` files are not applied to the remote (it is the URL as written in
``.git/config``), and discovery does not stop at ``GIT_CEILING_DIRECTORIES`` or at
filesystem boundaries.  A repository with the ``reftable`` ref storage has no
ref files: commit and branch then come from ``git`` itself (bounded), or are
recorded as missing with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from buildtel.shared.protocol import VcsInfo

GIT_TIMEOUT_S = 1.0  # fallback `git rev-parse` for reftable repositories
STATUS_TIMEOUT_S = 5.0  # `git status` for `dirty`; past this it is recorded as missing
_OBJECT_ID = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # SHA-1 or SHA-256
_SECTION = re.compile(r'\[\s*([A-Za-z0-9.-]+)(?:\s+"((?:[^"\\]|\\.)*)")?\s*\]')


class VcsError(Exception):
    """The repository's files are not what git writes (or could not be read)."""


@dataclass
class GitDirs:
    worktree: Path
    gitdir: Path  # this worktree's own directory (HEAD lives here)
    common: Path  # refs, packed-refs and config shared by all worktrees


@dataclass
class VcsRead:
    """What :func:`read_vcs` found: ``info`` is None outside a repository."""

    info: VcsInfo | None = None
    missing: dict[str, str] = field(default_factory=dict)  # probe -> why it has no value
    dirs: GitDirs | None = None


def find_git(cwd: str, environ: Mapping[str, str] | None = None) -> GitDirs | None:
    """The repository ``cwd`` is in, as git would find it (``GIT_DIR`` honoured), or None."""
    environ = os.environ if environ is None else environ
    if environ.get("GIT_DIR"):
        gitdir = Path(cwd, environ["GIT_DIR"])
        worktree = Path(cwd, environ.get("GIT_WORK_TREE") or ".")
        return GitDirs(worktree, gitdir, _common(gitdir)) if gitdir.is_dir() else None
    here = Path(cwd).absolute()
    for d in (here, *here.parents):
        dotgit = d / ".git"
        if dotgit.is_dir():
            return GitDirs(d, dotgit, _common(dotgit))
        if dotgit.is_file():  # a linked worktree or a submodule: "gitdir: <path>"
            text = dotgit.read_text(errors="replace").strip()
            if not text.startswith("gitdir:"):
                raise VcsError(f"{dotgit} does not name a git directory (starts {text[:40]!r})")
            gitdir = Path(d, text[len("gitdir:"):].strip())
            return GitDirs(d, gitdir, _common(gitdir))
    return None


def _common(gitdir: Path) -> Path:
    try:
        rel = (gitdir / "commondir").read_text().strip()
    except OSError:
        return gitdir
    return Path(gitdir, rel)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise VcsError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _packed_refs(common: Path) -> dict[str, str]:
    text = _read(common / "packed-refs") or ""
    refs: dict[str, str] = {}
    for line in text.splitlines():
        if line and line[0] not in "#^":
            oid, _, name = line.partition(" ")
            refs[name.strip()] = oid
    return refs


def resolve_ref(dirs: GitDirs, ref: str, depth: int = 0) -> str | None:
    """The object id ``ref`` points to (following symbolic refs), None if the ref does not exist."""
    if not ref.startswith("refs/") or ".." in ref.split("/") or depth > 5:
        raise VcsError(f"unexpected ref {ref[:100]!r}")
    for base in (dirs.gitdir, dirs.common):  # per-worktree refs first, then the shared ones
        text = _read(base / ref)
        if text is None:
            continue
        if text.startswith("ref:"):
            return resolve_ref(dirs, text[4:].strip(), depth + 1)
        if not _OBJECT_ID.fullmatch(text):
            raise VcsError(f"{base / ref} holds {text[:60]!r}, not an object id")
        return text
    return _packed_refs(dirs.common).get(ref)


def head(dirs: GitDirs) -> tuple[str | None, str | None]:
    """(commit, branch) of HEAD: branch "HEAD" when detached (as ``git rev-parse --abbrev-ref``
    says, so per-branch series keep their key), commit None on a branch with no commit yet."""
    text = _read(dirs.gitdir / "HEAD")
    if text is None:
        raise VcsError(f"{dirs.gitdir} has no HEAD file")
    if _OBJECT_ID.fullmatch(text):
        return text, "HEAD"
    if not text.startswith("ref:"):
        raise VcsError(f"{dirs.gitdir / 'HEAD'} holds {text[:60]!r}")
    ref = text[4:].strip()
    branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else ref.removeprefix("refs/")
    return resolve_ref(dirs, ref), branch


def _unquote(value: str) -> str:
    """A git-config value: quotes removed, escapes applied, a trailing comment and the
    whitespace around the value dropped (whitespace inside quotes or escaped is kept)."""
    out: list[tuple[str, bool]] = []  # (character, protected from trimming)
    quoted, i = False, 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            out.append(({"n": "\n", "t": "\t", "b": "\b"}.get(value[i + 1], value[i + 1]), True))
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c in "#;" and not quoted:
            break
        else:
            out.append((c, quoted))
        i += 1
    lo, hi = 0, len(out)
    while lo < hi and out[lo][0].isspace() and not out[lo][1]:
        lo += 1
    while hi > lo and out[hi - 1][0].isspace() and not out[hi - 1][1]:
        hi -= 1
    return "".join(c for c, _ in out[lo:hi])


def origin_url(dirs: GitDirs) -> str | None:
    """``remote.origin.url`` as written in the repository's config (the last one wins, like git)."""
    text = _read(dirs.common / "config") or ""
    section: tuple[str, str | None] | None = None
    url = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            m = _SECTION.match(line)
            if m is None:
                section = None
                continue
            name, sub = m.group(1).lower(), m.group(2)
            if sub is None and "." in name:  # the old [remote.origin] spelling
                name, _, sub = name.partition(".")
            section = (name, sub)
            line = line[m.end():].strip()  # `[remote "origin"] url = …` on one line
            if not line:
                continue
        if section == ("remote", "origin"):
            key, sep, value = line.partition("=")
            if sep and key.strip().lower() == "url":
                url = _unquote(value)
    return url or None


def _git(args: list[str], cwd: Path) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                             check=False, env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"))
    except subprocess.TimeoutExpired as exc:
        raise VcsError(f"git {args[0]} did not answer within {GIT_TIMEOUT_S:.1f} s") from exc
    except OSError as exc:
        raise VcsError(f"cannot run git: {exc.strerror or exc}") from exc
    if out.returncode != 0:
        raise VcsError(f"git {args[0]} failed (exit {out.returncode}): {out.stderr.strip()[:200]}")
    return out.stdout.strip()


def _head_via_git(dirs: GitDirs) -> tuple[str | None, str | None]:
    commit = _git(["rev-parse", "--verify", "-q", "HEAD"], dirs.worktree) or None
    branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], dirs.worktree) if commit else None
    return commit, branch


def read_vcs(cwd: str, environ: Mapping[str, str] | None = None) -> VcsRead:
    """Commit, branch and remote of the checkout ``cwd`` is in, from its files; ``dirty`` is left
    False for :class:`StatusProbe` to fill in.  Never raises: what it cannot read is in ``missing``."""
    try:
        dirs = find_git(cwd, environ)
    except (VcsError, OSError) as exc:
        return VcsRead(missing={"vcs": f"cannot locate the repository: {exc}"})
    if dirs is None:
        return VcsRead()  # not a checkout: nothing is missing
    info, missing = VcsInfo(), {}
    try:
        reftable = (dirs.common / "reftable").is_dir()
        info.commit, info.branch = _head_via_git(dirs) if reftable else head(dirs)
    except VcsError as exc:
        missing["vcs.commit"] = missing["vcs.branch"] = str(exc)
    try:
        remote = origin_url(dirs)
    except VcsError as exc:
        missing["vcs.remote"], remote = str(exc), None
    if remote:  # credentials in the URL (user-info, ?token=) must not leave the agent
        from buildtel.shared.redaction import redact_text

        info.remote = redact_text(remote)
    return VcsRead(info=info, missing=missing, dirs=dirs)


class StatusProbe:
    """``git status`` for ``dirty``, started now and read later (at most ``timeout_s`` after the start).

    Its output goes to an unnamed temporary file, not a pipe: a work tree with many changes
    would fill a pipe nobody reads yet and stall git.  ``GIT_OPTIONAL_LOCKS=0`` keeps it from
    taking ``index.lock``, which a build that runs git itself could trip over."""

    def __init__(self, worktree: Path, timeout_s: float = STATUS_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.t0 = time.monotonic()
        self.dirty: bool | None = None
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._done = False
        # Closed by result(), which every owner calls (EnvironmentSnapshot.result/close).
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call; closed by result()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call; closed by result()
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=worktree, stdin=subprocess.DEVNULL,
                stdout=self._out, stderr=self._err, env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"))
        except OSError as exc:
            self._proc = None
            self.reason = f"cannot run git status: {exc.strerror or exc}"
            self._close_files()

    def result(self, wait: bool) -> tuple[bool | None, str | None]:
        """(dirty, None) or (None, why not).  ``wait``: up to the time-out; otherwise a status
        still running is stopped now and reported as missing.  Any thread; the first answer stays."""
        proc = self._proc
        if wait and proc is not None:
            try:
                proc.wait(max(self.timeout_s - (time.monotonic() - self.t0), 0.0))
            except subprocess.TimeoutExpired:
                pass
        with self._lock:
            if self._done or proc is None:
                return self.dirty, self.reason
            self._done = True
            code = proc.poll()
            if code is None:
                proc.kill()
                proc.wait()
                self.reason = (f"git status did not finish within {self.timeout_s:.1f} s" if wait else
                               f"git status still running {time.monotonic() - self.t0:.1f} s after it started, "
                               f"when the session start was sent")
            elif code == 0:
                self.dirty = self._out.seek(0, os.SEEK_END) > 0
            else:
                self._err.seek(0)
                err = self._err.read(400).decode(errors="replace").strip().splitlines()
                self.reason = f"git status failed (exit {code})" + (f": {err[0]}" if err else "")
            self._close_files()
        return self.dirty, self.reason

    def _close_files(self) -> None:
        for f in (self._out, self._err):
            if not f.closed:
                f.close()
