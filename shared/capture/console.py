"""The build's console under ``buildtel run``: passed to the terminal unchanged, and kept.

When our stdout and stderr are the same file (a terminal, a CI log, ``2>&1``), the command's
stdout and stderr are one pipe, so the log holds them in exactly the order they were written;
otherwise they are two pipes and the log interleaves them in the order they were read.  One
thread reads here and writes every byte at once, unchanged, to the stream it came from (with
``--json`` the command's stdout goes to stderr, as before), and appends it to a
:class:`~buildtel.shared.buildlog.LogBuffer` with the time it was read and its stream (0: the
one pipe, 1 stdout, 2 stderr); ``failures.py`` tells from these which lines a failed make
recipe printed.

What changes for the build: its stdout and stderr are pipes, not the terminal (tools that
colour or redraw only on a terminal print plain lines; ninja prints one line per edge).
``--no-log`` keeps the inherited terminal.  When our terminal goes away (``buildtel run … |
head``), that stream's pipe is closed, so the build sees the broken pipe it would have seen.
Nothing here raises into the build: a pipe that cannot be made leaves the stdio inherited.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
import time

from buildtel.shared.buildlog import LogBuffer

DRAIN_S = 2.0  # after the command exits: a background process still holding the pipes is not waited for


class ConsoleTee:
    def __init__(self, limit: int, *, json_out: bool = False) -> None:
        self.buffer = LogBuffer(limit)
        self._dest = {1: 2 if json_out else 1, 2: 2}  # child's stream -> our fd (0: both, one pipe)
        self._reads: dict[int, int] = {}  # read end -> child's stream
        self._writes: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error = ""  # why the log is not (whole): set when the tee could not be set up

    def popen_kwargs(self) -> dict[str, int]:
        """``stdout``/``stderr`` for ``Popen``; empty (inherited stdio) when pipes cannot be made."""
        if _same_file(self._dest[1], self._dest[2]):
            # Both go to the same place (a terminal, a CI log, 2>&1): one pipe keeps their order exact.
            try:
                r, w = os.pipe()
            except OSError as exc:
                self.error = f"no pipe for the console: {exc}"
                return {}
            self._dest[0] = self._dest[1]
            self._reads, self._writes = {r: 0}, [w]
            return {"stdout": w, "stderr": w}
        try:
            r1, w1 = os.pipe()
            try:
                r2, w2 = os.pipe()
            except OSError:
                os.close(r1)
                os.close(w1)
                raise
        except OSError as exc:
            self.error = f"no pipe for the console: {exc}"
            return {}
        self._reads = {r1: 1, r2: 2}
        self._writes = [w1, w2]
        return {"stdout": w1, "stderr": w2}

    def spawned(self) -> None:
        """The child has its ends: close ours (EOF comes when the build's last writer exits) and read."""
        for fd in self._writes:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._writes = []
        if self._reads:
            self._thread = threading.Thread(target=self._run, daemon=True, name="buildtel-console")
            self._thread.start()

    def abandon(self) -> None:
        """The command could not be spawned: close everything."""
        for fd in [*self._writes, *self._reads]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._writes, self._reads = [], {}

    def drain(self, timeout: float = DRAIN_S) -> None:
        """After the command exited: wait (bounded) until its output is all read."""
        t = self._thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():  # a background process holds the pipe: keep passing its output on, unlogged
                with self._lock:
                    self._stop.set()
                self.error = self.error or (f"the console was still open {timeout:.0f} s after the command exited "
                                            "(a background process holds it); later output is not in the log")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for fd in self._reads:
            sel.register(fd, selectors.EVENT_READ)
        try:
            while sel.get_map():
                ready = sel.select()
                now = time.time()  # one time per round: what is read together compares equal
                for key, _ in ready:
                    fd = int(key.fd)
                    try:
                        data = os.read(fd, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(fd)
                        os.close(fd)
                        continue
                    stream = self._reads[fd]
                    if not self._write(self._dest[stream], data):
                        sel.unregister(fd)  # our side is gone: the build gets its broken pipe
                        os.close(fd)
                    with self._lock:  # drain() may give up on the log meanwhile
                        if not self._stop.is_set():
                            self.buffer.append(now, data, stream)
        except Exception as exc:  # noqa: BLE001 - never expected; the output must keep flowing
            self.error = f"console reader failed: {type(exc).__name__}: {exc}"
        finally:
            sel.close()

    @staticmethod
    def _write(fd: int, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            except OSError:
                return False
            view = view[n:]
        return True


def _same_file(a: int, b: int) -> bool:
    try:
        return os.path.samestat(os.fstat(a), os.fstat(b))
    except OSError:
        return False
