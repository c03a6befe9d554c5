"""Map a live Build Event Protocol stream, event by event, to the project's events.

The Build Event Service endpoint (``services/bes``) hands each ``build_event_stream.BuildEvent``
here as proto3 JSON (``google.protobuf.json_format.MessageToDict``: the same shape as a
``--build_event_json_file`` line), so the per-event readers of :mod:`.bep` (``bep.HANDLERS``,
used read-only) interpret them exactly as ``buildtel import bep`` does.  What differs is *when*
things are known: an importer sees the whole file, a stream only what has arrived.  So:

* ``BuildStarted`` is held until the stream's header is complete: ``workspaceStatus`` (host,
  user, ``BUILD_SCM_*``) when ``started`` announces it — targets mapped before it (a loaded
  machine runs the status command late) are held with it, for the first ``MAX_EARLY`` events, and
  published after it — else the first event that makes a target;
* ``targetCompleted`` → ``TargetFinished`` at once (duration 0 at the build's start, as the
  importer: BEP has no per-target timing); a test target's ``targetCompleted`` announces its
  ``testResult`` children, which gives the runs/shards the importer counts at the end, so
  ``testResult`` → ``TargetFinished`` named as the importer names it, one per attempt (the
  collector keeps the last and counts attempts), and each attempt → a ``TestResults`` test
  case (:mod:`.bep_details`); failed ``actionCompleted`` → an action target, its output kept
  for the ``BuildFinished`` (read from Bazel's files only under the invocation's output base);
* ``BuildFinished`` is held from ``buildFinished`` until the ``lastMessage`` (``buildMetrics``,
  which carries the CPU time and action cache figures, and ``buildToolLogs``, the critical
  path, come after it), with ``expected_events`` so the collector completes the session the
  moment all are folded.  A stream that ends without ``buildFinished``
  sends no ``BuildFinished``: the collector stores it as abandoned (incomplete), never success.

:attr:`StreamMapper.holding` says whether the last event's information is still held (its
acknowledgement must then wait for a later publish).  No I/O but the bounded read of a failed
action's output files (:mod:`.bep_details`); no clock unless given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from buildtel.shared.importers import bep, bep_details
from buildtel.shared.importers import proto_json as pj
from buildtel.shared.protocol import (
    BuildEnvironment,
    BuildFinished,
    BuildStarted,
    Event,
    TargetFinished,
    TargetMetrics,
    TestResults,
    VcsInfo,
)
from buildtel.shared.sanitize import fix_event

# Kinds that make targets or end the build: the header (command, patterns, workspace status) is
# published before them at the latest.  Not targetConfigured: Bazel 7 sends workspaceStatus
# after the first of those.
_BODY_KINDS = frozenset({
    "targetCompleted", "actionCompleted", "testResult", "testSummary", "buildFinished", "buildMetrics",
    "buildToolLogs",
})
# Workspace-status / build-metadata keys naming the checkout (the conventions of Bazel's
# --workspace_status_command scripts and of --build_metadata).
_COMMIT_KEYS = ("BUILD_SCM_REVISION", "STABLE_BUILD_SCM_REVISION", "COMMIT_SHA", "STABLE_GIT_COMMIT")
_BRANCH_KEYS = ("BUILD_SCM_BRANCH", "STABLE_BUILD_SCM_BRANCH", "BRANCH_NAME", "STABLE_GIT_BRANCH")
_REMOTE_KEYS = ("BUILD_SCM_REMOTE", "STABLE_BUILD_SCM_REMOTE", "REPO_URL", "STABLE_REPO_URL")
INTERRUPTED = 8  # Bazel's ExitCode INTERRUPTED (Ctrl-C)
_END_KINDS = frozenset({"buildFinished", "buildMetrics", "buildToolLogs"})
MAX_EARLY = 1000  # BEP events fed while an announced workspaceStatus has not come: then the header goes without it


def _first(values: dict[str, str], keys: tuple[str, ...]) -> str | None:
    return next((values[k] for k in keys if values.get(k)), None)


class StreamMapper:
    """One invocation's BEP events in (``feed``), the project's events out, with their seqs."""

    def __init__(self, session_id: str, agent_id: str, *, clock: Callable[[], float] = time.time,
                 output_kib: int = bep_details.OUTPUT_KIB, resumed: bool = False) -> None:
        self.session_id, self.agent_id = session_id, agent_id
        self.st = bep._State()  # the importer's fold state, filled by its own handlers
        self.st.failures.output_kib = output_kib
        self._clock = clock
        self._seq = 0
        # Resumed: the invocation's first events went to an earlier endpoint (restarted since), which
        # published its BuildStarted; a second one from what this mapper knows would blank its name.
        self._header_open = not resumed
        self._status_expected = False  # started announced a workspaceStatus
        self._early: list[Event] = []  # mapped while the header waits for it
        self._finished = False  # buildFinished seen
        self._done = False  # BuildFinished emitted
        self._runs: dict[str, set[tuple[int, int]]] = {}  # test label -> (run, shard) announced
        self.metadata: dict[str, str] = {}  # buildMetadata
        self.events = 0

    @property
    def holding(self) -> bool:
        """True while information of events already fed waits for a later publish."""
        return self._header_open or (self._finished and not self._done)

    @property
    def header_sent(self) -> bool:
        """The BuildStarted is out (or was, by an earlier endpoint: ``resumed``)."""
        return not self._header_open

    @property
    def finished(self) -> bool:
        return self._done

    @property
    def start(self) -> float:
        try:
            ms = pj.epoch_ms(self.st.started, "startTime", "startTimeMillis")
        except (TypeError, ValueError, OverflowError):
            ms = None
        return (ms or 0.0) / 1000.0 or self._clock()

    def feed(self, ev: dict[str, Any]) -> list[Event]:
        """The project's events for one BEP event (proto3 JSON), in order; possibly none."""
        idv = ev.get("id")
        if not isinstance(idv, dict) or len(idv) != 1:
            return []
        kind, body = next(iter(idv.items()))
        body = body if isinstance(body, dict) else {}
        self.events += 1
        out: list[Event] = []
        if self._header_open and kind in _BODY_KINDS and (
                not self._status_expected or kind in _END_KINDS):
            out += self._close_header()
        self._note_children(kind, body, ev)
        handler = bep.HANDLERS.get(kind)
        if handler is not None and all(isinstance(v, dict) for k, v in ev.items() if k not in ("id", "children")
                                       and k != "lastMessage"):
            try:
                cases = len(self.st.test_cases)
                handler(self.st, body, ev, self.events)
                out += self._map(kind, body, ev)
                if len(self.st.test_cases) > cases:
                    out.append(TestResults(session_id=self.session_id, agent_id=self.agent_id, seq=self._next(),
                                           ts=self._clock(), cases=self.st.test_cases[cases:], source="bep"))
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
                pass  # the importer warns and skips such an event; so do we (no warnings on a live stream)
        elif kind == "buildMetadata" and isinstance(ev.get("buildMetadata"), dict):
            meta = ev["buildMetadata"].get("metadata", {})
            self.metadata.update({str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {})
        if self._header_open and kind == "workspaceStatus":
            out += self._close_header()
        if self._header_open and out:  # waiting for the announced workspaceStatus: held (not acknowledged)
            self._early += out
            out = []
        if self._header_open and self.events > MAX_EARLY:  # bounded: a status that never comes holds nothing long
            out += self._close_header()
        if ev.get("lastMessage") is True:
            out += self.close()
        return out

    def close(self) -> list[Event]:
        """The stream ended (lastMessage, or the connection closed): release what is held."""
        out: list[Event] = []
        if self._header_open:
            out += self._close_header()
        if self._finished and not self._done:
            out.append(self._build_finished())
        return out

    # -- internals ---------------------------------------------------------------------------
    def _next(self) -> int:
        self._seq += 1
        return self._seq - 1

    def _note_children(self, kind: str, body: dict[str, Any], ev: dict[str, Any]) -> None:
        children = ev.get("children")
        for child in children if isinstance(children, list) else []:
            if not isinstance(child, dict):
                continue
            if kind == "started" and "workspaceStatus" in child:
                self._status_expected = True
            if kind == "started" and isinstance(pat := child.get("pattern"), dict):
                self.st.requested += [str(p) for p in pat.get("pattern", []) if isinstance(pat.get("pattern"), list)]
            if isinstance(tr := child.get("testResult"), dict):
                run, shard = (pj.int64(tr.get(k)) or 0 for k in ("run", "shard"))
                self._runs.setdefault(str(tr.get("label", "")), set()).add((run, shard))

    def _close_header(self) -> list[Event]:
        """The BuildStarted, then the events held for it, renumbered so that it comes first."""
        header = self._header()
        early, self._early = self._early, []
        if early:
            first = early[0].seq
            header.seq = first
            for i, e in enumerate(early, start=1):
                e.seq = first + i
        return [header, *early]

    def _header(self) -> BuildStarted:
        self._header_open = False
        st, start = self.st, self.start
        bazel_cmd = str(st.started.get("command", ""))
        version = pj.get(st.started, "buildToolVersion")
        patterns = st.requested or st.patterns
        labels = {"ingest": "bes"}
        for key, value in (("invocation_id", st.started.get("uuid")), ("bazel_command", bazel_cmd),
                           ("bazel_version", version)):
            if value:
                labels[key] = str(value)
        status = {**self.metadata, **st.workspace}
        commit, branch, remote = (_first(status, keys) for keys in (_COMMIT_KEYS, _BRANCH_KEYS, _REMOTE_KEYS))
        vcs = None
        if commit or branch:
            vcs = VcsInfo(commit=commit, branch=branch, remote=remote,
                          dirty=status.get("BUILD_SCM_STATUS", status.get("STABLE_BUILD_SCM_STATUS", "")).lower()
                          in ("modified", "dirty"))
        env = BuildEnvironment(
            cwd=str(pj.get(st.started, "workingDirectory", "")),
            hostname=status.get("BUILD_HOST", "") or self.metadata.get("HOST", ""),
            user=status.get("BUILD_USER", "") or self.metadata.get("USER", ""),
            tool_versions={"bazel": str(version)} if version else {}, vcs=vcs)
        started = BuildStarted(
            session_id=self.session_id, agent_id=self.agent_id, seq=self._next(), ts=start,
            name=" ".join(["bazel", bazel_cmd, *patterns]).strip() or "bazel",
            command=st.command or (["bazel", bazel_cmd, *patterns] if bazel_cmd else []),
            environment=env, labels=labels)
        ev: BuildStarted = fix_event(started)
        return ev

    def _target(self, m: TargetMetrics) -> TargetFinished:
        ev: TargetFinished = fix_event(TargetFinished(
            session_id=self.session_id, agent_id=self.agent_id, seq=self._next(), ts=self._clock(),
            target=m.name, start=m.start, duration_s=m.duration_s, status=m.status, cache=m.cache,
            worker=m.worker, exit_code=m.exit_code, kind=m.kind, mnemonic=m.mnemonic, phases=m.phases))
        return ev

    def _map(self, kind: str, body: dict[str, Any], ev: dict[str, Any]) -> list[Event]:
        st, start = self.st, self.start
        if kind == "targetCompleted":
            key = (str(body["label"]), str(pj.obj(body.get("configuration", {})).get("id", "")))
            return [self._target(TargetMetrics(name=key[0], start=start, end=start, duration_s=0.0,
                                               status=st.completed[key],  # type: ignore[arg-type]
                                               kind=st.kinds.get(key[0]) or None))]
        if kind == "testResult":
            label = str(body["label"])
            run, shard = (pj.int64(body.get(k)) or 0 for k in ("run", "shard"))
            test = st.tests[(label, str(pj.obj(body.get("configuration", {})).get("id", "")), run, shard)]
            m = test.metrics
            if m is None:
                return []
            many = len(self._runs.get(label, set()) | {(run, shard)}) > 1
            m.name = f"{label} (test run {run} shard {shard})" if many else f"{label} (test)"
            if not test.timed:
                m.start, m.end = start, start + m.duration_s
            return [self._target(m)]
        if kind == "actionCompleted":
            m, has_times = st.actions[-1]
            if not has_times:
                m.start = m.end = start
            return [self._target(m)]
        if kind == "buildFinished":
            self._finished = True
        return []

    def _build_finished(self) -> BuildFinished:
        self._done = True
        st = self.st
        fin = st.finished or {}
        exit_code, outcome = bep.finished_outcome(fin)  # the importer's rule, not a copy of it
        finish_ms = pj.epoch_ms(fin, "finishTime", "finishTimeMillis")
        cpu_ms = pj.int64(pj.get(pj.obj(pj.get(st.metrics, "timingMetrics", {})), "cpuTimeInMs"))
        labels = dict(st.tool_labels)
        try:
            extra, cache = bep_details.metrics_labels(st.metrics)
            labels.update(extra)
        except (TypeError, ValueError, OverflowError):
            cache = None  # the importer warns and keeps the targets' figures; so do we
        if name := pj.obj(pj.get(fin, "exitCode", {})).get("name"):
            labels["exit_name"] = str(name)
        seq = self._next()
        ev: BuildFinished = fix_event(BuildFinished(
            session_id=self.session_id, agent_id=self.agent_id, seq=seq,
            ts=finish_ms / 1000.0 if finish_ms is not None else self._clock(),
            exit_code=exit_code, outcome=outcome,  # type: ignore[arg-type]
            cpu_s=cpu_ms / 1000.0 if cpu_ms is not None else None,
            expected_events={self.agent_id: seq + 1}, failures=bep.one_record_each(st), labels=labels,
            cache_hits=cache[0] if cache else None, cache_misses=cache[1] if cache else None))
        return ev
