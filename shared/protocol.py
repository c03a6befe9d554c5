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

from typing import Annotated, Literal

import msgspec

PROTOCOL_VERSION = 1


def _doc(meaning: str, unit: str | None = None) -> msgspec.Meta:
    """A field's meaning and unit: the one source of docs/protocol.md's tables and docs/schemas/
    (docs/gen_protocol.py).  A Meta without constraints changes neither the wire format nor the
    codec's speed; ``unit`` goes into the JSON Schema as the extra keyword ``unit``."""
    return msgspec.Meta(description=meaning, extra_json_schema={"unit": unit} if unit else None)


TargetStatus = Literal["success", "failed", "skipped", "cancelled"]
CacheResult = Literal["local_hit", "remote_hit", "miss", "uncacheable"]
# "cancelled" (stopped by a user or a signal) and "unknown" (no evidence of how the build ended, e.g. an
# imported .ninja_log alone) were added later: older stored sessions keep their values.
Outcome = Literal["success", "failed", "abandoned", "cancelled", "unknown"]
OUTCOMES: tuple[str, ...] = ("success", "failed", "abandoned", "cancelled", "unknown")
# Outcomes that say whether a build succeeded: the denominator of success rates.  A cancelled build
# was stopped before it could say, an unknown one never told us (docs/analytics.md).
RATED_OUTCOMES: frozenset[str] = frozenset({"success", "failed", "abandoned"})
# Outcomes whose duration is a whole build's: the only ones in build-time figures.
TIMED_OUTCOMES: frozenset[str] = frozenset({"success", "failed"})
HealthState = Literal["healthy", "degraded", "critical"]
TestOutcome = Literal["passed", "failed", "error", "skipped"]
# Why a target failed (shared/failclass.py, docs/failures.md): its code, the machine or network
# under it, a flake (it passed elsewhere on the same commit), or nothing told.
FailureClass = Literal["code", "infra", "flaky", "unknown"]
FAILURE_CLASSES: tuple[str, ...] = ("code", "infra", "flaky", "unknown")

CACHE_HITS: frozenset[str] = frozenset({"local_hit", "remote_hit"})


