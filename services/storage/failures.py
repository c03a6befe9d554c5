"""Failures across stored sessions, grouped by signature and class (docs/failures.md).

Endpoint ``<ns>.storage.failures``: a MessagePack :class:`FailuresRequest`, a
:class:`FailuresReply`; errors as the other storage endpoints (400 with the reason).  Over the
newest ``sessions`` stored sessions that match the filters, every failed target's record
(``shared/failrecord.py``: sessions of older versions get theirs on read, classified with the
farm's rules) is grouped by (signature, class): a failure without an error line groups by its
target.  Per group: failures, sessions, first and last seen, the targets and example sessions
(newest first).

**flaky** is decided here, across builds: a `code` or `unknown` failure of target T in a build
of commit C is `flaky` when another stored build of C (in the window read) built T
successfully.  An `infra` failure stays `infra` (its cause is known).  Builds without a known
commit are never compared.

Only sessions the index says had failed targets are decoded, and of the others only those on
a commit with a failure, and then only their targets' names and statuses.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec

from buildtel.services.storage.api import StorageError
from buildtel.services.storage.index import Filters
from buildtel.shared import micro
from buildtel.shared.failclass import Rule
from buildtel.shared.failrecord import records
from buildtel.shared.protocol import BuildSession, FailureClass
from buildtel.shared.service import BAD_REQUEST, ServiceError
from buildtel.shared.subjects import Subjects

FAILURES = "failures"
MAX_SESSIONS = 20_000
MAX_GROUPS = 10_000
EXAMPLES = 5  # example sessions and targets per group
NO_SIGNATURE = "(no error line) "  # the group of a failure without a signature: this + its target

Time = Annotated[float, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class FailuresRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    since: Time | None = None  # session time (finish, else start), inclusive
    until: Time | None = None  # exclusive
    branch: Name | None = None
    name: Name | None = None  # session (build) name
    label: Name | None = None  # "key=value"
    failure_class: FailureClass | None = None  # only groups of this class
    match: Annotated[str, msgspec.Meta(max_length=4096)] = ""  # substring of the signature or a target
    sessions: Annotated[int, msgspec.Meta(ge=1, le=MAX_SESSIONS)] = 1000
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_GROUPS)] = 100


class FailureGroup(msgspec.Struct, kw_only=True):
    signature: str  # the normalised error line; "(no error line) <target>" when none was found
    failure_class: str  # code, infra, flaky or unknown
    class_rule: str = ""  # the rule that classified its newest failure ("flaky": the flaky rule)
    count: int = 0  # failures (failed targets) in the group
    sessions: int = 0  # distinct sessions
    first_seen: float = 0.0  # session time of the oldest failure read
    last_seen: float = 0.0
    targets: list[str] = []  # distinct targets, newest first, at most EXAMPLES
    example_sessions: list[str] = []  # newest first, at most EXAMPLES
    example_error: str = ""  # the newest failure's first error line (redacted at the agent)


class FailuresReply(msgspec.Struct, kw_only=True):
    sessions_read: int  # sessions with failed targets in the window read
    failures_total: int  # failures in them
    groups_total: int  # groups before `failure_class`, `match` and `limit`
    groups: list[FailureGroup]  # most failures first, then the newest
    partial: list[str] = []  # "partial: partition k did not answer" (partitioned storage, router.py)


class _Vcs(msgspec.Struct):
    commit: str | None = None


class _Env(msgspec.Struct):
    vcs: _Vcs | None = None


class _Target(msgspec.Struct, array_like=True):
    name: str
    start: float = 0.0
    end: float = 0.0
    duration_s: float = 0.0
    status: str = "success"


class _TargetsView(msgspec.Struct):
    targets: list[_Target] = []


_session_decoder = msgspec.msgpack.Decoder(BuildSession)
_targets_decoder = msgspec.msgpack.Decoder(_TargetsView)
failures_decoder = msgspec.msgpack.Decoder(FailuresRequest)
failures_reply_decoder = msgspec.msgpack.Decoder(FailuresReply)
_enc = msgspec.msgpack.Encoder()

Failure = tuple[float, str, str | None, Any]  # (session time, session id, commit, TargetFailure)


def read(store: Any, summaries: list[Any], rules: tuple[Rule, ...]) -> tuple[list[Failure], set[tuple[str, str]], int]:
    """The failures of ``summaries`` (newest first), the (commit, target)s built successfully there,
    and how many sessions had failures (blocking: a worker thread)."""
    failures: list[Failure] = []
    failing = [s for s in summaries if s.failed or s.outcome in ("failed", "cancelled")]
    for s in failing:
        raw = store.read_summary(s)
        if raw is None:
            continue
        try:
            session = _session_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # written by a version with another shape: `buildtel show` says what is wrong with it
        failures += [(s.t, s.id, s.commit, f) for f in counted(session, rules)]
    wanted = {(c, f.target) for _, _, c, f in failures if c and f.failure_class in ("code", "unknown")}
    return failures, passed_pairs(store, summaries, wanted), len({sid for _, sid, _, _ in failures})


def counted(session: Any, rules: tuple[Rule, ...]) -> list[Any]:
    """The failure records of ``session`` that count in groups: a record that points at another's
    (``kept_with``: a failed Bazel action's, at its label's) is the same failure, not a second one."""
    return [f for f in records(session, rules) if not f.kept_with]


def passed_pairs(store: Any, summaries: list[Any], wanted: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (commit, target) pairs of ``wanted`` that succeeded in one of ``summaries``' sessions:
    the flaky rule's evidence (blocking: reads records; the store here, a partition in partmerge.py)."""
    commits = {c for c, _ in wanted}
    passed: set[tuple[str, str]] = set()
    for s in summaries:
        if s.commit not in commits:
            continue
        raw = store.read_summary(s)
        if raw is None:
            continue
        try:
            view = _targets_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        passed.update((s.commit, t.name) for t in view.targets
                      if t.status == "success" and (s.commit, t.name) in wanted)
    return passed


