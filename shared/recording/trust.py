"""Replay trusts nothing on disk: each manifest is bound to its record-time content hash by a keyed MAC.

A manifest names the command that ``buildtel replay --execute`` runs, so an edited
manifest would otherwise run anything.  When the store saves a manifest it also
writes ``manifests/<id>.sig``::

    v1 <sha256 of the manifest bytes> <hmac-sha256(key, id NUL sha256)>

with ``key`` 32 random bytes in ``<store>/manifest.key`` (created 0600 on first
use, never leaves the machine).  Before replay runs anything it reads the
manifest bytes once, recomputes their hash, and checks both the hash and the MAC;
the bytes it checked are the bytes it decodes and runs (no second read).  Editing
the manifest changes its hash; editing the hash in ``.sig`` as well needs the key.
The id is inside the MAC, so a signed manifest cannot be passed off under another id.

What this does not protect against: someone who can read ``manifest.key`` (the
store's owner, root) can sign anything, as they can run anything anyway.  A key
file readable or writable by group/others, or owned by another user, is refused:
then anyone could have signed.  See ``docs/recorder.md`` ("Trust model").
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

KEY_NAME = "manifest.key"
SIG_VERSION = "v1"
KEY_BYTES = 32


class ManifestUntrusted(ValueError):
    """The manifest cannot be shown to be the one written at record time."""


def _check_key_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ManifestUntrusted(f"{path} is not a regular file, so manifests cannot be verified")
    if st.st_mode & 0o077:
        raise ManifestUntrusted(f"{path} has mode {stat.S_IMODE(st.st_mode):o}: others could read or change the "
                                "key and sign any manifest; only 0600 is trusted (chmod 600 it, then re-record)")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise ManifestUntrusted(f"{path} belongs to uid {st.st_uid}, not to you: its manifests are not trusted")


class ManifestSigner:
    """The store's key and the ``.sig`` files made with it."""

    def __init__(self, root: Path) -> None:
        self.key_path = Path(root) / KEY_NAME
        self._key: bytes | None = None

    def key(self, *, create: bool) -> bytes:
        if self._key is not None:
            return self._key
        try:
            fd = os.open(self.key_path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not create:
                raise ManifestUntrusted(f"{self.key_path} is missing: no manifest of this store can be verified "
                                        "(was the store copied without it?)") from None
            return self._create()
        except OSError as exc:  # ELOOP: a symlink where the key should be
            raise ManifestUntrusted(f"cannot open {self.key_path}: {exc}") from None
        with os.fdopen(fd, "rb") as f:
            _check_key_file(self.key_path, os.fstat(f.fileno()))
            key = f.read()
        if len(key) != KEY_BYTES:
            raise ManifestUntrusted(f"{self.key_path} holds {len(key)} bytes, not {KEY_BYTES}: it was changed")
        self._key = key
        return key

    def _create(self) -> bytes:
        # Write a temporary file, then link it into place: link fails if another process
        # created the key meanwhile, and then both use that one.
        tmp = self.key_path.with_name(f".{KEY_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.key_path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return self.key(create=False)

    def _mac(self, rid: str, sha: str, key: bytes) -> str:
        return hmac.new(key, f"{rid}\x00{sha}".encode(), hashlib.sha256).hexdigest()

    def signature(self, rid: str, data: bytes) -> str:
        """The ``.sig`` line for manifest ``rid`` encoded as ``data`` (creates the key if needed)."""
        sha = hashlib.sha256(data).hexdigest()
        return f"{SIG_VERSION} {sha} {self._mac(rid, sha, self.key(create=True))}\n"

    def verify(self, rid: str, data: bytes, sig: str | None) -> str:
        """Check ``data`` against ``sig``; returns the manifest's SHA-256 or raises ManifestUntrusted."""
        sha = hashlib.sha256(data).hexdigest()
        if sig is None:
            raise ManifestUntrusted(f"recording {rid} has no signature file ({rid}.sig): it was recorded before "
                                    "manifests were signed, or the file was removed; re-record the build")
        parts = sig.split()
        if len(parts) != 3 or parts[0] != SIG_VERSION:
            raise ManifestUntrusted(f"recording {rid}'s signature file is malformed")
        _, recorded, mac = parts
        if not hmac.compare_digest(recorded, sha):
            raise ManifestUntrusted(f"recording {rid}'s manifest was changed after it was recorded: its content hash "
                                    f"is {sha[:16]}…, the one recorded at record time {recorded[:16]}…")
        if not hmac.compare_digest(mac, self._mac(rid, sha, self.key(create=False))):
            raise ManifestUntrusted(f"recording {rid}'s signature does not match this store's key: the record-time "
                                    "hash was rewritten, or the recording comes from another store")
        return sha
