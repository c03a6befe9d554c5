"""The :class:`~buildtel.shared.capture.source.TargetSource` ``buildtel run`` plugs in: per-target
capture for make/ninja/cmake, and health checkpoints for every command.

One thread (``cmd_run``'s source thread) iterates :meth:`LiveSource.targets`; it
polls the capture every ``POLL_S``, feeds what it saw to the
:class:`~buildtel.shared.health.monitor.HealthMonitor`, and every ``health_interval_s``
samples the build's process tree and yields a checkpoint.  Records carry the SDK
emit method to call under ``"event"`` (``target_started``, ``target_finished``,
``health``).  When the command has exited the capture is read to its end, open
targets are closed, and a final checkpoint follows the last target — so it is the
one the collector keeps as ``BuildSession.health``.

Nothing here may break the build: a capture that cannot be set up leaves argv
unchanged (the reason is kept in :attr:`LiveSource.note`), and errors while
polling end the capture, not the run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildtel.shared.capture.failures import Seen
from buildtel.shared.health.monitor import DEFAULT_INTERVAL_S, HealthMonitor
from buildtel.shared.health.sampler import host_memory_percent, sample_tree

if TYPE_CHECKING:
    from buildtel.shared.capture.make import MakeCapture
    from buildtel.shared.capture.ninja import NinjaCapture
    from buildtel.shared.capture.tree import TreeCapture

POLL_S = 0.1  # capture latency; a poll is one stat and at most one read
# prepare() runs before the build is spawned: only the module for the tool at hand is imported.
_MAKES = frozenset({"make", "gmake"})
_NINJAS = frozenset({"ninja", "ninja-build", "cmake"})


class LiveSource:
    def __init__(self, cache_dir: Path, *, capture: bool = True, health_interval_s: float = DEFAULT_INTERVAL_S,
                 health: bool = True, make_method: str = "auto") -> None:
        self.cache_dir = cache_dir
        self.make_method = make_method  # "auto", "preload" or "wrapper" (shared/capture/make.py)
        self.want_capture = capture
        self.health_interval_s = health_interval_s
        self.health = health
        self.capture: MakeCapture | NinjaCapture | TreeCapture | None = None
        self.summary: dict[str, Any] | None = None  # what the capture saw, once the build ended
        self.monitor: HealthMonitor | None = None
        self.pid: int | None = None
        self.note = ""
        self.emitted = 0
        self.emitted_targets = 0  # target_finished records
        self.seen: list[Seen] = []  # every target reported, for finding what failed ones printed (failures.py)
        # A ninja edge's outputs after the first -> its target, and the directories target names are
        # relative to: which target wrote a JUnit report (shared/junit_capture.py, docs/tests.md).
        self.outputs: dict[str, str] = {}
        self.target_dirs: list[Path] = []

    # -- TargetSource ----------------------------------------------------------------------------
    def prepare(self, argv: list[str], env: dict[str, str]) -> list[str]:
        new = self._prepare(argv, env)
        workers = self.capture.worker_count if self.capture is not None else 0
        # Created now, just before the spawn: throughput and stall times count from here.
        self.monitor = HealthMonitor(interval_s=self.health_interval_s, worker_count=workers)
        return new

    def _prepare(self, argv: list[str], env: dict[str, str]) -> list[str]:
        if not self.want_capture:
            return argv
        cap: MakeCapture | NinjaCapture | TreeCapture | None = None
        tool = Path(argv[0]).name if argv else ""
        try:
            if tool in _MAKES:
                from buildtel.shared.capture.make import MakeCapture

                cap = MakeCapture(self.cache_dir, method=self.make_method)
            elif tool in _NINJAS:
                from buildtel.shared.capture.ninja import NinjaCapture

                cap = NinjaCapture.for_argv(argv, env)
            if cap is None:
                # A shell, a script, cmake --build of a Makefile generator, a ninja tool: make and
                # ninja are found wherever they start in the tree (tree.py).
                from buildtel.shared.capture.tree import TreeCapture

                cap = TreeCapture(self.cache_dir)
            new = cap.prepare(argv, env)
        except Exception as exc:  # noqa: BLE001 - capture is optional; the build is not
            self.note = f"capture disabled: {type(exc).__name__}: {exc}"
            if cap is not None:
                cap.close()
            return argv
        if cap.active:
            self.capture = cap
        else:
            self.note = f"{cap.kind} not captured: {cap.reason}"
            cap.close()
        return new

    def spawned(self, pid: int) -> None:
        """The build's pid (its tree is sampled for memory and, for ninja, running edges)."""
        self.pid = pid

    def targets(self, done: threading.Event) -> Iterator[dict[str, Any]]:
        cap = self.capture
        mon = self.monitor or HealthMonitor(interval_s=self.health_interval_s)
        try:
            while True:
                finished = done.wait(POLL_S if cap is not None else min(self.health_interval_s, 1.0))
                if cap is not None:
                    try:
                        recs = cap.poll(final=finished)
                    except Exception as exc:  # noqa: BLE001 - stop capturing, keep the run
                        self.note = f"capture stopped: {type(exc).__name__}: {exc}"
                        cap.close()
                        cap = self.capture = None
                        recs = []
                    for rec in recs:
                        self._feed(mon, rec)
                        self.emitted += 1
                        self.emitted_targets += rec.get("event") == "target_finished"
                        if rec.get("event") == "target_finished":
                            self.seen.append(Seen(rec["target"], rec["start"], rec["start"] + rec["duration_s"],
                                                  rec.get("status", "success"), rec.get("exit_code")))
                            for ph in rec.get("phases") or ():
                                if ph.name.startswith("output:"):
                                    self.outputs[ph.name.removeprefix("output:")] = rec["target"]
                        yield rec
                    if cap is not None and cap.kind in ("make", "tree"):
                        # Recipes with a line running; a finished one lingers before it is reported.
                        mon.set_active(cap.running)  # type: ignore[union-attr]
                if finished:
                    break
                if self.health and mon.due():
                    self._sample(mon)
                    yield {"event": "health", "ts": time.time(), **mon.checkpoint()}
            if self.health:
                self._sample(mon)  # host memory now; the tree has exited, so its last size stays
                mon.set_active(0 if cap is not None else None)
                yield {"event": "health", "ts": time.time(), **mon.checkpoint()}
            if cap is not None:
                self.summary = self._conclude(cap)
                self.target_dirs = self._dirs(cap)
        finally:
            if cap is not None:
                cap.close()

    def _conclude(self, cap: Any) -> dict[str, Any]:
        """Targets seen, by which tools, and how many were up to date (None: not known, why)."""
        try:
            up = cap.up_to_date() if hasattr(cap, "up_to_date") else None
        except Exception as exc:  # noqa: BLE001 - the count is a figure, not the build
            up, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = ("make does not report the targets it finds up to date" if cap.kind == "make"
                   or getattr(getattr(cap, "make", None), "makes", 0) else "ninja did not say (-t commands failed)")
        tools = cap.tools() if hasattr(cap, "tools") else cap.kind
        return {"tools": tools, "targets": self.emitted_targets, "up_to_date": up, "why_unknown": why,
                "ignored": getattr(cap, "scratch", 0)}

    @staticmethod
    def _dirs(cap: Any) -> list[Path]:
        """Where the capture's target names are relative to: make's from where the build started
        (sub-makes' prefixed, make.py), a ninja edge's outputs from its build directory."""
        if cap.kind == "make":
            return [cap.cwd]
        if cap.kind == "ninja":
            return [cap.build_dir]
        return [cap.make.cwd, *(n.build_dir for n in getattr(cap, "ninjas", {}).values())]

    def end_line(self, exit_code: int) -> str:
        """The one line ``buildtel run`` prints about capture at the end ("" when there is
        nothing to say: capture off, or telemetry never ran the capture)."""
        if not self.want_capture:
            return ""
        s = self.summary
        if s is None:
            return f"no per-target data: {self.note}" if self.note else ""
        if not s["tools"]:
            return ("no per-target data: no make or ninja ran under this command (capture follows GNU make "
                    "and ninja through shells, scripts and cmake; other build tools are not seen)")
        line = f"{s['targets']} targets captured ({s['tools']})"
        if exit_code != 0:
            line += "; up-to-date targets not known (the build failed)"
        elif s["up_to_date"] is None:
            line += f"; up-to-date targets not known ({s['why_unknown']})"
        else:
            line += f"; {s['up_to_date']} up to date (not rebuilt)"
        if s["ignored"]:
            line += f"; {s['ignored']} CMake try_compile builds left out"
        return line

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _feed(mon: HealthMonitor, rec: dict[str, Any]) -> None:
        ev = rec.get("event")
        key = (rec.get("target"), rec.get("worker"))
        if ev == "target_started":
            mon.task_started(key)
        elif ev == "target_finished":
            mon.task_finished(key, failed=rec.get("status") == "failed")

    def _sample(self, mon: HealthMonitor) -> None:
        pct = host_memory_percent()
        if self.pid is None:
            mon.set_memory(mon.memory_bytes, pct)
            return
        ninja = self.capture is not None and self.capture.kind == "ninja"
        tree = sample_tree(self.pid, names=ninja)
        mon.set_memory(tree.rss_bytes if tree.processes else mon.memory_bytes, pct)
        if ninja:
            # Edges are only seen when they end; ninja's children are the ones running now.
            mon.set_active(tree.running_under("ninja"))


def live_sources(argv: list[str], cache_dir: Path, *, capture: bool = True,
                 health_interval_s: float = DEFAULT_INTERVAL_S) -> list[LiveSource]:
    """The sources ``buildtel run`` uses for ``argv``: one :class:`LiveSource`."""
    return [LiveSource(cache_dir, capture=capture, health_interval_s=health_interval_s)]