def group(failures: list[Failure], passed: set[tuple[str, str]]) -> list[FailureGroup]:
    """Groups by (signature, class) of ``failures`` (newest first), the flaky rule applied."""
    groups: dict[tuple[str, str], FailureGroup] = {}
    sessions: dict[tuple[str, str], set[str]] = {}
    for t, sid, commit, f in failures:
        cls, rule = f.failure_class or "unknown", f.class_rule
        if cls in ("code", "unknown") and commit and (commit, f.target) in passed:
            cls, rule = "flaky", "flaky"
        sig = f.signature or NO_SIGNATURE + f.target
        g = groups.get((sig, cls))
        if g is None:
            g = groups[(sig, cls)] = FailureGroup(signature=sig, failure_class=cls, class_rule=rule, first_seen=t,
                                                  last_seen=t, example_error=f.errors[0] if f.errors else "")
            sessions[(sig, cls)] = set()
        g.count += 1
        g.first_seen, g.last_seen = min(g.first_seen, t), max(g.last_seen, t)
        sessions[(sig, cls)].add(sid)
        if f.target not in g.targets and len(g.targets) < EXAMPLES:
            g.targets.append(f.target)
        if sid not in g.example_sessions and len(g.example_sessions) < EXAMPLES:
            g.example_sessions.append(sid)
    for key, g in groups.items():
        g.sessions = len(sessions[key])
    return sorted(groups.values(), key=lambda g: (-g.count, -g.last_seen, g.signature))


def _decode(data: bytes) -> FailuresRequest:
    try:
        req = failures_decoder.decode(data or b"\x80")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ServiceError(BAD_REQUEST, f"bad failures request: {exc}") from None
    if req.since is not None and req.until is not None and req.until < req.since:
        raise ServiceError(BAD_REQUEST, f"bad failures request: until {req.until} is before since {req.since}")
    return req


def _fit(make: Any, items: list[FailureGroup], budget: int) -> bytes:
    """The reply encoded within ``budget`` bytes: fewer groups when it would not fit."""
    while True:
        out = _enc.encode(make(items))
        if len(out) <= budget or len(items) <= 1:
            return out
        items = items[:len(items) * budget // len(out) * 9 // 10 or 1]


async def serve_failures(store: Any, data: bytes, budget: int, rules: tuple[Rule, ...]) -> bytes:
    req = _decode(data)
    filters = Filters(branch=req.branch, name=req.name, label=req.label, since=req.since, until=req.until)
    summaries, _ = await store.summaries(filters, desc=True, limit=req.sessions)
    failures, passed, read_n = await asyncio.to_thread(read, store, summaries, rules)
    groups = group(failures, passed)
    chosen = [g for g in groups if (req.failure_class is None or g.failure_class == req.failure_class)
              and (not req.match or req.match in g.signature or any(req.match in t for t in g.targets))]
    return _fit(lambda items: FailuresReply(sessions_read=read_n, failures_total=len(failures),
                                            groups_total=len(groups), groups=items), chosen[:req.limit], budget)


# -- client ---------------------------------------------------------------------------------------
async def failures(nc: Any, subjects: Subjects, req: FailuresRequest, *, timeout: float = 30.0) -> FailuresReply:
    """Failure groups from the storage service (raises ``StorageError``: 503 none answering, 400 bad)."""
    data = await micro.request(nc, subjects.endpoint("storage", FAILURES), _enc.encode(req), timeout=timeout,
                               service="storage service", error=StorageError)
    return failures_reply_decoder.decode(data)
