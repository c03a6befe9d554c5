"""Follow a file other processes append lines to (the make wrapper's events, ``.ninja_log``).

Polling, not inotify: one ``fstat`` and at most one ``read`` per poll is cheaper
than a watch on a busy build directory and works on every filesystem.  Only whole
lines are returned (a line is appended with one ``write``, but a poll can land
between two ``write``\\ s of a writer that flushes per field).  A file replaced
under its name (ninja rewrites ``.ninja_log`` when it recompacts it, at start-up)
is detected by its inode or a size below what was read: the lines the old file
already had are then skipped in the new one, so nothing is reported twice and
nothing new is lost.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class FileTail:
    def __init__(self, path: Path, *, from_end: bool = True, max_read: int = 8 << 20,
                 offset: int | None = None) -> None:
        """``from_end``: only lines appended after now are returned (the file may not exist yet);
        ``offset``: start there instead (the size a writer reported before it appended)."""
        self.path = path
        self.max_read = max_read
        self._fd: int | None = None
        self._ino: int | None = None
        self._offset = 0
        self._partial = b""
        self.rewrites = 0
        if self._open(skip_existing=from_end) and offset is not None:
            self._offset = offset

    def _open(self, *, skip_existing: bool) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        st = os.fstat(fd)
        self._fd, self._ino = fd, st.st_ino
        self._offset = st.st_size if skip_existing else 0
        self._partial = b""
        return True

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def header(self, size: int = 256) -> bytes:
        """The first bytes of the file as it is now (e.g. ninja's ``# ninja log vN``)."""
        try:
            with open(self.path, "rb") as f:
                return f.read(size)
        except OSError:
            return b""

    def poll(self) -> list[bytes]:
        """Complete lines appended since the last poll (without their newlines)."""
        if self._fd is None:
            if not self._open(skip_existing=False):  # created after we started: read it all
                return []
        else:
            try:
                st = os.stat(self.path)
            except OSError:
                st = None
            if st is not None and (st.st_ino != self._ino or st.st_size < self._offset):
                return self._reopen()
        return self._read()

    def _read(self) -> list[bytes]:
        assert self._fd is not None
        chunks = []
        while True:
            data = os.pread(self._fd, self.max_read, self._offset)
            if not data:
                break
            self._offset += len(data)
            chunks.append(data)
            if len(data) < self.max_read:
                break
        if not chunks:
            return []
        buf = self._partial + b"".join(chunks)
        lines = buf.split(b"\n")
        self._partial = lines.pop()
        return lines

    def _reopen(self) -> list[bytes]:
        """The file was replaced: finish the old one, then return only new lines of the new one."""
        old = self._read() if self._fd is not None else []
        seen: set[bytes] = set()
        if self._fd is not None:
            # Everything the old file held: a rewrite (recompaction) copies old lines over.
            with contextlib.suppress(OSError):
                seen = set(os.pread(self._fd, self._offset, 0).split(b"\n"))
        self.close()
        self.rewrites += 1
        if not self._open(skip_existing=False):
            return old
        return old + [ln for ln in self._read() if ln not in seen]
