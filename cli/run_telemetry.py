"""The telemetry side of ``buildtel run`` (``cli/cmd_run.py``): the session's client and the threads
that feed it while the command runs (environment probes at a lowered priority, per-target
sources), and finding the bus (auto-starting the local stack on a machine's first run).
Nothing here may stop or fail the build."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from buildtel.cli.run_process import lower_thread_priority
from buildtel.shared.settings import Settings

if TYPE_CHECKING:  # annotations only: `run` imports the capture package when it is used
    from buildtel.shared.capture.source import TargetSource

ENVIRONMENT_WAIT_S = 2.0  # after the command exits, how long BuildStarted waits for the env snapshot
SOURCE_DRAIN_S = 5.0
_SOURCE_EMITS = frozenset({"target_started", "target_finished", "health"})


class Telemetry:
    """The session's client plus the threads that feed it while the command runs."""

    def __init__(self, settings: Settings, session_id: str, url_resolver: Callable[[], str] | None) -> None:
        self.settings = settings
        self.session_id = session_id
        self.resolver = url_resolver or resolver(settings)
        self.client: Any = None
        self.started = threading.Event()  # BuildStarted emitted (exactly once; see _announce)
        self.done = threading.Event()
        self._start_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def begin(self, *, name: str, command: list[str], labels: dict[str, str], record: bool,
              traceparent: str | None, ts: float, env: dict[str, str], sources: Sequence[TargetSource],
              nice: bool = True, snapshot: Any = None) -> None:
        self.snapshot = snapshot
        try:
            # Imported only now, while the command already runs: nats costs ~150 ms to import.
            from buildtel.shared.client_sync import SyncTelemetryClient
            from buildtel.shared.identity import machine_id

            # This process made the session: its agent id is the machine, no per-process sub-id
            # (tools inside the build that join the session get one: shared/identity.py).
            self.client = SyncTelemetryClient(self.settings, nats_url=self.resolver, session_id=self.session_id,
                                              agent_id=machine_id(self.settings.agent_id), name="buildtel-run")
            self.client.start()
        except Exception as exc:  # noqa: BLE001 - telemetry never stops the build
            self.client, self.error = None, f"{type(exc).__name__}: {exc}"
            if snapshot is not None:
                snapshot.close()
            return
        self._started_args = {"name": name, "command": command, "labels": labels, "record": record,
                              "traceparent": traceparent, "ts": ts}
        self._spawn(self._announce, env, None, nice)
        self._sources = list(sources)
        for src in sources:
            self._spawn(self._follow, src)

    def _up_to_date(self, exit_code: int) -> int | None:
        """Avoided work as the capture counted it (docs/live-capture.md); None when not known."""
        if exit_code != 0:
            return None
        for src in getattr(self, "_sources", ()):
            summary = getattr(src, "summary", None)
            if isinstance(summary, dict) and isinstance(summary.get("up_to_date"), int):
                return int(summary["up_to_date"])
        return None

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"buildtel-{fn.__name__.strip('_')}")
        t.start()
        self._threads.append(t)

    def _announce(self, env: dict[str, str] | None, environment: Any = None, nice: bool = False,
                  pending: str | None = None) -> None:
        """Send BuildStarted.  From the probe thread (``pending`` None): after the slow probes.
        From ``finish`` (``pending``: why the probes are late): with what is known now."""
        if nice:
            lower_thread_priority()
        snap = getattr(self, "snapshot", None)
        if environment is None and snap is not None:
            try:
                if pending is None:
                    snap.probe(stop=self.started)  # no use probing once BuildStarted is sent
                environment = snap.result(pending or "not probed")
            except Exception:  # noqa: BLE001 - environment None: the whole snapshot is missing
                environment = None
        elif environment is None and env is not None:
            try:
                from buildtel.shared.environment import capture

                environment = capture(environ=env)  # redacted by capture (and again by the client)
            except Exception:  # noqa: BLE001 - the environment is optional; the build runs without it
                environment = None
        with self._start_lock:  # exactly one BuildStarted, whoever gets here first
            if not self.started.is_set():
                self.client.build_started(environment=environment, **self._started_args)
                self.started.set()

    def _follow(self, src: TargetSource) -> None:
        # No wait for BuildStarted: it waits for the niced environment probes, which on a loaded
        # node take seconds, and live health and targets would be held back that long (a 3 s build
        # under a CPU hog published no checkpoint while it ran).  The collector and recorder take
        # a session's events in any order, so BuildStarted need not have the lowest seq.
        try:
            for rec in src.targets(self.done):
                # A record names its emit method under "event" (default: target_finished).
                # A copy: the source's mapping is its own (the Protocol promises no mutable dict).
                kwargs = dict(rec)
                emit = kwargs.pop("event", "target_finished")
                getattr(self.client, emit if emit in _SOURCE_EMITS else "target_finished")(**kwargs)
        except Exception:  # noqa: BLE001 - a broken source loses its targets, not the build
            pass

    def finish(self, *, exit_code: int, cpu_s: float, peak_rss_bytes: int, console: Any = None,
               outcome: str | None = None, junit: Callable[[Any], None] | None = None) -> None:
        """End the session: sources drained, failures and log (``console``), then ``junit`` called
        with the build's targets (``junit_capture.BuildTargets``: only now are they all known, failed
        ninja edges included) to send its test reports, then ``build_finished``."""
        client = self.client
        if client is None:
            if junit is not None:
                junit(None)  # the reports are still read and said (their tests are not recorded)
            print(f"buildtel: warning: telemetry unavailable ({getattr(self, 'error', '?')}); "
                  f"session {self.session_id} was not recorded", file=sys.stderr)
            return
        if not self.started.wait(ENVIRONMENT_WAIT_S):
            # The slow probes are late: go on with what is known; each late probe is listed in
            # missing_probes with this reason.
            self._announce(None, pending=f"not finished {ENVIRONMENT_WAIT_S:.0f} s after the command exited")
        self.done.set()
        deadline = time.monotonic() + SOURCE_DRAIN_S
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0))
        kept = console.conclude(client, getattr(self, "_sources", ()), self.session_id) if console is not None else {}
        if junit is not None:
            from buildtel.shared.junit_capture import build_targets

            try:
                targets = build_targets(getattr(self, "_sources", ()), [f.target for f in kept.get("failures", ())])
            except Exception:  # noqa: BLE001 - tests are still sent, without the targets that ran them
                targets = None
            junit(targets)
        client.build_finished(exit_code=exit_code, cpu_s=cpu_s, peak_rss_bytes=peak_rss_bytes,
                              up_to_date=self._up_to_date(exit_code), outcome=outcome, **kept)
        # Connected: a flush takes milliseconds.  Never reached: close returns at once.
        # Still resolving or connecting (a stack being auto-started): bounded wait.
        timeout = 5.0 if client.connected else 2.0
        starting = getattr(self.resolver, "autostarting", None)
        if not client.connected and starting is not None and starting.is_set():
            from buildtel.cli.common import AUTOSTART_TIMEOUT_S

            print("buildtel: waiting for the local stack to start (first run on this machine)…", file=sys.stderr)
            timeout = AUTOSTART_TIMEOUT_S + 5.0
        stats = client.close(timeout=timeout, warn=False)
        if not client.reached_bus:
            print(f"buildtel: warning: telemetry bus unreachable ({client.last_error or 'not connected'}); "
                  f"session {self.session_id} was not recorded", file=sys.stderr)
        elif stats.dropped:
            print(f"buildtel: warning: {stats.dropped} of {client.events_emitted + stats.dropped} telemetry "
                  f"events of session {self.session_id} were not delivered ({client.last_error})", file=sys.stderr)


def snapshot_of(env: dict[str, str]) -> Any:
    """The environment's fast stage (shared/environment.py); None if even that fails."""
    try:
        from buildtel.shared.environment import EnvironmentSnapshot

        return EnvironmentSnapshot(environ=env)
    except Exception:  # noqa: BLE001 - telemetry never stops the build; BuildStarted then has no environment
        return None


class _Resolver:
    """Finds the bus; notes when that means starting the local stack (the first run on a
    machine), so the end of the run can wait for it instead of losing the session."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.autostarting = threading.Event()

    def __call__(self) -> tuple[str, Any]:
        from buildtel.cli.common import read_stack, resolve

        if not self.settings.nats_url and read_stack(self.settings) is None:
            self.autostarting.set()
        s = resolve(self.settings, autostart=True, need_redis=False)
        return s.nats_url or "", s.stack_auth  # the agent role's credentials of a local stack


def resolver(settings: Settings) -> Callable[[], tuple[str, Any]]:
    return _Resolver(settings)
