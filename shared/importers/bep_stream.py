"""Map a live Build Event Protocol stream, event by event, to the project's events.

The Build Event Service endpoint (``services/bes``) hands each ``build_event_stream.BuildEvent``
here as proto3 JSON (``google.protobuf.json_format.MessageToDict``: the same shape as a
``--build_event_json_file`` line), folded by the handlers of :mod:`.bep_events` (``HANDLERS``) into
the importer's own state; the session's head and end are read from it by
:mod:`.bep_session`, as ``buildtel import bep`` reads them — one mapping.  What differs is
*when* things are known: an importer sees the whole file, a stream only what has arrived.  So:

* ``BuildStarted`` (:func:`.bep_session.header`) is held until the stream's header is complete:
  ``workspaceStatus`` (host, user, ``BUILD_SCM_*``) when ``started`` announces it — targets
  mapped before it (a loaded machine runs the status command late) are held with it, for the
  first ``MAX_EARLY`` events, and published after it — else the first event that makes a target;
* ``targetCompleted`` → ``TargetFinished`` at once, named and made as the importer makes it
  (``bep_events.completed_target``); ``testResult`` → ``TargetFinished``, one per attempt (the
  collector keeps the last and counts attempts), and each attempt → a ``TestResults`` test
  case; ``actionCompleted`` → an action target.  Each action and attempt is sent and let go:
  the state keeps none (failed actions' output records, bounded, wait for the end);
* ``BuildFinished`` (:func:`.bep_session.ending`) is held from ``buildFinished`` until the
  ``lastMessage`` (``buildMetrics``, ``buildToolLogs`` come after it), with ``expected_events``
  so the collector completes the session the moment all are folded.  A stream without
  ``buildFinished`` but with an event aborted ``USER_INTERRUPTED`` gets a ``cancelled``
  ``BuildFinished`` without exit code when it ends; any other sends none: the collector stores
  it as abandoned (incomplete), never success — as the importer does.

:attr:`StreamMapper.holding` says whether the last event's information is still held (its
acknowledgement must then wait for a later publish).  No I/O but the bounded read of a failed
action's output files (:mod:`.bep_details`); no clock unless given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from buildtel.shared.importers import bep_details, bep_events, bep_session
from buildtel.shared.importers import proto_json as pj
from buildtel.shared.protocol import BuildFinished, BuildStarted, Event, TargetFinished, TargetMetrics, TestResults
from buildtel.shared.sanitize import fix_event

# Kinds that make targets or end the build: the header (command, patterns, workspace status) is
# published before them at the latest.  Not targetConfigured: Bazel 7 sends workspaceStatus
# after the first of those.
_BODY_KINDS = frozenset({
    "targetCompleted", "actionCompleted", "testResult", "testSummary", "buildFinished", "buildMetrics",
    "buildToolLogs",
})
_END_KINDS = frozenset({"buildFinished", "buildMetrics", "buildToolLogs"})
MAX_EARLY = 1000  # BEP events fed while an announced workspaceStatus has not come: then the header goes without it


class StreamMapper:
    """One invocation's BEP events in (``feed``), the project's events out, with their seqs."""

    def __init__(self, session_id: str, agent_id: str, *, clock: Callable[[], float] = time.time,
                 output_kib: int = bep_details.OUTPUT_KIB, resumed: bool = False) -> None:
        self.session_id, self.agent_id = session_id, agent_id
        self.st = bep_events.State()  # the importer's fold state, filled by its own handlers
        self.st.failures.output_kib = output_kib
        self._clock = clock
        self._seq = 0
        # Resumed: the invocation's first events went to an earlier endpoint (restarted since), which
        # published its BuildStarted; a second one from what this mapper knows would blank its name.
        self._header_open = not resumed
        self._status_expected = False  # started announced a workspaceStatus
        self._early: list[Event] = []  # mapped while the header waits for it
        self._finished = False  # buildFinished seen
        self._done = False  # BuildFinished emitted (or the end found unusable: the collector abandons it)
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
        bep_events.note_abort(self.st, kind, ev, self.events)
        handler = bep_events.HANDLERS.get(kind)
        if handler is not None and all(isinstance(v, dict) for k, v in ev.items() if k not in ("id", "children")
                                       and k != "lastMessage"):
            try:
                handler(self.st, body, ev, self.events)
                out += self._map(kind, body, ev)
                if self.st.test_cases:  # sent at once, not kept: a stream holds no test attempts
                    out.append(TestResults(session_id=self.session_id, agent_id=self.agent_id, seq=self._next(),
                                           ts=self._clock(), cases=self.st.test_cases, source="bep"))
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
                pass  # the importer warns and skips such an event; so do we (no warnings on a live stream)
            finally:
                self.st.test_cases = []
                del self.st.actions[:]  # each action is published as it comes (_map), never kept
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
        """The stream ended (lastMessage, or the connection closed): release what is held.  Without
        ``buildFinished`` but after an event aborted USER_INTERRUPTED the build was cancelled
        (bep_session.ending): that is said now; any other stream without it says nothing, and the
        collector stores it as abandoned."""
        out: list[Event] = []
        if self._header_open:
            out += self._close_header()
        if not self._done and (self._finished or self.st.interrupted is not None):
            out += self._build_finished()
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
        head = bep_session.header(self.st)
        ev: BuildStarted = fix_event(BuildStarted(
            session_id=self.session_id, agent_id=self.agent_id, seq=self._next(), ts=self.start,
            name=head.name, command=head.command, environment=head.environment,
            labels={"ingest": "bes", **head.labels}))
        return ev

    def _target(self, m: TargetMetrics) -> TargetFinished:
        ev: TargetFinished = fix_event(TargetFinished(
            session_id=self.session_id, agent_id=self.agent_id, seq=self._next(), ts=self._clock(),
            target=m.name, start=m.start, duration_s=m.duration_s, status=m.status, cache=m.cache,
            worker=m.worker, exit_code=m.exit_code, kind=m.kind, mnemonic=m.mnemonic, phases=m.phases))
        return ev

    def _map(self, kind: str, body: dict[str, Any], ev: dict[str, Any]) -> list[Event]:
        """The targets of the event just folded into the state, as the importer makes them (bep._targets)."""
        st, start = self.st, self.start
        if kind == "targetCompleted":
            key = (str(body["label"]), str(pj.obj(body.get("configuration", {})).get("id", "")))
            return [self._target(bep_events.completed_target(st, key, start))]
        if kind == "testResult":
            run, shard = (pj.int64(body.get(k)) or 0 for k in ("run", "shard"))
            test = st.tests[(str(body["label"]), str(pj.obj(body.get("configuration", {})).get("id", "")), run, shard)]
            return [] if test.metrics is None else [self._target(test.metrics)]
        if kind == "actionCompleted" and st.actions:
            m, has_times = st.actions[-1]
            if not has_times:
                m.start = m.end = start
            return [self._target(m)]
        if kind == "buildFinished":
            self._finished = True
        return []

    def _build_finished(self) -> list[Event]:
        self._done = True
        end = bep_session.ending(self.st)
        if end.outcome == "abandoned":  # an unusable buildFinished: nothing says how it ended
            return []
        seq = self._next()
        ev: BuildFinished = fix_event(BuildFinished(
            session_id=self.session_id, agent_id=self.agent_id, seq=seq, ts=end.finish,
            exit_code=end.exit_code or 0, exit_code_known=end.exit_code is not None,
            outcome=end.outcome,  # type: ignore[arg-type]
            cpu_s=end.cpu_s, expected_events={self.agent_id: seq + 1}, failures=end.failures, labels=end.labels,
            cache_hits=end.cache[0], cache_misses=end.cache[1]))
        return [ev]
