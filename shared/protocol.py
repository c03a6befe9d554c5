"""The one schema of Builder Telemetry: every message on the bus and every stored record.

Agents publish :class:`EventBatch` messages; the collector folds them into a
:class:`BuildSession`; storage keeps sessions; the analyzer reads them.  All
types are tagged ``msgspec.Struct``s encoded as MessagePack (see
``docs/protocol.md``).

Schema evolution follows msgspec's rules so old history files and old agents
stay readable: fields are only ever *added*, always with a default, never
renamed, re-typed or removed; a new event kind is a new tag.  Decoders ignore
fields they do not know, so a newer agent can talk to an older collector.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 1

TargetStatus = Literal["success", "failed", "skipped", "cancelled"]
CacheResult = Literal["local_hit", "remote_hit", "miss", "uncacheable"]
Outcome = Literal["success", "failed", "abandoned"]
HealthState = Literal["healthy", "degraded", "critical"]

CACHE_HITS: frozenset[str] = frozenset({"local_hit", "remote_hit"})


class VcsInfo(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Version-control state of the checkout a build ran in."""

    system: str = "git"
    commit: str | None = None
    branch: str | None = None
    dirty: bool = False
    remote: str | None = None


class BuildEnvironment(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Snapshot of the machine and process a build ran in. ``env`` is redacted at the agent."""

    os: str = ""
    os_release: str = ""
    arch: str = ""
    cpus: int = 0
    memory_bytes: int = 0
    hostname: str = ""
    user: str = ""
    cwd: str = ""
    python: str = ""
    tool_versions: dict[str, str] = {}
    vcs: VcsInfo | None = None
    env: dict[str, str] = {}


class _Event(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type", gc=False):
    """Fields every event carries: who sent it, for which session, in which order."""

    session_id: str  # 128-bit, 32 lowercase hex digits
    agent_id: str
    seq: int  # per agent and session, from 0, contiguous
    ts: float  # Unix seconds when the agent observed the event


class BuildStarted(_Event, tag="build_started"):
    name: str = ""
    command: list[str] = []
    environment: BuildEnvironment | None = None
    labels: dict[str, str] = {}
    traceparent: str | None = None
    record: bool = False  # ask the recorder to keep this session's event stream


class TargetStarted(_Event, tag="target_started"):
    target: str
    worker: str = ""


class Phase(msgspec.Struct, array_like=True, gc=False):
    """A named slice of a target's time (compile, link, test…), in seconds."""

    name: str
    duration_s: float


class TargetFinished(_Event, tag="target_finished"):
    target: str
    start: float  # Unix seconds
    duration_s: float
    status: TargetStatus = "success"
    cache: CacheResult = "miss"
    worker: str = ""
    exit_code: int | None = None
    kind: str | None = None
    mnemonic: str | None = None
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None
    deps: list[str] = []
    phases: list[Phase] = []


class HealthCheckpoint(_Event, tag="health"):
    completed_tasks: int = 0
    failed_tasks: int = 0
    active_tasks: int = 0
    pending_tasks: int = 0
    worker_count: int = 0
    active_workers: int = 0
    memory_bytes: int = 0
    memory_percent: float = 0.0
    velocity: float = 0.0  # tasks per second over the last interval
    throughput: float = 0.0  # tasks per second since the build started
    utilisation: float = 0.0  # active_workers / worker_count
    eta_s: float | None = None
    status: HealthState = "healthy"
    reasons: list[str] = []


class BuildFinished(_Event, tag="build_finished"):
    exit_code: int = 0
    outcome: Literal["success", "failed"] | None = None  # derived from exit_code when absent
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None
    # Events each agent sent for this session, when the finishing agent knows them; lets the
    # collector complete a multi-agent session the moment the last event is folded.
    expected_events: dict[str, int] | None = None


Event = BuildStarted | TargetStarted | TargetFinished | HealthCheckpoint | BuildFinished


class EventBatch(msgspec.Struct, kw_only=True, tag="batch", tag_field="type", gc=False):
    """What an agent publishes: a run of its events for one session, in sequence order."""

    session_id: str
    agent_id: str
    events: list[Event]
    version: int = PROTOCOL_VERSION


class TargetMetrics(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    """One target of a folded session (the last attempt wins; ``attempts`` counts them all)."""

    name: str
    start: float
    end: float
    duration_s: float
    status: TargetStatus = "success"
    cache: CacheResult = "miss"
    worker: str = ""
    agent_id: str = ""
    exit_code: int | None = None
    kind: str | None = None
    mnemonic: str | None = None
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None
    attempts: int = 1
    deps: list[str] = []
    phases: list[Phase] = []


class SessionTotals(msgspec.Struct, kw_only=True, gc=False):
    targets: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    cancelled: int = 0
    target_time_s: float = 0.0  # sum of target durations (serial cost)
    cpu_s: float = 0.0
    events: int = 0


class SeqRange(msgspec.Struct, array_like=True, gc=False):
    """Sequence numbers ``first..last`` (inclusive) of one agent that the collector never received."""

    agent_id: str
    first: int
    last: int


class LostEvents(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Events that reached the collector but were refused (dead-lettered), and why."""

    agent_id: str
    events: int  # how many; 0 when even that is unknown (an undecodable batch)
    code: str  # the validate.Rejected code (``non_finite``, ``unknown_version``, ``undecodable``...)
    reason: str = ""  # for people; the first refused event's reason
    first_seq: int | None = None
    last_seq: int | None = None


class Completeness(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Whether a stored session holds every event its agents sent (docs/protocol.md "Completeness").

    ``complete`` is False when events are known to be lost: refused by the collector (``lost``),
    never received (``missing``), or the build never finished (abandoned).  ``reasons`` says so
    in sentences.  A session stored before this record existed has ``completeness = None``:
    unknown, read as complete (that is what those versions claimed).
    """

    complete: bool = True
    expected: dict[str, int] = {}  # events per agent the session should hold (counts or seq range)
    received: dict[str, int] = {}  # events per agent folded into it
    missing: list[SeqRange] = []  # seq ranges never received (at most MAX_LISTED, see missing_total)
    missing_total: int = 0
    lost: list[LostEvents] = []  # refused events, grouped by agent and cause
    reasons: list[str] = []


class BuildSession(msgspec.Struct, kw_only=True, omit_defaults=True, tag="session", tag_field="type", gc=False):
    """A completed build: what storage keeps and the analyzer reads."""

    id: str
    name: str = ""
    start: float = 0.0
    finish: float = 0.0
    duration_s: float = 0.0
    outcome: Outcome = "success"
    exit_code: int | None = None
    command: list[str] = []
    labels: dict[str, str] = {}
    agents: list[str] = []
    environment: BuildEnvironment | None = None
    targets: list[TargetMetrics] = []
    cache_hits: int = 0
    cache_misses: int = 0
    cache_hit_rate: float = 0.0
    totals: SessionTotals = msgspec.field(default_factory=SessionTotals)
    health: HealthCheckpoint | None = None
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None
    trace_id: str | None = None
    record: bool = False
    version: int = PROTOCOL_VERSION
    # Span the build was started under (from an incoming traceparent): the session span's parent.
    parent_span_id: str | None = None
    # Events lost on the way (refused batches, sequence gaps, an abandoned build); None: stored by a
    # version that did not check, read as complete.  Never "success" silently: see is_complete().
    completeness: Completeness | None = None


def is_complete(session: BuildSession) -> bool:
    """False when ``session`` is known to lack events (unknown, i.e. old sessions, reads as complete)."""
    return session.completeness is None or session.completeness.complete


def new_session_id() -> str:
    """A random 128-bit session id, lowercase hex (also usable as a W3C trace id)."""
    import secrets

    return secrets.token_hex(16)


def is_session_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value) and value != "0" * 32
