"""The console log and the failed targets' output of one ``buildtel run`` (``docs/failures.md``).

``cli/cmd_run.py`` calls, in order: :meth:`RunLog.popen_kwargs` (the command's stdout and stderr),
:meth:`RunLog.spawned`, :meth:`RunLog.drain` once the command has exited, and
:meth:`RunLog.conclude` just before ``build_finished``: it finds what each failed target printed
(``failures.py``), reports failed ninja edges as targets (ninja's log never has them), and
stores the redacted, compressed log in the logs bucket (``shared/logstore.py``).  Its result
goes into ``build_finished`` (``failures``, ``log``).

Nothing here may fail the build: every step is guarded, and what went wrong is kept in
:attr:`RunLog.error` (printed as one warning line, and stored as ``BuildLog.error``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from buildtel.shared.buildlog import compress, redact_log
from buildtel.shared.capture.console import ConsoleTee
from buildtel.shared.capture.failures import Seen, find_failures
from buildtel.shared.protocol import BuildLog, TargetFailure
from buildtel.shared.settings import Settings

STORE_TIMEOUT_S = 10.0  # connected: a few MiB take well under a second
ERROR_CHARS = 1000  # of BuildLog.error (an event's strings are bounded: shared/validate.py)


class RunLog:
    def __init__(self, settings: Settings, *, json_out: bool = False, enabled: bool = True) -> None:
        self.settings = settings
        self.json_out = json_out
        self.tee = ConsoleTee(settings.log_limit, json_out=json_out) if enabled else None
        self.error = ""  # why the log or the failures' output is missing or incomplete
        self.failed_edges = 0  # failed ninja edges found in the console (targets .ninja_log lacks)

    def popen_kwargs(self) -> dict[str, int]:
        kwargs = self.tee.popen_kwargs() if self.tee is not None else {}
        if not kwargs:
            self.tee = None
            return {"stdout": 2} if self.json_out else {}  # stdout is the JSON object's
        return kwargs

    def spawned(self) -> None:
        if self.tee is not None:
            self.tee.spawned()

    def abandon(self) -> None:
        if self.tee is not None:
            self.tee.abandon()

    def drain(self) -> None:
        if self.tee is not None:
            self.tee.drain()
            self.error = self.tee.error

    def conclude(self, client: Any, sources: Sequence[Any], session_id: str) -> dict[str, Any]:
        """``failures`` and ``log`` for ``build_finished`` (empty when the console was not kept)."""
        tee = self.tee
        if tee is None:
            return {}
        failures: list[TargetFailure] = []
        try:
            failures = self._failures(client, sources)
        except Exception as exc:  # noqa: BLE001 - the failures' output is lost, not the build or the log
            self._note(f"failed targets' output not found: {type(exc).__name__}: {exc}")
        return {"failures": failures, "log": self._store(client, session_id)}

    def _failures(self, client: Any, sources: Sequence[Any]) -> list[TargetFailure]:
        assert self.tee is not None
        buf = self.tee.buffer
        seen: list[Seen] = [s for src in sources for s in getattr(src, "seen", ())]
        cut = (buf.head[-1][0], buf.tail[0][0]) if buf.cut and buf.head and buf.tail else None
        failures, edges = find_failures(buf.chunks(), seen, output_kib=self.settings.failure_output_kib,
                                        cut_between=cut)
        self.failed_edges = len(edges)
        for e in edges:  # failed ninja edges: ninja logs only the edges that succeeded
            client.target_finished(target=e.target, start=e.start, duration_s=0.0, status="failed", kind="edge",
                                   exit_code=e.exit_code, ts=e.end)
        return failures

    def _store(self, client: Any, session_id: str) -> BuildLog:
        assert self.tee is not None
        buf = self.tee.buffer
        log = BuildLog(bytes=buf.total, kept_bytes=buf.kept, cut_bytes=buf.cut)
        if not client.connected and client.last_error:
            # Not reached (and already said: the session itself is not recorded); no wait for it.
            log.error = "the bus was not reached"
            return log
        try:
            data = compress(redact_log(buf.text()))
            from buildtel.shared.logstore import put_log
            from buildtel.shared.subjects import Subjects

            subjects = Subjects(self.settings.namespace)
            timeout = STORE_TIMEOUT_S if client.connected else 2.0
            client.with_jetstream(lambda js: put_log(js, subjects, session_id, data), timeout)
        except Exception as exc:  # noqa: BLE001 - the log is lost (said), the build is not
            why = str(exc) or type(exc).__name__
            self._note(f"build log not stored: {why}")
            log.error = self.error[:ERROR_CHARS]
            return log
        log.object, log.compressed_bytes = session_id, len(data)
        log.error = self.error[:ERROR_CHARS]
        return log

    def _note(self, why: str) -> None:
        self.error = f"{self.error}; {why}" if self.error else why

    def warning(self) -> str:
        """The line ``buildtel run`` prints when the log or the output is missing ("" when all is well)."""
        return f"warning: {self.error}" if self.error else ""