class VcsInfo(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Version-control state of the checkout a build ran in."""

    system: Annotated[str, _doc("version-control system")] = "git"
    commit: Annotated[str | None, _doc("commit checked out (full hash); null when unknown")] = None
    branch: Annotated[str | None, _doc("branch checked out; null when detached or unknown")] = None
    dirty: Annotated[bool, _doc("the work tree had uncommitted changes")] = False
    remote: Annotated[str | None, _doc("URL of the remote the checkout tracks, redacted by the agent")] = None


class BuildEnvironment(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Snapshot of the machine and process a build ran in. ``env`` is redacted at the agent."""

    os: Annotated[str, _doc("operating system (`platform.system()`: Linux, Darwin, Windows)")] = ""
    os_release: Annotated[str, _doc("OS/kernel release (`platform.release()`)")] = ""
    arch: Annotated[str, _doc("machine architecture (x86_64, arm64…)")] = ""
    cpus: Annotated[int, _doc("logical CPUs of the machine; 0 when unknown", "CPUs")] = 0
    memory_bytes: Annotated[int, _doc("physical memory of the machine; 0 when unknown", "bytes")] = 0
    hostname: Annotated[str, _doc("host name of the machine")] = ""
    user: Annotated[str, _doc("user the build ran as")] = ""
    cwd: Annotated[str, _doc("directory the build was started in")] = ""
    python: Annotated[str, _doc("Python version of the agent (empty for agents not written in Python)")] = ""
    tool_versions: Annotated[dict[str, str], _doc(
        "first line of `<tool> --version`, per tool found (gcc, make, ninja…)")] = {}
    vcs: Annotated[VcsInfo | None, _doc(
        "checkout the build ran in; null when the directory is not a checkout")] = None
    env: Annotated[dict[str, str], _doc(
        "environment variables of the build; secret values redacted by the agent")] = {}
    # An absent tool version or a False ``dirty`` named here is unknown, not a fact.
    missing_probes: Annotated[dict[str, str], _doc(
        "probes that gave no answer (`tool_versions.gcc`, `vcs.dirty`, `vcs.commit`…) -> why; "
        "a value they would have set is unknown, not absent")] = {}


class _Event(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type", gc=False):
    """Fields every event carries: who sent it, for which session, in which order."""

    session_id: Annotated[str, _doc("128-bit session id, 32 lowercase hex digits (also the build's W3C trace id)")]
    agent_id: Annotated[str, _doc(
        "sending agent: non-empty, at most 200 characters, no `:`, `|` or control characters")]
    seq: Annotated[int, _doc("event number per agent and session: from 0, contiguous, below 2^24")]
    ts: Annotated[float, _doc("when the agent observed the event", "Unix s")]


class BuildStarted(_Event, tag="build_started"):
    name: Annotated[str, _doc("build name shown in listings")] = ""
    command: Annotated[list[str], _doc("command line of the build, redacted by the agent")] = []
    environment: Annotated[BuildEnvironment | None, _doc(
        "machine and process the build ran in; null when not captured")] = None
    labels: Annotated[dict[str, str], _doc("free-form labels (CI job, pipeline…) to group and filter builds by")] = {}
    traceparent: Annotated[str | None, _doc(
        "W3C traceparent the build was started under: the session span's parent")] = None
    record: Annotated[bool, _doc("ask the recorder to keep this session's event stream (for replay)")] = False


class TargetStarted(_Event, tag="target_started"):
    target: Annotated[str, _doc("target name; its `target_finished` names the same target")]
    worker: Annotated[str, _doc("worker (parallel slot or host) that runs it")] = ""


class Phase(msgspec.Struct, array_like=True, gc=False):
    """A named slice of a target's time (compile, link, test…), in seconds."""

    name: Annotated[str, _doc("phase name (compile, link, test…)")]
    duration_s: Annotated[float, _doc("time spent in the phase", "s")]


class TargetFinished(_Event, tag="target_finished"):
    target: Annotated[str, _doc("target name (a label, an output path…)")]
    start: Annotated[float, _doc("when the target started", "Unix s")]
    duration_s: Annotated[float, _doc("wall time the target took", "s")]
    status: Annotated[TargetStatus, _doc("how the target ended")] = "success"
    cache: Annotated[CacheResult, _doc(
        "cache result: `local_hit`/`remote_hit` are hits, `miss` a miss, `uncacheable` neither")] = "miss"
    worker: Annotated[str, _doc("worker (parallel slot or host) that ran it")] = ""
    exit_code: Annotated[int | None, _doc("exit status of its action; null when unknown")] = None
    kind: Annotated[str | None, _doc("kind of target (rule kind, e.g. `cc_library`); null when unknown")] = None
    mnemonic: Annotated[str | None, _doc("action mnemonic (`CppCompile`…); null when unknown")] = None
    cpu_s: Annotated[float | None, _doc("CPU time of its action, user + system; null when unknown", "s")] = None
    peak_rss_bytes: Annotated[int | None, _doc(
        "peak resident memory of its action; null when unknown", "bytes")] = None
    deps: Annotated[list[str], _doc("names of the targets it depends on")] = []
    phases: Annotated[list[Phase], _doc("its time split into named phases, each a 2-array `[name, duration_s]`")] = []


class HealthCheckpoint(_Event, tag="health"):
    completed_tasks: Annotated[int, _doc("tasks that ended so far, whatever their status", "tasks")] = 0
    failed_tasks: Annotated[int, _doc("the part of `completed_tasks` that failed", "tasks")] = 0
    active_tasks: Annotated[int, _doc("tasks running now", "tasks")] = 0
    pending_tasks: Annotated[int, _doc("tasks not started yet; 0 when the total is unknown", "tasks")] = 0
    worker_count: Annotated[int, _doc("parallel slots of the build; 0 when unknown", "workers")] = 0
    active_workers: Annotated[int, _doc("slots busy now", "workers")] = 0
    memory_bytes: Annotated[int, _doc("resident memory of the build's processes", "bytes")] = 0
    memory_percent: Annotated[float, _doc("memory of the host in use", "%")] = 0.0
    velocity: Annotated[float, _doc("tasks completed per second over the last interval", "tasks/s")] = 0.0
    throughput: Annotated[float, _doc("tasks completed per second since the build started", "tasks/s")] = 0.0
    utilisation: Annotated[float, _doc(
        "`active_workers / worker_count`; 0 when the worker count is unknown", "fraction 0-1")] = 0.0
    eta_s: Annotated[float | None, _doc(
        "time left at the recent rate, `(pending + active) / velocity`; null when the total is unknown", "s")] = None
    status: Annotated[HealthState, _doc("verdict of the health rules (docs/health.md)")] = "healthy"
    reasons: Annotated[list[str], _doc("one sentence per health rule that fired")] = []


class HealthPoint(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    """One health checkpoint of a build as kept with it (``BuildSession.health_series``)."""

    ts: Annotated[float, _doc("when the agent took the checkpoint", "Unix s")]
    status: Annotated[HealthState, _doc("verdict of the health rules")] = "healthy"
    active_workers: Annotated[int, _doc("slots busy", "workers")] = 0
    worker_count: Annotated[int, _doc("parallel slots of the build; 0 when unknown", "workers")] = 0
    memory_bytes: Annotated[int, _doc("resident memory of the build's processes", "bytes")] = 0
    memory_percent: Annotated[float, _doc("memory of the host in use", "%")] = 0.0
    velocity: Annotated[float, _doc("tasks completed per second over the last interval", "tasks/s")] = 0.0
    completed_tasks: Annotated[int, _doc("tasks that ended so far", "tasks")] = 0
    failed_tasks: Annotated[int, _doc("the part of `completed_tasks` that failed", "tasks")] = 0
    agent_id: Annotated[str, _doc("agent that sent it")] = ""


class TargetFailure(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """A failed target: what it printed, its signature and its class; the one failure record of a session
    (``docs/failures.md``), redacted by the agent."""

    target: Annotated[str, _doc("the failed target (as named in `targets`)")]
    attributed: Annotated[bool, _doc(
        "false: its output could not be told apart from other output (`note` says why; see the build log)")] = True
    note: Annotated[str, _doc("how the output was found, or why it was not")] = ""
    output: Annotated[list[str], _doc(
        "its output as the build printed it (stdout and stderr interleaved), the last lines: at most "
        "`BUILDER_TELEMETRY_FAILURE_OUTPUT_KIB` KiB and 400 lines, each at most 4096 characters")] = []
    output_cut_bytes: Annotated[int, _doc("bytes of its output before the lines kept", "bytes")] = 0
    errors: Annotated[list[str], _doc(
        "its first error lines (`error:`, `Error`, `FAILED`, `undefined reference`…): at most 10, each at most "
        "300 characters")] = []
    signature: Annotated[str | None, _doc(
        "its first error line normalised (paths, numbers, hashes, temp names stripped), to group identical "
        "failures across builds; null when no error line was found")] = None
    # Added later (records of older versions lack them: read as not classified, classified on read).
    failure_class: Annotated[FailureClass | None, _doc(
        "`code` (compiler, linker, test assertion), `infra` (killed by a signal, out of memory or disk, "
        "network, remote cache/executor), `flaky` (passed elsewhere on the same commit) or `unknown`, by the "
        "rules of docs/failures.md; null: not classified yet (an older record: readers classify it)")] = None
    class_rule: Annotated[str, _doc("the rule that gave `failure_class` (`farm:<name>` for a farm's rule)")] = ""
    exit_code: Annotated[int | None, _doc("exit status of its action; null when unknown")] = None
    tool_code: Annotated[str, _doc(
        "the tool's own failure code, e.g. Bazel's `failureDetail` `spawn.REMOTE_CACHE_FAILED`; empty: none")] = ""
    source: Annotated[Literal["console", "import"], _doc(
        "`console`: found in the console `buildtel run` kept; `import`: the error text an importer read")] = "console"
    kept_with: Annotated[str, _doc(
        "the target whose record holds this failure's output (a failed Bazel action's record points at its "
        "label's); such a record is shown, not counted again in failure groups; empty: its own record")] = ""


class BuildLog(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The build's console log: kept compressed in the logs bucket, beside the session (``docs/failures.md``)."""

    object: Annotated[str, _doc(
        "object name in the namespace's logs bucket (`<NS>_BUILD_LOGS`); empty when the log was not kept")] = ""
    bytes: Annotated[int, _doc("bytes the build printed (stdout and stderr)", "bytes")] = 0
    kept_bytes: Annotated[int, _doc("bytes of it kept: the head and the tail when over the limit", "bytes")] = 0
    cut_bytes: Annotated[int, _doc("bytes cut between the head and the tail (a marker line says where)", "bytes")] = 0
    compressed_bytes: Annotated[int, _doc("size of the stored object (zlib)", "bytes")] = 0
    error: Annotated[str, _doc("why the log was not kept; empty when it was")] = ""


class BuildFinished(_Event, tag="build_finished"):
    exit_code: Annotated[int, _doc("exit status of the build command")] = 0
    outcome: Annotated[Literal["success", "failed", "cancelled"] | None, _doc(
        "`success`, `failed` or `cancelled` (interrupted); null: derived from `exit_code` (0 is success)")] = None
    cpu_s: Annotated[float | None, _doc(
        "CPU time of the build's process tree, user + system; null when unknown", "s")] = None
    peak_rss_bytes: Annotated[int | None, _doc(
        "peak resident memory of the build's processes; null when unknown", "bytes")] = None
    expected_events: Annotated[dict[str, int] | None, _doc(
        "events each agent sent in this session, counting every event (`build_started`, health "
        "checkpoints and this `build_finished` too): the collector completes the session the moment they "
        "are all folded; null: not known", "events per agent")] = None
    up_to_date: Annotated[int | None, _doc(
        "targets the build tool found up to date and did not rebuild (avoided work); null: the tool "
        "does not say (make) or the build failed", "targets")] = None
    failures: Annotated[list[TargetFailure], _doc(
        "output of the build's failed targets (at most 100; output kept for the first 256 KiB of it)")] = []
    log: Annotated[BuildLog | None, _doc("where the build's console log is kept; null when it was not captured")] = None
    labels: Annotated[dict[str, str], _doc(
        "labels known only when the build ends (Bazel's action counts, critical path), added to those of "
        "`build_started`")] = {}
    cache_hits: Annotated[int | None, _doc(
        "the build tool's own cache hits (Bazel's action cache, counting actions): the session's cache figures "
        "instead of its targets'; null: from the targets", "actions")] = None
    cache_misses: Annotated[int | None, _doc(
        "the build tool's own cache misses, with `cache_hits`; null: from the targets", "actions")] = None
    exit_code_known: Annotated[bool, _doc(
        "false: the build ended without the tool saying its exit code (a Bazel stream interrupted before its "
        "`buildFinished`); the session's `exit_code` is then null and `exit_code` here means nothing")] = True


class TestCase(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    """One test case run, from a JUnit XML report (shared/junit.py) or a Bazel ``testResult``
    (shared/importers/bep_details.py); docs/tests.md."""

    __test__ = False  # not a pytest test class, whatever its name

    suite: Annotated[str, _doc("the case's `classname`, else the name of its `testsuite`")]
    name: Annotated[str, _doc("the case's `name`")]
    duration_s: Annotated[float, _doc("the case's `time`; 0 when absent or not a number", "s")] = 0.0
    outcome: Annotated[TestOutcome, _doc(
        "`failed`: a `<failure>` (an assertion); `error`: an `<error>` (the test could not run to its "
        "end); `skipped`: a `<skipped>`; else `passed`")] = "passed"
    message: Annotated[str, _doc(
        "failure, error or skip message with the start of its text, secrets redacted, at most 1000 "
        "characters; empty for passed cases")] = ""
    target: Annotated[str, _doc(
        "the build target that ran it, when known (docs/tests.md#which-target-ran-a-test): a Bazel test's "
        "label; for JUnit, the make target or ninja edge that wrote the report, else a target of the build "
        "named like the case's suite; empty when not known (and in sessions stored before this field)")] = ""


class TestResults(_Event, tag="test_results"):
    __test__ = False

    cases: Annotated[list[TestCase], _doc(
        "test cases of one JUnit XML file, in file order, each an array (see TestCase); at most 2000 "
        "per event (a larger file is sent as several events)")] = []
    source: Annotated[str, _doc("the file they were read from")] = ""


Event = BuildStarted | TargetStarted | TargetFinished | HealthCheckpoint | BuildFinished | TestResults


class EventBatch(msgspec.Struct, kw_only=True, tag="batch", tag_field="type", gc=False):
    """What an agent publishes: a run of its events for one session, in sequence order."""

    session_id: Annotated[str, _doc("the session every event of the batch belongs to")]
    agent_id: Annotated[str, _doc("the agent that sent every event of the batch")]
    events: Annotated[list[Event], _doc("events of that session and agent in sequence order, at most 10 000")]
    version: Annotated[int, _doc("protocol version; exactly 1")] = PROTOCOL_VERSION


class TargetMetrics(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    """One target of a folded session (the last attempt wins; ``attempts`` counts them all)."""

    name: Annotated[str, _doc("target name")]
    start: Annotated[float, _doc("when the target started", "Unix s")]
    end: Annotated[float, _doc("when it ended: `start + duration_s`", "Unix s")]
    duration_s: Annotated[float, _doc("wall time the target took", "s")]
    status: Annotated[TargetStatus, _doc(
        "how the target ended (`cancelled`: started but never finished)")] = "success"
    cache: Annotated[CacheResult, _doc(
        "cache result: `local_hit`/`remote_hit` are hits, `miss` a miss, `uncacheable` neither")] = "miss"
    worker: Annotated[str, _doc("worker (parallel slot or host) that ran it")] = ""
    agent_id: Annotated[str, _doc("agent that reported it")] = ""
    exit_code: Annotated[int | None, _doc("exit status of its action; null when unknown")] = None
    kind: Annotated[str | None, _doc("kind of target; null when unknown")] = None
    mnemonic: Annotated[str | None, _doc("action mnemonic; null when unknown")] = None
    cpu_s: Annotated[float | None, _doc("CPU time of its action; null when unknown", "s")] = None
    peak_rss_bytes: Annotated[int | None, _doc(
        "peak resident memory of its action; null when unknown", "bytes")] = None
    attempts: Annotated[int, _doc(
        "times the target finished in this session (retries + 1); the last attempt is the one kept")] = 1
    deps: Annotated[list[str], _doc("names of the targets it depends on")] = []
    phases: Annotated[list[Phase], _doc("its time split into named phases, each a 2-array `[name, duration_s]`")] = []
    # Last, with a default: an array-like struct only grows at its end (older records lack it).
    error: Annotated[str | None, _doc(
        "what its failing action printed, as importers of older versions stored it (at most 16 KiB); "
        "null: none, or (now) kept in the session's `failures` record instead")] = None


class SessionTotals(msgspec.Struct, kw_only=True, gc=False):
    targets: Annotated[int, _doc("targets in the session", "targets")] = 0
    succeeded: Annotated[int, _doc("targets with status `success`", "targets")] = 0
    failed: Annotated[int, _doc("targets with status `failed`", "targets")] = 0
    skipped: Annotated[int, _doc("targets with status `skipped`", "targets")] = 0
    cancelled: Annotated[int, _doc("targets with status `cancelled`", "targets")] = 0
    target_time_s: Annotated[float, _doc("sum of target durations (the build's serial cost)", "s")] = 0.0
    cpu_s: Annotated[float, _doc("sum of the targets' CPU times (unknown ones count 0)", "s")] = 0.0
    events: Annotated[int, _doc("events folded into the session, of every agent and kind", "events")] = 0


class SeqRange(msgspec.Struct, array_like=True, gc=False):
    """Sequence numbers ``first..last`` (inclusive) of one agent that the collector never received."""

    agent_id: Annotated[str, _doc("agent whose events are missing")]
    first: Annotated[int, _doc("first missing seq")]
    last: Annotated[int, _doc("last missing seq (inclusive)")]


class LostEvents(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Events that reached the collector but were refused (dead-lettered), and why."""

    agent_id: Annotated[str, _doc("agent that sent them; empty when the batch could not be decoded")]
    events: Annotated[int, _doc(
        "how many were refused; 0 when even that is unknown (an undecodable batch)", "events")]
    code: Annotated[str, _doc(
        "why, as a reason code (`non_finite`, `unknown_version`, `undecodable`…; see Limits on a batch)")]
    reason: Annotated[str, _doc("for people: the first refused event's reason")] = ""
    first_seq: Annotated[int | None, _doc("lowest refused seq; null when unknown")] = None
    last_seq: Annotated[int | None, _doc("highest refused seq; null when unknown")] = None


class Completeness(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Whether a stored session holds every event its agents sent (docs/protocol.md "Completeness").

    ``complete`` is False when events are known to be lost: refused by the collector (``lost``),
    never received (``missing``), or the build never finished (abandoned).  ``reasons`` says so
    in sentences.  A session stored before this record existed has ``completeness = None``:
    unknown, read as complete (that is what those versions claimed).
    """

    complete: Annotated[bool, _doc(
        "false when events are known to be lost (refused, never received, or no `build_finished`)")] = True
    expected: Annotated[dict[str, int], _doc(
        "events per agent the session should hold (its count or its seq range)", "events per agent")] = {}
    received: Annotated[dict[str, int], _doc("events per agent folded into it", "events per agent")] = {}
    missing: Annotated[list[SeqRange], _doc("seq ranges never received (at most 100; see `missing_total`)")] = []
    missing_total: Annotated[int, _doc("events never received, all ranges together", "events")] = 0
    lost: Annotated[list[LostEvents], _doc("refused events, grouped by agent and cause")] = []
    reasons: Annotated[list[str], _doc("what was lost, in sentences")] = []


class BuildSession(msgspec.Struct, kw_only=True, omit_defaults=True, tag="session", tag_field="type", gc=False):
    """A completed build: what storage keeps and the analyzer reads."""

    id: Annotated[str, _doc("session id (32 lowercase hex digits)")]
    name: Annotated[str, _doc("build name, from `build_started`")] = ""
    start: Annotated[float, _doc(
        "when the build started: its `build_started`, else its first target", "Unix s")] = 0.0
    finish: Annotated[float, _doc(
        "when it finished: its `build_finished`, else the last event heard", "Unix s")] = 0.0
    duration_s: Annotated[float, _doc("`finish - start`", "s")] = 0.0
    outcome: Annotated[Outcome, _doc(
        "`abandoned`: no `build_finished` before the inactivity timeout; `cancelled`: stopped by a user or "
        "a signal (SIGHUP, SIGINT, SIGTERM: exit code 129/130/143); `unknown`: nothing said how it ended "
        "(an imported log without the tool's output or exit code)")] = "success"
    exit_code: Annotated[int | None, _doc("exit status of the build command; null when abandoned or not known")] = None
    command: Annotated[list[str], _doc("command line, redacted")] = []
    labels: Annotated[dict[str, str], _doc("labels from `build_started`")] = {}
    agents: Annotated[list[str], _doc("agents that sent events, sorted")] = []
    environment: Annotated[BuildEnvironment | None, _doc("from `build_started`; null when not captured")] = None
    targets: Annotated[list[TargetMetrics], _doc(
        "one entry per target, each an array (see TargetMetrics), sorted by start")] = []
    cache_hits: Annotated[int, _doc("targets that were local or remote cache hits", "targets")] = 0
    cache_misses: Annotated[int, _doc("targets that were cache misses", "targets")] = 0
    cache_hit_rate: Annotated[float, _doc(
        "`cache_hits / (cache_hits + cache_misses)`; 0 when both are 0", "fraction 0-1")] = 0.0
    totals: Annotated[SessionTotals, _doc(
        "counts and sums over the targets")] = msgspec.field(default_factory=SessionTotals)
    health: Annotated[HealthCheckpoint | None, _doc("the last health checkpoint; null when none was sent")] = None
    health_series: Annotated[list[HealthPoint], _doc(
        "health over the build: one checkpoint per 5 s slot (the earliest of each), oldest first, "
        "each a 10-array (see HealthPoint)")] = []
    health_series_dropped: Annotated[int, _doc(
        "checkpoints past the series' cap (2160 slots: 3 hours) not kept; the last one is still `health`",
        "checkpoints")] = 0
    cpu_s: Annotated[float | None, _doc("from `build_finished`; null when unknown", "s")] = None
    peak_rss_bytes: Annotated[int | None, _doc("from `build_finished`; null when unknown", "bytes")] = None
    up_to_date: Annotated[int | None, _doc(
        "from `build_finished`: targets found up to date, not rebuilt (avoided work); null: not known",
        "targets")] = None
    trace_id: Annotated[str | None, _doc(
        "W3C trace id of the build (the session id unless started under a traceparent)")] = None
    record: Annotated[bool, _doc("the recorder keeps this session's event stream")] = False
    version: Annotated[int, _doc("protocol version; 1")] = PROTOCOL_VERSION
    parent_span_id: Annotated[str | None, _doc(
        "span the build was started under (from an incoming traceparent): the session span's parent")] = None
    # Events lost on the way (refused batches, sequence gaps, an abandoned build); None: stored by a
    # version that did not check, read as complete.  Never "success" silently: see is_complete().
    completeness: Annotated[Completeness | None, _doc(
        "whether the session holds every event its agents sent; null: stored by a version that did not "
        "check, read as complete")] = None
    failures: Annotated[list[TargetFailure], _doc(
        "from `build_finished`: what its failed targets printed (docs/failures.md)")] = []
    log: Annotated[BuildLog | None, _doc(
        "from `build_finished`: where its console log is kept (`GET /api/v1/sessions/{id}/log`); null: none")] = None
    tests: Annotated[list[TestCase], _doc(
        "test cases run by the build (JUnit XML it wrote, `test_results` events), in the order "
        "received, each an array (see TestCase); at most 200 000")] = []
    tests_dropped: Annotated[int, _doc("test cases past the cap of `tests`, not kept", "test cases")] = 0


class SessionStarted(msgspec.Struct, kw_only=True, omit_defaults=True, tag="session_started", tag_field="type",
                     gc=False):
    """A build has begun: published once per session on ``NS.sessions.started`` by the collector
    that first folds one of its ``build_started`` events (live followers: the web API's stream)."""

    id: Annotated[str, _doc("session id (32 lowercase hex digits)")]
    name: Annotated[str, _doc("build name, from `build_started`")] = ""
    start: Annotated[float, _doc("`ts` of the `build_started`", "Unix s")] = 0.0
    agent: Annotated[str, _doc("agent that sent the `build_started`")] = ""
    host: Annotated[str, _doc("host name of its machine; empty when not captured")] = ""
    branch: Annotated[str | None, _doc("VCS branch (else the `branch` label); null when unknown")] = None
    commit: Annotated[str | None, _doc("VCS commit; null when unknown")] = None
    labels: Annotated[dict[str, str], _doc("labels from `build_started`")] = {}


def session_started(ev: BuildStarted) -> SessionStarted:
    """The announcement of the build ``ev`` starts."""
    env = ev.environment
    vcs = env.vcs if env is not None else None
    return SessionStarted(id=ev.session_id, name=ev.name, start=ev.ts, agent=ev.agent_id,
                          host=env.hostname if env is not None else "",
                          branch=(vcs.branch if vcs is not None else None) or ev.labels.get("branch"),
                          commit=vcs.commit if vcs is not None else None, labels=dict(ev.labels))


def is_complete(session: BuildSession) -> bool:
    """False when ``session`` is known to lack events (unknown, i.e. old sessions, reads as complete)."""
    return session.completeness is None or session.completeness.complete


def new_session_id() -> str:
    """A random 128-bit session id, lowercase hex (also usable as a W3C trace id)."""
    import secrets

    return secrets.token_hex(16)


def is_session_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value) and value != "0" * 32
