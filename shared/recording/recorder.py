"""``BuildRecorder``: capture one build — command, environment, inputs, outputs — into the store.

Usage::

    rec = BuildRecorder(settings)
    rid = rec.start_recording(["make", "-j8"], cwd=".")
    ...                       # the build runs
    rec.record_input("src/main.c"); rec.record_output("prog")
    rid = rec.stop_recording(exit_code=0)

Paths are relative to the working directory.  A path that leaves it — absolute,
``..``, or through a symlink pointing outside — raises :class:`UnsafePath` at
record time, so it never reaches a manifest.  The environment is redacted by
``buildtel.shared.redaction`` *before* it is stored (secret values are replaced, names
are kept), and so is the command line; nothing else of the environment is
written.  ``shared/recording/capture.py`` decides which files to record for
``buildtel run --record``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from buildtel.shared.environment import DEFAULT_TOOLS, capture
from buildtel.shared.files import write_private
from buildtel.shared.protocol import BuildEnvironment, Event, new_session_id
from buildtel.shared.recording.manifest import (
    ExternalInput,
    FileEntry,
    RecordingManifest,
    UnsafePath,
    is_recording_id,
    normalize_relpath,
    safe_relpath,
)
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.redaction import redact_argv, redact_env
from buildtel.shared.settings import Settings

GC_INTERVAL_S = 3600.0


class RecorderError(RuntimeError):
    pass


class BuildRecorder:
    """Records one build at a time; create one per build (it is not thread-safe)."""

    def __init__(self, settings: Settings | None = None, *, store: RecordingStore | None = None) -> None:
        if store is None:
            store = RecordingStore.from_settings(settings or Settings())
        self.store = store
        self._m: RecordingManifest | None = None
        self._root: Path | None = None
        self._inputs: dict[str, FileEntry] = {}
        self._outputs: dict[str, FileEntry] = {}
        self._external: set[str] = set()
        self._env: dict[str, str] = {}
        self._tools: tuple[str, ...] = DEFAULT_TOOLS

    @property
    def recording_id(self) -> str | None:
        return self._m.id if self._m else None

    @property
    def root(self) -> Path:
        if self._root is None:
            raise RecorderError("no recording in progress: call start_recording() first")
        return self._root

    def start_recording(self, args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None,
                        env: Mapping[str, str] | None = None, session_id: str | None = None,
                        recording_id: str | None = None, tools: tuple[str, ...] = DEFAULT_TOOLS,
                        environment: BuildEnvironment | None = None) -> str:
        """Begin a recording of ``args`` run in ``cwd``; returns the recording id.

        The id is the bus session id when one is given (one id for both), else a new one.
        """
        if self._m is not None:
            raise RecorderError(f"recording {self._m.id} is still in progress")
        rid = recording_id or session_id or new_session_id()
        if not is_recording_id(rid) or (session_id is not None and not is_recording_id(session_id)):
            raise ValueError("recording and session ids are 32 lowercase hex digits")
        root = Path(cwd or os.getcwd()).absolute()
        if environment is not None:  # never trust a caller to have redacted
            environment.env = redact_env(environment.env)
        # The machine and tool probes (``gcc --version``…) run at stop time, so they never
        # delay the build's start; the variables are taken now, redacted at once.
        self._env = redact_env(os.environ if env is None else env)
        self._tools = tools
        command = [str(a) for a in args]
        safe_command = redact_argv(command)
        self._root = root
        self._inputs, self._outputs, self._external = {}, {}, set()
        now = time.time()
        self._m = RecordingManifest(id=rid, created=now, started=now, command=safe_command, cwd=str(root),
                                    environment=environment, session_id=session_id,
                                    argv_redacted=safe_command != command)
        return rid

    # -- files ----------------------------------------------------------------------------------
    def _entries(self, path: str | os.PathLike[str], known_sha256: str | None = None) -> list[FileEntry]:
        root = self.root
        norm = safe_relpath(root, os.fspath(path))
        full = root / norm
        st = os.lstat(full)
        if stat.S_ISDIR(st.st_mode):
            found: list[FileEntry] = []
            for dirpath, dirs, files in os.walk(full):  # does not follow symlinked directories
                for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(dirpath, d))):
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    found.extend(self._entries(rel))
            return found
        if stat.S_ISLNK(st.st_mode):
            # Store the link relative to its own directory so the restored link points into the
            # sandbox, whatever the original link text (absolute or not) was.
            target = os.path.relpath(full.resolve(), full.parent.resolve()).replace(os.sep, "/")
            sha = hashlib.sha256(target.encode()).hexdigest()
            return [FileEntry(path=norm, sha256=sha, size=len(target), kind="symlink", target=target,
                              mtime_ns=st.st_mtime_ns, mode=0o777, stored=False)]
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{norm!r} is neither a regular file, a directory nor a symlink")
        if known_sha256 and self.store.has_object(known_sha256):
            # Hashed moments ago by the caller's scan and already stored: no need to read it again.
            os.utime(self.store.object_path(known_sha256))
            sha, size = known_sha256, st.st_size
        else:
            sha, size = self.store.put_file(full)
        return [FileEntry(path=norm, sha256=sha, size=size, mode=stat.S_IMODE(st.st_mode) & 0o777,
                          mtime_ns=st.st_mtime_ns)]

    def record_input(self, path: str | os.PathLike[str], *, known_sha256: str | None = None) -> list[FileEntry]:
        """Hash ``path`` (a file, symlink or directory) into the store as an input; returns the entries.

        ``known_sha256``: the caller just hashed this file (and vouches it is unchanged); when
        that content is already stored the file is not read again."""
        entries = self._entries(path, known_sha256)
        self._inputs.update((e.path, e) for e in entries)
        return entries

    def record_output(self, path: str | os.PathLike[str]) -> list[FileEntry]:
        """Hash ``path`` into the store as an output (call after the build wrote it)."""
        entries = self._entries(path)
        self._outputs.update((e.path, e) for e in entries)
        return entries

    def record_input_hash(self, entry: FileEntry) -> None:
        """An input whose content is gone (the build rewrote it): keep its hash, not its bytes."""
        self._inputs[entry.path] = entry

    def record_removed(self, path: str) -> None:
        """A file the build deleted (it no longer exists, so only the lexical check applies)."""
        self._manifest.removed.append(normalize_relpath(path))

    def record_external(self, path: str, sha256: str = "") -> None:
        """A file outside the root the build read: its path and hash, never its content."""
        self._manifest.external_inputs.append(ExternalInput(path=path, sha256=sha256))
        self._external.add(path)

    def wants_external(self, path: str, *, limit: int) -> bool:
        """Whether ``path`` is new and under the cap (hashing system headers is not free)."""
        return path not in self._external and len(self._external) < limit

    def refuse(self, path: str, reason: str) -> None:
        """Remember a path the capture saw but would not record (the manifest says why)."""
        self._manifest.refused.append(f"{path}: {reason}"[:500])

    def note(self, text: str) -> None:
        self._manifest.notes.append(text[:1000])

    @property
    def _manifest(self) -> RecordingManifest:
        if self._m is None:
            raise RecorderError("no recording in progress: call start_recording() first")
        return self._m

    # -- finish ---------------------------------------------------------------------------------
    def stop_recording(self, exit_code: int | None = None, *, events: list[Event] | None = None,
                       input_method: str | None = None) -> str:
        """Write the manifest (atomically) and return the recording id.

        ``events`` stores an event stream directly; otherwise the recorder service keeps
        the session's stream from the bus under the same session id.
        """
        m = self._manifest
        m.finished = time.time()
        if m.environment is None:
            m.environment = capture(str(self.root), environ=self._env, tools=self._tools)
        m.exit_code = exit_code
        m.inputs = sorted(self._inputs.values(), key=lambda e: e.path)
        m.outputs = sorted(self._outputs.values(), key=lambda e: e.path)
        if input_method:
            m.input_method = input_method
        if events is not None:
            self.store.save_events(m.session_id or m.id, events)
            if m.session_id is None:
                m.session_id = m.id
        self.store.save_manifest(m)
        self._m, self._root = None, None
        self._maybe_gc()
        return m.id

    def _maybe_gc(self) -> None:
        """Retention and the size cap, at most hourly, so recording stays cheap."""
        stamp = self.store.root / "gc.stamp"
        try:
            if time.time() - stamp.stat().st_mtime < GC_INTERVAL_S:
                return
        except FileNotFoundError:
            pass
        write_private(stamp, b"")
        self.store.gc()
