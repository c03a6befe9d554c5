"""Automatic capture for ``buildtel run --record``: which files a build read and wrote.

The run command calls :meth:`RunCapture.before` just before it starts the
command and :meth:`RunCapture.after` once it has exited::

    cap = RunCapture(settings)
    cap.before(cwd, argv, env, session_id=client.session_id)
    exit_code = run(argv)
    recording_id = cap.after(exit_code)

(``cli/cmd_run.py`` uses the two wrappers at the end of this module,
:func:`start_run_capture` and :func:`finish_run_capture`.)

*Outputs* come from a scan of the working tree before and after: files created
or rewritten (size, mtime or inode changed) are outputs, files that disappeared
are "removed".  *Inputs* come from what the build tool knows when it is ``make``
(its database, ``make -pn``, after the build, so dependency files written by
``-MMD`` are included) or ``ninja`` (``-t inputs`` plus the deps log); for any
other command, or when the tool cannot be asked, every file that existed before
the build and was left untouched is an input (a superset of what was read).
``docs/recorder.md`` lists what this cannot see.

Recording must never break the build: both methods catch their own errors,
log them, and ``after`` then returns ``None`` (``error`` says why).
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from buildtel.shared.files import write_private
from buildtel.shared.logs import get_logger
from buildtel.shared.recording import toolquery
from buildtel.shared.recording.manifest import FileEntry, UnsafePath, is_recording_id
from buildtel.shared.recording.recorder import BuildRecorder
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.settings import Settings

log = get_logger("recorder.capture")

# VCS metadata, and our own data directory wherever it is (another checkout's, a default one).
SKIP_DIRS = frozenset({".git", ".hg", ".svn", ".jj", ".builder-cache"})
# Tool bookkeeping rewritten by every run, with timestamps: never a build product to compare.
VOLATILE = frozenset({".ninja_log", ".ninja_deps"})
DEFAULT_MAX_FILES = 200_000
MAX_EXTERNAL = 5000
MAX_EXTERNAL_BYTES = 64 * 1024 * 1024
# Set by ``buildtel run`` for this one run: recording them would make every diff show them and
# make a replay report into the original session.
PER_RUN_VARS = frozenset({"BUILDER_TELEMETRY_SESSION_ID", "TRACEPARENT", "TRACESTATE"})


@dataclass(frozen=True, slots=True)
class FileState:
    size: int
    mtime_ns: int
    ino: int
    mode: int
    sha256: str | None  # None until hashed
    link: str | None = None  # symlink text

    def same_stat(self, other: FileState) -> bool:
        return (self.size, self.mtime_ns, self.ino, self.mode, self.link) == (
            other.size, other.mtime_ns, other.ino, other.mode, other.link)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


class TreeTooLarge(RuntimeError):
    pass


def scan_tree(root: Path, exclude: set[Path], *, max_files: int = DEFAULT_MAX_FILES,
              previous: Mapping[str, FileState] | None = None) -> dict[str, FileState]:
    """Stat every file under ``root`` (symlinks not followed) and hash the ones whose stat is
    new or differs from ``previous``: the before-scan hashes all, the after-scan only changes."""
    out: dict[str, FileState] = {}
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        # A virtualenv is a toolchain, like the compiler: not recorded (docs/recorder.md).
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and (here / d) not in exclude
                   and not (here / d / "pyvenv.cfg").is_file()]
        # os.walk lists symlinks to directories under dirs and never descends into them;
        # they are recorded as links, like symlinks to files.
        names = files + [d for d in dirs if (here / d).is_symlink()]
        for name in names:
            full = here / name
            rel = full.relative_to(root).as_posix()
            try:
                st = os.lstat(full)
            except OSError:
                continue  # vanished while scanning
            link = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
            if link is None and not stat.S_ISREG(st.st_mode):
                continue  # sockets, fifos, devices: nothing to record
            state = FileState(st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode, None, link)
            old = previous.get(rel) if previous else None
            if old is not None and old.same_stat(state):
                out[rel] = old
            else:
                try:
                    sha = hashlib.sha256(link.encode()).hexdigest() if link is not None else sha256_file(full)
                except OSError:
                    continue
                out[rel] = FileState(st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode, sha, link)
            if len(out) > max_files:
                raise TreeTooLarge(f"more than {max_files} files under {root}: not recording")
    return out


class RunCapture:
    """Before/after capture of one command run; ``inputs`` is auto, make, ninja or tree."""

    def __init__(self, settings: Settings, *, inputs: str = "auto", store: RecordingStore | None = None,
                 max_files: int = DEFAULT_MAX_FILES) -> None:
        if inputs not in {"auto", "make", "ninja", "tree"}:
            raise ValueError(f"inputs must be auto, make, ninja or tree, not {inputs!r}")
        self.settings = settings
        self.mode = inputs
        self.recorder = BuildRecorder(settings, store=store)
        self.max_files = max_files
        self.error: str | None = None
        self.recording_id: str | None = None
        self._root: Path | None = None
        self._argv: list[str] = []
        self._env: dict[str, str] = {}
        self._before: dict[str, FileState] = {}
        self._exclude: set[Path] = set()

    def before(self, cwd: str | os.PathLike[str], argv: Sequence[str], env: Mapping[str, str] | None = None,
               *, session_id: str | None = None) -> str | None:
        """Snapshot the tree and start the recording; returns its id (``None`` if it cannot record)."""
        try:
            self._root = Path(cwd).absolute()
            self._argv = [str(a) for a in argv]
            self._env = dict(os.environ if env is None else env)
            # The store itself may live in the tree (.builder-cache is relative): never scan it.
            self._exclude = {self.settings.cache_dir.absolute(), self.recorder.store.root.absolute()}
            self._before = scan_tree(self._root, self._exclude, max_files=self.max_files,
                                     previous=self._load_hash_cache())
            sid = session_id if session_id and is_recording_id(session_id) else None
            recorded_env = {k: v for k, v in self._env.items() if k not in PER_RUN_VARS}
            self.recording_id = self.recorder.start_recording(self._argv, cwd=self._root, env=recorded_env,
                                                              session_id=sid)
            return self.recording_id
        except Exception as exc:  # noqa: BLE001 - recording must never stop the build
            self._fail("before", exc)
            return None

    def after(self, exit_code: int | None) -> str | None:
        """Scan again, work out inputs and outputs, write the manifest; returns the recording id."""
        if self.error or self._root is None or self.recording_id is None:
            return None
        try:
            return self._after(exit_code)
        except Exception as exc:  # noqa: BLE001 - a failed recording is reported, never fails the build
            self._fail("after", exc)
            return None

    # -- hash cache: the next recording of this tree re-hashes only what changed ----------------
    def _hash_cache_path(self) -> Path:
        key = hashlib.sha256(str(self._root).encode()).hexdigest()[:32]
        return self.recorder.store.root / "scan-cache" / f"{key}.msgpack"

    def _load_hash_cache(self) -> dict[str, FileState]:
        try:
            raw = msgspec.msgpack.decode(self._hash_cache_path().read_bytes(),
                                         type=dict[str, tuple[int, int, int, int, str, str | None]])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return {}
        return {rel: FileState(*fields) for rel, fields in raw.items()}

    def _save_hash_cache(self, states: Mapping[str, FileState]) -> None:
        # Like git's "racily clean" rule: a file modified in the same instant it was hashed
        # could change again without its mtime moving, so recent entries are not cached.
        cutoff = time.time_ns() - 2_000_000_000
        raw = {rel: (s.size, s.mtime_ns, s.ino, s.mode, s.sha256, s.link)
               for rel, s in states.items() if s.sha256 and s.mtime_ns < cutoff}
        path = self._hash_cache_path()
        try:
            write_private(path, msgspec.msgpack.encode(raw))
        except OSError as exc:
            log.debug("recorder.hash_cache_not_saved", error=str(exc))

    def _fail(self, stage: str, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        log.warning("recorder.capture_failed", stage=stage, error=self.error)

    # -- classification -------------------------------------------------------------------------
    def _after(self, exit_code: int | None) -> str:
        root, rec = self._root, self.recorder
        assert root is not None
        after = scan_tree(root, self._exclude, max_files=self.max_files * 2, previous=self._before)
        self._save_hash_cache(after)
        written = {p for p, s in after.items() if p not in self._before or not self._before[p].same_stat(s)}
        untouched = {p for p in self._before if p in after and p not in written}
        for path in sorted(set(self._before) - set(after)):
            rec.record_removed(path)
        method, found = self._input_candidates()
        if found is None:
            chosen = untouched
        else:
            candidates, read_first = found
            chosen = set()
            for cand in candidates:
                rel = self._relative(cand)
                if rel is None:
                    self._external(cand)
                elif rel in untouched:
                    chosen.add(rel)
                elif rel in self._before and rel in written and cand in read_first:
                    # Read by the tool and then rewritten by the build (make's .d files on an
                    # incremental build): the old bytes are gone, keep the hash. Other rewritten
                    # targets were only outputs.
                    old = self._before[rel]
                    rec.record_input_hash(FileEntry(path=rel, sha256=old.sha256 or "", size=old.size,
                                                    mtime_ns=old.mtime_ns, stored=False))
        for rel in sorted(chosen):
            known = self._before[rel].sha256
            self._record(functools.partial(rec.record_input, known_sha256=known), rel, expect=known)
        for rel in sorted(written):
            if rel.rsplit("/", 1)[-1] not in VOLATILE:
                self._record(rec.record_output, rel)
        return rec.stop_recording(exit_code, input_method=method)

    def _record(self, fn: Callable[[str], list[FileEntry]], rel: str, expect: str | None = None) -> None:
        try:
            entries = fn(rel)
        except UnsafePath as exc:
            self.recorder.refuse(rel, str(exc))
            return
        except OSError as exc:
            self.recorder.note(f"could not read {rel}: {exc}")
            return
        if expect and entries and entries[0].kind == "file" and entries[0].sha256 != expect:
            self.recorder.note(f"{rel} changed during the build without changing size or mtime")

    def _relative(self, path: str) -> str | None:
        """``path`` relative to the root in POSIX form, or ``None`` when it lies outside."""
        assert self._root is not None
        p = Path(os.path.normpath(path if os.path.isabs(path) else self._root / path))
        try:
            return p.relative_to(self._root).as_posix()
        except ValueError:
            return None

    def _external(self, path: str) -> None:
        if not self.recorder.wants_external(path, limit=MAX_EXTERNAL):
            return
        sha = ""
        try:
            if os.path.isfile(path) and os.path.getsize(path) <= MAX_EXTERNAL_BYTES:
                sha = sha256_file(path)
        except OSError:
            pass
        self.recorder.record_external(path, sha)

    def _input_candidates(self) -> tuple[str, toolquery.Found | None]:
        """(method, (paths the build used, paths read first)) — ``None`` means "use the tree"."""
        assert self._root is not None
        tool = toolquery.detect(self._argv) if self.mode == "auto" else self.mode
        if tool == "tree" or tool is None:
            return "tree", None
        started = time.monotonic()
        try:
            found = toolquery.inputs(tool, self._argv, self._root, self._env)
        except toolquery.QueryFailed as exc:
            self.recorder.note(f"{tool} could not list its inputs ({exc}); recorded the whole tree instead")
            return "tree", None
        log.debug("recorder.inputs_queried", tool=tool, paths=len(found[0]), seconds=time.monotonic() - started)
        return tool, found


# -- the two calls ``buildtel run --record`` makes ----------------------------------------------
def start_run_capture(settings: Settings, argv: Sequence[str], env: Mapping[str, str],
                      session_id: str | None) -> RunCapture:
    """Snapshot the working tree before the command is spawned (the recording id is the session id)."""
    cap = RunCapture(settings)
    cap.before(os.getcwd(), argv, env, session_id=session_id)
    return cap


def finish_run_capture(cap: RunCapture, exit_code: int | None, *, quiet: bool = False) -> str | None:
    """Write the recording after the command exited; one line on stderr says where it went."""
    import sys

    rid = cap.after(exit_code)
    if rid is None:
        print(f"buildtel: warning: files not recorded ({cap.error})", file=sys.stderr)
    elif not quiet:
        m = cap.recorder.store.load_manifest(rid)
        print(f"buildtel: recorded {len(m.inputs)} inputs and {len(m.outputs)} outputs as {rid} "
              f"(buildtel replay {rid} --execute)", file=sys.stderr)
    return rid
