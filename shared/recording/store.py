"""The recording store: content-addressed objects, manifests and event logs under one directory.

Layout (``settings.recordings_dir``, by default ``.builder-cache/recordings/``)::

    objects/ab/cdef…            file contents, named by SHA-256; shared by every recording
    manifests/<id>.rec          RecordingManifest (msgpack)
    manifests/<id>.sig          its record-time SHA-256 and a MAC of it (shared/recording/trust.py)
    manifest.key                the store's MAC key, 0600
    events/<session>/b-*.msgpack  EventBatch messages as the recorder service received them
    events/<session>/log.msgpack  EventLog: the batches compacted into one file
    tmp/                        temporary files, renamed into place (same file system)

Every write is a temporary file + ``os.replace``, so a reader never sees half a
file and a crash leaves at most a stray file in ``tmp/``; objects are flushed
together (``syncfs``) before the manifest naming them is written and fsync'd.  Objects are written
once and never modified: storing content that is already there only refreshes
its mtime, which is what :meth:`RecordingStore.gc` uses to spare objects a
recording in progress has stored but not yet referenced (git's prune grace).

Limits: recordings older than ``retention_s`` are dropped, then the oldest
recordings until the store is under ``max_bytes``; objects no manifest refers
to are pruned after ``prune_grace_s``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from buildtel.shared.codec import DecodeError, batch_decoder
from buildtel.shared.files import private_dir
from buildtel.shared.protocol import Event
from buildtel.shared.recording.manifest import (
    EventLog,
    RecordingManifest,
    decode_event_log,
    decode_manifest,
    encode,
    is_recording_id,
)
from buildtel.shared.recording.trust import ManifestSigner
from buildtel.shared.settings import Settings

GiB = 1024**3
DEFAULT_MAX_BYTES = 10 * GiB
PRUNE_GRACE_S = 3600.0
CHUNK = 1024 * 1024


class RecordingNotFound(KeyError):
    def __str__(self) -> str:
        return f"no recording or recorded session {self.args[0]!r} in the local store"


def _syncfs(path: Path) -> None:
    """Flush the file system holding ``path`` once (Linux ``syncfs``; elsewhere ``sync``).

    Objects are written without a per-file fsync — a recording of a large tree stores
    thousands — and made durable together just before the manifest that refers to them.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class RecordingStore:
    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, retention_s: float = 90 * 86400.0,
                 fsync: bool = True, prune_grace_s: float = PRUNE_GRACE_S) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self.fsync = fsync
        self.prune_grace_s = prune_grace_s
        self.objects = self.root / "objects"
        self.manifests = self.root / "manifests"
        self.events = self.root / "events"
        self.tmp = self.root / "tmp"
        for d in (self.objects, self.manifests, self.events, self.tmp):
            private_dir(d)
        self.signer = ManifestSigner(self.root)

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> RecordingStore:
        return cls(settings.recordings_dir, retention_s=settings.retention_s, fsync=settings.fsync, **kw)

    # -- atomic writes --------------------------------------------------------------------------
    def _write_atomic(self, dest: Path, data: bytes, *, sync: bool = True) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=dest.name[:40] + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync and sync:
                    f.flush()
                    os.fsync(f.fileno())
            private_dir(dest.parent)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync and sync:
            _fsync_dir(dest.parent)

    # -- objects --------------------------------------------------------------------------------
    def object_path(self, sha: str) -> Path:
        return self.objects / sha[:2] / sha[2:]

    def has_object(self, sha: str) -> bool:
        return self.object_path(sha).exists()

    def put_stream(self, src: BinaryIO) -> tuple[str, int]:
        """Copy ``src`` into the store while hashing it; returns (sha256, size). Deduplicated."""
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="obj.")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            sha = h.hexdigest()
            dest = self.object_path(sha)
            if dest.exists():
                os.utime(dest)  # referenced again: keep it through the prune grace period
                os.unlink(tmp)
            else:
                private_dir(dest.parent)
                os.chmod(tmp, 0o400)  # objects are immutable, and the owner's alone
                os.replace(tmp, dest)
            return sha, size
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def put_file(self, path: Path) -> tuple[str, int]:
        with open(path, "rb") as f:
            return self.put_stream(f)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        dest = self.object_path(sha)
        if dest.exists():
            os.utime(dest)
        else:
            self._write_atomic(dest, data, sync=False)
            os.chmod(dest, 0o400)
        return sha

    def read_object(self, sha: str) -> Iterator[bytes]:
        """The object's content in chunks, verified against its name (a corrupt store is an error)."""
        h = hashlib.sha256()
        with open(self.object_path(sha), "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                yield chunk
        if h.hexdigest() != sha:
            raise ValueError(f"object {sha} is corrupt in {self.objects}")

    # -- manifests ------------------------------------------------------------------------------
    def _manifest_path(self, rid: str) -> Path:
        if not is_recording_id(rid):
            raise RecordingNotFound(rid)
        return self.manifests / f"{rid}.rec"

    def save_manifest(self, manifest: RecordingManifest) -> None:
        """Make the objects durable, then the manifest: a manifest never names lost content.
        Its signature follows; until then (or after a crash in between) replay refuses it."""
        if self.fsync:
            _syncfs(self.root)
        path = self._manifest_path(manifest.id)
        data = encode(manifest)
        self._write_atomic(path, data)
        self._write_atomic(path.with_suffix(".sig"), self.signer.signature(manifest.id, data).encode())

    def load_verified_manifest(self, rid: str) -> tuple[RecordingManifest, str]:
        """The manifest, after checking it is byte for byte the one saved at record time;
        returns it with its SHA-256.  Raises ``trust.ManifestUntrusted`` otherwise."""
        path = self._manifest_path(rid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RecordingNotFound(rid) from None
        try:
            sig: str | None = path.with_suffix(".sig").read_text(errors="replace")
        except FileNotFoundError:
            sig = None
        sha = self.signer.verify(rid, data, sig)
        return decode_manifest(data), sha

    def load_manifest(self, rid: str) -> RecordingManifest:
        try:
            return decode_manifest(self._manifest_path(rid).read_bytes())
        except FileNotFoundError:
            raise RecordingNotFound(rid) from None

    def has_manifest(self, rid: str) -> bool:
        return is_recording_id(rid) and self._manifest_path(rid).exists()

    def list_manifests(self) -> list[RecordingManifest]:
        out = []
        for p in self.manifests.glob("*.rec"):
            try:
                out.append(decode_manifest(p.read_bytes()))
            except (OSError, ValueError, *DecodeError):
                continue  # a damaged manifest must not hide the others
        return sorted(out, key=lambda m: m.created)

    # -- event logs -----------------------------------------------------------------------------
    def _events_dir(self, sid: str) -> Path:
        if not is_recording_id(sid):
            raise RecordingNotFound(sid)
        return self.events / sid

    def save_batch(self, sid: str, agent_id: str, first_seq: int, data: bytes) -> None:
        """One received EventBatch, named by agent and first seq so a redelivery overwrites itself."""
        agent = hashlib.sha1(agent_id.encode()).hexdigest()[:16]
        self._write_atomic(self._events_dir(sid) / f"b-{agent}-{first_seq:08d}.msgpack", data)

    def save_events(self, sid: str, events: list[Event]) -> None:
        """Store a whole event stream at once (a recorder without a bus, or compaction)."""
        self._write_atomic(self._events_dir(sid) / "log.msgpack", encode(EventLog(session_id=sid, events=events)))

    def has_events(self, sid: str) -> bool:
        return is_recording_id(sid) and self._events_dir(sid).is_dir() and any(self._events_dir(sid).iterdir())

    def _read_events(self, d: Path) -> tuple[list[Event], list[Path]]:
        events: list[Event] = []
        batch_files: list[Path] = []
        for p in sorted(d.iterdir()):
            try:
                if p.name == "log.msgpack":
                    events.extend(decode_event_log(p.read_bytes()).events)
                elif p.name.startswith("b-"):
                    events.extend(batch_decoder.decode(p.read_bytes()).events)
                    batch_files.append(p)
            except (OSError, *DecodeError):
                continue  # vanished under a concurrent compaction, or damaged: skip it
        return events, batch_files

    def load_events(self, sid: str) -> list[Event]:
        """The session's events, each (agent, seq) once, in time order; [] when none were kept."""
        d = self._events_dir(sid)
        if not d.is_dir():
            return []
        events, _ = self._read_events(d)
        unique = {(e.agent_id, e.seq): e for e in events}
        return sorted(unique.values(), key=lambda e: (e.ts, e.agent_id, e.seq))

    def compact_events(self, sid: str) -> int:
        """Fold the batch files into ``log.msgpack``; safe against concurrent writers and compactors.

        Writers only ever add batch files, so deleting exactly the files that were read
        loses nothing; the lock serializes compactors (same host: the store is local).
        """
        d = self._events_dir(sid)
        if not d.is_dir():
            return 0
        with open(d / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            events, batch_files = self._read_events(d)
            if not batch_files:
                return 0
            unique = {(e.agent_id, e.seq): e for e in events}
            self.save_events(sid, sorted(unique.values(), key=lambda e: (e.ts, e.agent_id, e.seq)))
            for p in batch_files:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            return len(batch_files)

    def event_sessions(self) -> list[str]:
        return [p.name for p in self.events.iterdir() if p.is_dir() and is_recording_id(p.name)]

    # -- limits ---------------------------------------------------------------------------------
    def _tree_size(self, path: Path) -> int:
        total = 0
        for dirpath, _, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total

    def disk_bytes(self) -> int:
        return self._tree_size(self.root)

    def delete_recording(self, rid: str) -> None:
        """Drop a recording's manifest and event stream; its objects go at the next prune."""
        with contextlib.suppress(FileNotFoundError, RecordingNotFound):
            self._manifest_path(rid).unlink()
        with contextlib.suppress(FileNotFoundError, RecordingNotFound):
            self._manifest_path(rid).with_suffix(".sig").unlink()
        with contextlib.suppress(RecordingNotFound):
            d = self._events_dir(rid)
            for p in d.glob("*") if d.is_dir() else []:
                with contextlib.suppress(OSError):
                    p.unlink()
            with contextlib.suppress(OSError):
                d.rmdir()

    def gc(self, now: float | None = None) -> dict[str, int]:
        """Apply retention, then the size cap, then prune unreferenced objects. Returns counts."""
        now = time.time() if now is None else now
        manifests = self.list_manifests()
        linked = {m.session_id for m in manifests if m.session_id}
        # Units that live and die together: a recording with its event stream, or an event
        # stream the service kept for a session nobody has captured files for.
        units: list[tuple[float, str]] = [(m.created, m.id) for m in manifests]
        for sid in self.event_sessions():
            if sid not in linked and not self.has_manifest(sid):
                with contextlib.suppress(OSError):
                    units.append((os.stat(self.events / sid).st_mtime, sid))
        units.sort()
        dropped = 0
        keep: list[tuple[float, str]] = []
        for created, rid in units:
            if now - created > self.retention_s:
                self._drop_unit(rid, manifests)
                dropped += 1
            else:
                keep.append((created, rid))
        pruned = self._prune_objects(now)
        while keep and self.disk_bytes() > self.max_bytes:
            _, rid = keep.pop(0)
            self._drop_unit(rid, manifests)
            dropped += 1
            pruned += self._prune_objects(now)
        for p in self.tmp.iterdir():  # leftovers of crashed writers
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > self.prune_grace_s:
                    p.unlink()
        return {"recordings_dropped": dropped, "objects_pruned": pruned}

    def _drop_unit(self, rid: str, manifests: list[RecordingManifest]) -> None:
        for m in manifests:
            if m.id == rid and m.session_id and m.session_id != rid:
                self.delete_recording(m.session_id)
        self.delete_recording(rid)

    def _prune_objects(self, now: float) -> int:
        referenced: set[str] = set()
        for m in self.list_manifests():
            referenced.update(e.sha256 for e in m.inputs)
            referenced.update(e.sha256 for e in m.outputs)
        pruned = 0
        for sub in self.objects.iterdir():
            for p in sub.iterdir():
                sha = sub.name + p.name
                if sha in referenced:
                    continue
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime >= self.prune_grace_s:
                        p.unlink()
                        pruned += 1
        return pruned

