"""A build's console log as ``buildtel run`` keeps it: bounded, redacted, compressed (pure; no I/O).

:class:`LogBuffer` takes the build's output as it is read, chunk by chunk with the time it was
read, and keeps at most ``limit`` bytes of it: the first quarter (the head: configuration, the
first errors) and the last three quarters (the tail: where a build usually fails).  What falls in
between is counted, bytes and lines, and :meth:`LogBuffer.text` puts one marker line there.  The
chunks and their times are what ``shared/capture/failures.py`` attributes to failed targets.

:func:`redact_log` applies the project's redaction (``shared/redaction.py``) line by line, on the
agent, before anything leaves it; bytes that are not UTF-8 go through unchanged.
``docs/failures.md`` describes both.
"""

from __future__ import annotations

import zlib
from collections import deque

from buildtel.shared.redaction import redact_text

HEAD_SHARE = 4  # the head is limit // HEAD_SHARE; the tail the rest
MARKER = ("[buildtel: {cut} bytes ({lines} lines) of the log cut here: the log keeps its first {head} "
          "and its last {tail} of {total} bytes (BUILDER_TELEMETRY_LOG_LIMIT)]")

Chunk = tuple[float, bytes, int]  # (when read, bytes, the build's stream: 0 both, 1 stdout, 2 stderr)


class LogBuffer:
    """The head and the tail of a stream of chunks, at most ``limit`` bytes together."""

    def __init__(self, limit: int) -> None:
        self.limit = max(limit, 2)
        self.head_cap = self.limit // HEAD_SHARE
        self.tail_cap = self.limit - self.head_cap
        self.head: list[Chunk] = []
        self.tail: deque[Chunk] = deque()
        self._head_bytes = self._tail_bytes = 0
        self.total = 0  # bytes appended
        self.cut = 0  # bytes dropped between the head and the tail
        self.cut_lines = 0  # newlines among them

    def append(self, t: float, data: bytes, stream: int = 1) -> None:
        if not data:
            return
        self.total += len(data)
        room = self.head_cap - self._head_bytes
        if room > 0:
            take = data[:room]
            self.head.append((t, take, stream))
            self._head_bytes += len(take)
            data = data[len(take):]
            if not data:
                return
        self.tail.append((t, data, stream))
        self._tail_bytes += len(data)
        while self._tail_bytes > self.tail_cap:
            t0, first, fd = self.tail[0]
            excess = self._tail_bytes - self.tail_cap
            gone = first if len(first) <= excess else first[:excess]
            if gone is first:
                self.tail.popleft()
            else:
                self.tail[0] = (t0, first[excess:], fd)
            self._tail_bytes -= len(gone)
            self.cut += len(gone)
            self.cut_lines += gone.count(b"\n")

    @property
    def kept(self) -> int:
        return self._head_bytes + self._tail_bytes

    def chunks(self) -> list[Chunk]:
        """Every chunk kept, in order; where the log was cut, a line break on each stream of the
        head, so no line is made of the two sides of the cut."""
        if not self.cut or not self.head:
            return [*self.head, *self.tail]
        t = self.head[-1][0]
        return [*self.head, *((t, b"\n", s) for s in sorted({c[2] for c in self.head})), *self.tail]

    def marker(self) -> bytes:
        return MARKER.format(cut=self.cut, lines=self.cut_lines, head=self._head_bytes, tail=self._tail_bytes,
                             total=self.total).encode()

    def text(self) -> bytes:
        """The log as kept: the head, the marker line when something was cut, the tail."""
        head = b"".join(c for _, c, _fd in self.head)
        tail = b"".join(c for _, c, _fd in self.tail)
        if not self.cut:
            return head + tail
        sep = b"" if not head or head.endswith(b"\n") else b"\n"
        return head + sep + self.marker() + b"\n" + tail


def keep(data: bytes, limit: int) -> bytes:
    """``data`` as a :class:`LogBuffer` of ``limit`` keeps it (read in one chunk)."""
    buf = LogBuffer(limit)
    buf.append(0.0, data)
    return buf.text()


def redact_line(line: str) -> str:
    return redact_text(line) if line.strip() else line


def redact_log(data: bytes) -> bytes:
    """``data`` with the secrets of each line replaced by ``[REDACTED]`` (line ends and bytes that
    are not UTF-8 kept as they are)."""
    text = data.decode("utf-8", "surrogateescape")
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        out.append(redact_line(body) + line[len(body):])
    return "".join(out).encode("utf-8", "surrogateescape")


def compress(data: bytes) -> bytes:
    return zlib.compress(data, 6)


def decompress(data: bytes) -> bytes:
    return zlib.decompress(data)
