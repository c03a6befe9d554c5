"""The one mapping of a Bazel BEP stream's header and end, for ``buildtel import bep`` (:mod:`.bep`)
and the live BES endpoint (:mod:`.bep_stream`).

Both fold the stream's events with the same handlers (``bep_events.HANDLERS``) into the same state
(``bep_events.State``); what a session says of the build as a whole is then read from that state here,
once: :func:`header` (name, command, environment with host, user and the checkout from
``BUILD_SCM_*``/``--build_metadata``, labels) — the live endpoint's ``BuildStarted``, the
importer's session head — and :func:`ending` (outcome, exit code, finish time, CPU time, cache
figures, failure records, end-of-build labels) — the live ``BuildFinished``, the importer's
session end.  So a live and an imported build of the same stream give the same session.

How a stream without ``buildFinished`` ends (docs/bazel.md): after an event aborted
``USER_INTERRUPTED`` it is ``cancelled`` with no exit code (Bazel never said one; label
``aborted`` gives the reason) — the live endpoint says so when the stream ends; otherwise it is
``abandoned`` and incomplete — live, the collector stores it so when the stream stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from buildtel.shared.importers import proto_json as pj
from buildtel.shared.importers.bep_details import metrics_labels
from buildtel.shared.importers.bep_events import State, build_start, finished_outcome, one_record_each
from buildtel.shared.protocol import CACHE_HITS, BuildEnvironment, Outcome, TargetFailure, VcsInfo

# Workspace-status / build-metadata keys naming the checkout (the conventions of Bazel's
# --workspace_status_command scripts and of --build_metadata).
COMMIT_KEYS = ("BUILD_SCM_REVISION", "STABLE_BUILD_SCM_REVISION", "COMMIT_SHA", "STABLE_GIT_COMMIT")
BRANCH_KEYS = ("BUILD_SCM_BRANCH", "STABLE_BUILD_SCM_BRANCH", "BRANCH_NAME", "STABLE_GIT_BRANCH")
REMOTE_KEYS = ("BUILD_SCM_REMOTE", "STABLE_BUILD_SCM_REMOTE", "REPO_URL", "STABLE_REPO_URL")
CUT = "no buildFinished event: the stream was cut before the build ended"


def _first(values: dict[str, str], keys: tuple[str, ...]) -> str | None:
    return next((values[k] for k in keys if values.get(k)), None)


@dataclass
class Header:
    name: str
    command: list[str]
    environment: BuildEnvironment
    labels: dict[str, str]


def header(st: State) -> Header:
    """What the stream says of the build before it runs: ``started``, the command line, the
    patterns, ``workspaceStatus`` and ``buildMetadata`` (workspace status wins over metadata)."""
    bazel_cmd = str(st.started.get("command", ""))
    version = pj.get(st.started, "buildToolVersion")
    patterns = st.requested or st.patterns
    labels: dict[str, str] = {}
    for key, value in (("invocation_id", st.started.get("uuid")), ("bazel_command", bazel_cmd),
                       ("bazel_version", version)):
        if value:
            labels[key] = str(value)
    status = {**st.metadata, **st.workspace}
    commit, branch, remote = (_first(status, keys) for keys in (COMMIT_KEYS, BRANCH_KEYS, REMOTE_KEYS))
    vcs = None
    if commit or branch:
        dirty = status.get("BUILD_SCM_STATUS", status.get("STABLE_BUILD_SCM_STATUS", "")).lower()
        vcs = VcsInfo(commit=commit, branch=branch, remote=remote, dirty=dirty in ("modified", "dirty"))
    env = BuildEnvironment(
        cwd=str(pj.get(st.started, "workingDirectory", "")),
        hostname=status.get("BUILD_HOST", "") or st.metadata.get("HOST", ""),
        user=status.get("BUILD_USER", "") or st.metadata.get("USER", ""),
        tool_versions={"bazel": str(version)} if version else {}, vcs=vcs)
    return Header(name=" ".join(["bazel", bazel_cmd, *patterns]).strip() or "bazel",
                  command=st.command or (["bazel", bazel_cmd, *patterns] if bazel_cmd else []),
                  environment=env, labels=labels)


@dataclass
class Ending:
    outcome: Outcome  # abandoned: nothing says how the build ended
    exit_code: int | None
    finish: float  # s: buildFinished's finish time, else the last end the stream gave
    duration_s: float | None  # exact from the two timestamps; None: finish - start
    cpu_s: float | None
    cache: tuple[int, int]  # (hits, misses): Bazel's action cache, else the tests'
    labels: dict[str, str]
    failures: list[TargetFailure]
    why: str = ""  # how it ended without buildFinished (a sentence)
    problems: list[str] = field(default_factory=list)  # unusable payloads (the importer warns)


def ending(st: State) -> Ending:
    """How the build ended, from everything the stream said (see the module's docstring)."""
    start = build_start(st)
    try:
        start_ms = pj.epoch_ms(st.started, "startTime", "startTimeMillis")
    except (TypeError, ValueError, OverflowError):
        start_ms = None
    labels = dict(st.tool_labels)
    problems: list[str] = []
    tests = [t.metrics for t in st.tests.values() if t.metrics is not None]
    # Without Bazel's action cache figures only tests say anything about caching; the
    # targetCompleted targets carry no cache information and must not count as misses.
    cache = (sum(t.cache in CACHE_HITS for t in tests), sum(t.cache == "miss" for t in tests))
    cpu_s = None
    try:
        extra, tool_cache = metrics_labels(st.metrics)
        labels.update(extra)
        cache = tool_cache or cache
        if (cpu_ms := pj.int64(pj.get(pj.obj(pj.get(st.metrics, "timingMetrics", {})), "cpuTimeInMs"))) is not None:
            cpu_s = cpu_ms / 1000.0
    except (TypeError, ValueError, OverflowError) as exc:
        problems.append(f"unusable buildMetrics payload ({exc})")
    labels.update(st.summaries.labels())
    if dropped := st.failures.dropped + st.target_failures_dropped:
        labels["failures_dropped"] = str(dropped)  # past the records a session keeps: counted
    finish = max([start, st.last_action_end] + [t.end for t in tests])
    exit_code: int | None = None
    outcome: Outcome = "abandoned"
    duration_s = None
    why = ""
    if st.finished is not None:
        try:
            exit_code, outcome = finished_outcome(st.finished)
            if name := pj.obj(pj.get(st.finished, "exitCode", {})).get("name"):
                labels["exit_name"] = str(name)
            if (finish_ms := pj.epoch_ms(st.finished, "finishTime", "finishTimeMillis")) is not None:
                finish = finish_ms / 1000.0
                if start_ms is not None:  # exact, not a difference of rounded floats
                    duration_s = max(0.0, (finish_ms - start_ms) / 1000.0)
        except (TypeError, ValueError, OverflowError) as exc:
            exit_code, outcome, why = None, "abandoned", f"unusable buildFinished payload ({exc})"
            labels.pop("exit_name", None)
    elif st.interrupted is not None:
        line, reason = st.interrupted
        outcome, labels["aborted"] = "cancelled", reason
        why = f"no buildFinished event: the build was interrupted (event {line} aborted {reason}); outcome cancelled"
    else:
        why = CUT
    return Ending(outcome=outcome, exit_code=exit_code, finish=finish, duration_s=duration_s, cpu_s=cpu_s,
                  cache=cache, labels=labels, failures=one_record_each(st), why=why, problems=problems)
