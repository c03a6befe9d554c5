"""What a recording is on disk: the manifest structs, their codec, and the path-safety rules.

A recording manifest is a ``msgspec.Struct`` encoded as MessagePack.  Schema
evolution follows the project's rules (``shared/protocol.py``): fields are only
ever *added*, always with a default, never renamed, re-typed or removed, so a
manifest written by an older process decodes in a newer one (missing fields take
their defaults) and a newer manifest decodes in an older one (unknown fields are
ignored).  ``format`` is bumped only for a change readers cannot skip over; a
reader refuses a format newer than :data:`FORMAT_VERSION` instead of
misreading it.

Every file path in a manifest is relative to the recording's working directory,
in POSIX form, and must stay inside it: :func:`safe_relpath` is applied when a
path is recorded and again when it is restored into a sandbox, so a tampered
manifest cannot write outside the sandbox either.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Literal

import msgspec

from buildtel.shared.protocol import BuildEnvironment, Event

FORMAT_VERSION = 1

EntryKind = Literal["file", "symlink"]


class UnsafePath(ValueError):
    """A recorded path would reach outside the recording root (or the replay sandbox)."""


class FileEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One input or output: a path under the root and the SHA-256 of its content.

    For a symlink, ``target`` is the link text (always relative, always inside the
    root) and ``sha256`` is the hash of that text.  ``stored`` is false when only the
    hash is known (the content was gone or changed before it could be copied).
    """

    path: str
    sha256: str
    size: int = 0
    mode: int = 0o644
    mtime_ns: int = 0
    kind: EntryKind = "file"
    target: str | None = None
    stored: bool = True


class ExternalInput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A file outside the root the build tool says it read (system headers…): hash only,
    never content; replay does not restore it, diff reports when it changed."""

    path: str
    sha256: str = ""


class RecordingManifest(msgspec.Struct, kw_only=True, omit_defaults=True, tag="recording", tag_field="type"):
    id: str
    created: float
    command: list[str] = []
    cwd: str = ""  # the original working directory (informational: replay uses a sandbox)
    environment: BuildEnvironment | None = None  # redacted env, tool versions, machine, VCS
    inputs: list[FileEntry] = []
    outputs: list[FileEntry] = []
    removed: list[str] = []  # files the build deleted
    external_inputs: list[ExternalInput] = []
    refused: list[str] = []  # paths the capture saw but would not record (outside the root)
    session_id: str | None = None  # the bus session whose event stream belongs to this recording
    exit_code: int | None = None
    started: float = 0.0
    finished: float = 0.0
    input_method: str = "explicit"  # explicit | make | ninja | tree
    notes: list[str] = []
    argv_redacted: bool = False  # a secret was removed from the command line
    format: int = FORMAT_VERSION


class EventLog(msgspec.Struct, kw_only=True, tag="event_log", tag_field="type"):
    """A session's event stream as the store keeps it once compacted."""

    session_id: str
    events: list[Event] = []
    format: int = FORMAT_VERSION


_encoder = msgspec.msgpack.Encoder()
_manifest_decoder = msgspec.msgpack.Decoder(RecordingManifest)
_log_decoder = msgspec.msgpack.Decoder(EventLog)


class UnsupportedFormat(ValueError):
    """Written by a newer, incompatible version of the recorder."""


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)


def decode_manifest(data: bytes) -> RecordingManifest:
    m = _manifest_decoder.decode(data)
    if m.format > FORMAT_VERSION:
        raise UnsupportedFormat(f"recording {m.id} has format {m.format}; this version reads up to {FORMAT_VERSION}")
    return m


def decode_event_log(data: bytes) -> EventLog:
    log = _log_decoder.decode(data)
    if log.format > FORMAT_VERSION:
        raise UnsupportedFormat(f"event log of {log.session_id} has format {log.format}")
    return log


def is_recording_id(value: str) -> bool:
    """Ids name files in the store, so only 32 lowercase hex digits are accepted (no traversal)."""
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


# -- path safety --------------------------------------------------------------------------------
def normalize_relpath(path: str) -> str:
    """The lexical check shared by record and restore: relative, no NUL, never climbing out."""
    if not path or "\x00" in path:
        raise UnsafePath(f"empty path or NUL byte in {path!r}")
    posix = path.replace(os.sep, "/") if os.sep != "/" else path
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise UnsafePath(f"absolute path {path!r}: recorded paths are relative to the working directory")
    norm = posixpath.normpath(posix)
    if norm == "." or norm == ".." or norm.startswith("../"):
        raise UnsafePath(f"path {path!r} climbs out of the recording root")
    return norm


def _inside(root: Path, candidate: Path) -> bool:
    return candidate == root or root in candidate.parents


def safe_relpath(root: Path, path: str) -> str:
    """Check ``path`` (relative to ``root``) on the real file system and return its normal form.

    Refused: absolute paths, ``..`` that leaves the root, and any symlink on the way
    (a parent directory or the file itself) that resolves outside the root.
    """
    norm = normalize_relpath(path)
    real_root = root.resolve()
    parent = (root / norm).parent.resolve()
    if not _inside(real_root, parent):
        raise UnsafePath(f"path {path!r} goes through a symlink that leaves the recording root")
    full = root / norm
    if full.is_symlink() and not _inside(real_root, full.resolve()):
        raise UnsafePath(f"path {path!r} is a symlink pointing outside the recording root")
    return norm


def link_target_inside(link_path: str, target: str) -> bool:
    """Whether a symlink at ``link_path`` (root-relative) with text ``target`` stays in the root."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(link_path), target))
    return not (joined == ".." or joined.startswith("../"))


def check_entry(entry: FileEntry) -> str:
    """Validate a manifest entry before restoring it; returns the normalized path."""
    norm = normalize_relpath(entry.path)
    if entry.kind == "symlink" and not link_target_inside(norm, entry.target or ""):
        raise UnsafePath(f"symlink {entry.path!r} -> {entry.target!r} points outside the sandbox")
    if len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256):
        raise UnsafePath(f"entry {entry.path!r} has a malformed hash")
    return norm
