"""``buildtel diff A B``: what changed between two recordings, or two stored sessions.

Both sides are first turned into a :class:`Side` (the fields a diff can use), so a
recording can be compared with a session too; what one side does not know (a
session has no input hashes, a session from storage no event stream) is
reported as unavailable rather than as "no change".

Timing changes are reported when a target's duration moved by at least
``min_delta_s`` *and* ``min_ratio`` of the slower run, so scheduler noise on
millisecond targets does not drown a real regression; they are listed by size
of change, largest first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from buildtel.shared.protocol import (
    BuildFinished,
    BuildSession,
    BuildStarted,
    Event,
    HealthCheckpoint,
    TargetFinished,
    TargetStarted,
)
from buildtel.shared.recording.manifest import RecordingManifest


@dataclass
class TargetInfo:
    duration_s: float
    cache: str
    status: str


@dataclass
class Side:
    id: str
    kind: str  # "recording" | "session"
    command: list[str] = field(default_factory=list)
    cwd: str = ""
    env: dict[str, str] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    # Probes without an answer (BuildEnvironment.missing_probes); None: no environment at all,
    # so every tool version is unknown.
    missing_probes: dict[str, str] | None = field(default_factory=dict)
    inputs: dict[str, str] | None = None  # path -> sha256; None: unknown
    outputs: dict[str, str] | None = None
    external: dict[str, str] | None = None
    targets: dict[str, TargetInfo] = field(default_factory=dict)
    events: list[Event] | None = None
    exit_code: int | None = None


def targets_from_events(events: Sequence[Event]) -> dict[str, TargetInfo]:
    out: dict[str, TargetInfo] = {}
    for ev in sorted(events, key=lambda e: (e.ts, e.agent_id, e.seq)):
        if isinstance(ev, TargetFinished):
            out[ev.target] = TargetInfo(ev.duration_s, ev.cache, ev.status)
    return out


def _missing(env: Any) -> dict[str, str] | None:
    return dict(env.missing_probes) if env is not None else None


def side_from_recording(m: RecordingManifest, events: list[Event]) -> Side:
    env = m.environment
    return Side(id=m.id, kind="recording", command=list(m.command), cwd=m.cwd, missing_probes=_missing(env),
                env=dict(env.env) if env else {}, tool_versions=dict(env.tool_versions) if env else {},
                inputs={e.path: e.sha256 for e in m.inputs}, outputs={e.path: e.sha256 for e in m.outputs},
                external={e.path: e.sha256 for e in m.external_inputs},
                targets=targets_from_events(events), events=events or None, exit_code=m.exit_code)


def side_from_events(sid: str, events: list[Event]) -> Side:
    """A session the recorder service kept but no run capture described: events only."""
    started = next((e for e in events if isinstance(e, BuildStarted)), None)
    env = started.environment if started else None
    finished = next((e for e in events if isinstance(e, BuildFinished)), None)
    return Side(id=sid, kind="recording", command=list(started.command) if started else [],
                missing_probes=_missing(env), cwd=env.cwd if env else "", env=dict(env.env) if env else {},
                tool_versions=dict(env.tool_versions) if env else {}, targets=targets_from_events(events),
                events=events, exit_code=finished.exit_code if finished else None)


def side_from_store(store: Any, rid: str) -> Side | None:
    """The side of a recording in a :class:`~buildtel.shared.recording.store.RecordingStore`: its
    manifest with the event stream of its session, or an event stream the recorder service kept
    alone; ``None`` when the store holds neither (``buildtel diff`` and the recorder's ``diff``)."""
    if store.has_manifest(rid):
        m = store.load_manifest(rid)
        return side_from_recording(m, store.load_events(m.session_id or rid))
    if store.has_events(rid):
        return side_from_events(rid, store.load_events(rid))
    return None


def side_from_session(s: BuildSession) -> Side:
    env = s.environment
    return Side(id=s.id, kind="session", command=list(s.command), cwd=env.cwd if env else "",
                missing_probes=_missing(env),
                env=dict(env.env) if env else {}, tool_versions=dict(env.tool_versions) if env else {},
                targets={t.name: TargetInfo(t.duration_s, t.cache, t.status) for t in s.targets},
                exit_code=s.exit_code)


# Different in every run by design (session id, trace context): not a change worth reporting.
IGNORED_ENV = frozenset({"BUILDER_TELEMETRY_SESSION_ID", "TRACEPARENT", "TRACESTATE", "OLDPWD", "SHLVL", "_"})


def _map_diff(a: Mapping[str, str], b: Mapping[str, str], ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    a = {k: v for k, v in a.items() if k not in ignore}
    b = {k: v for k, v in b.items() if k not in ignore}
    return {
        "added": {k: b[k] for k in sorted(b.keys() - a.keys())},
        "removed": {k: a[k] for k in sorted(a.keys() - b.keys())},
        "changed": {k: [a[k], b[k]] for k in sorted(a.keys() & b.keys()) if a[k] != b[k]},
    }


def _unknown(missing: dict[str, str] | None, tool: str) -> str | None:
    if missing is None:
        return "no environment recorded"
    return missing.get(f"tool_versions.{tool}")


def _tools_diff(a: Side, b: Side) -> dict[str, Any]:
    """Like _map_diff, but a tool whose probe gave no answer on one side is "unknown" (with the
    reason), never added or removed: a probe that timed out says nothing about the tool."""
    d = _map_diff(a.tool_versions, b.tool_versions)
    unknown: dict[str, str] = {}
    for kind, side, other in (("removed", b, "B"), ("added", a, "A")):
        for tool in list(d[kind]):
            why = _unknown(side.missing_probes, tool)
            if why is not None:
                unknown[tool] = f"not probed in {other}: {why}"
                del d[kind][tool]
    d["unknown"] = dict(sorted(unknown.items()))
    return d


def _files_diff(a: Mapping[str, str] | None, b: Mapping[str, str] | None) -> dict[str, list[str]] | None:
    if a is None or b is None:
        return None
    return {
        "changed": sorted(p for p in a.keys() & b.keys() if a[p] != b[p]),
        "added": sorted(b.keys() - a.keys()),
        "removed": sorted(a.keys() - b.keys()),
    }


def _signature(ev: Event) -> tuple[Any, ...] | None:
    """What must match for two builds to have "done the same thing" at this point; times, agents,
    workers and session ids differ between any two runs and are left out, as is health."""
    if isinstance(ev, TargetStarted):
        return ("target_started", ev.target)
    if isinstance(ev, TargetFinished):
        return ("target_finished", ev.target, ev.status, ev.cache)
    if isinstance(ev, BuildStarted):
        return ("build_started", tuple(ev.command))
    if isinstance(ev, BuildFinished):
        return ("build_finished", ev.exit_code)
    return None


def first_divergence(a: Sequence[Event], b: Sequence[Event]) -> dict[str, Any] | None:
    def sigs(events: Sequence[Event]) -> list[tuple[Any, ...]]:
        ordered = sorted(events, key=lambda e: (e.ts, e.agent_id, e.seq))
        return [s for s in (_signature(e) for e in ordered if not isinstance(e, HealthCheckpoint)) if s]

    sa, sb = sigs(a), sigs(b)
    for i, (x, y) in enumerate(zip(sa, sb, strict=False)):  # unequal lengths: handled below
        if x != y:
            return {"index": i, "a": " ".join(map(str, x)), "b": " ".join(map(str, y))}
    if len(sa) != len(sb):
        i = min(len(sa), len(sb))
        return {"index": i, "a": " ".join(map(str, sa[i])) if i < len(sa) else "(end of stream)",
                "b": " ".join(map(str, sb[i])) if i < len(sb) else "(end of stream)"}
    return None


def diff(a: Side, b: Side, *, min_delta_s: float = 0.05, min_ratio: float = 0.10) -> dict[str, Any]:
    timing: list[dict[str, Any]] = []
    cache: list[dict[str, Any]] = []
    status: list[dict[str, Any]] = []
    for name in sorted(a.targets.keys() & b.targets.keys()):
        ta, tb = a.targets[name], b.targets[name]
        delta = tb.duration_s - ta.duration_s
        if abs(delta) >= min_delta_s and abs(delta) >= min_ratio * max(ta.duration_s, tb.duration_s):
            timing.append({"target": name, "a": ta.duration_s, "b": tb.duration_s, "delta_s": round(delta, 6)})
        if ta.cache != tb.cache:
            cache.append({"target": name, "a": ta.cache, "b": tb.cache})
        if ta.status != tb.status:
            status.append({"target": name, "a": ta.status, "b": tb.status})
    # Largest change first (slower or faster alike), so the top lines are the ones that explain
    # the difference; ties by name for a stable order.
    timing.sort(key=lambda x: (-abs(x["delta_s"]), x["target"]))
    divergence: dict[str, Any] | str | None
    if a.events is None or b.events is None:
        divergence = "unavailable"
    else:
        divergence = first_divergence(a.events, b.events)
    return {
        "a": {"id": a.id, "kind": a.kind, "exit_code": a.exit_code},
        "b": {"id": b.id, "kind": b.kind, "exit_code": b.exit_code},
        "command": None if a.command == b.command else {"a": a.command, "b": b.command},
        "cwd": None if a.cwd == b.cwd else {"a": a.cwd, "b": b.cwd},
        "env": _map_diff(a.env, b.env, IGNORED_ENV),
        "tool_versions": _tools_diff(a, b),
        "inputs": _files_diff(a.inputs, b.inputs),
        "external_inputs": _files_diff(a.external, b.external),
        "outputs": _files_diff(a.outputs, b.outputs),
        "targets": {"timing": timing, "cache": cache, "status": status,
                    "added": sorted(b.targets.keys() - a.targets.keys()),
                    "removed": sorted(a.targets.keys() - b.targets.keys())},
        "first_divergence": divergence,
    }


def render(d: dict[str, Any]) -> str:
    lines = [f"A: {d['a']['kind']} {d['a']['id']} (exit {d['a']['exit_code']})",
             f"B: {d['b']['kind']} {d['b']['id']} (exit {d['b']['exit_code']})"]
    if d["command"]:
        lines += ["command:", f"  - {' '.join(d['command']['a'])}", f"  + {' '.join(d['command']['b'])}"]
    if d["cwd"]:
        lines.append(f"working directory: {d['cwd']['a']} -> {d['cwd']['b']}")
    for title in ("env", "tool_versions"):
        m = d[title]
        if any(m.values()):
            lines.append("environment:" if title == "env" else "tool versions:")
            lines += [f"  + {k}={v}" for k, v in m["added"].items()]
            lines += [f"  - {k}={v}" for k, v in m["removed"].items()]
            lines += [f"  ~ {k}: {x} -> {y}" for k, (x, y) in m["changed"].items()]
            lines += [f"  ? {k}: {why}" for k, why in m.get("unknown", {}).items()]
    for title, label in (("inputs", "inputs"), ("external_inputs", "inputs outside the tree"),
                         ("outputs", "outputs")):
        f = d[title]
        if f is None:
            lines.append(f"{label}: unavailable (one side is not a file recording)")
        elif any(f.values()):
            lines.append(f"{label}:")
            lines += [f"  ~ {p}" + (" (differs)" if title == "outputs" else " (changed)") for p in f["changed"]]
            lines += [f"  + {p}" for p in f["added"]]
            lines += [f"  - {p}" for p in f["removed"]]
    t = d["targets"]
    if t["timing"]:
        lines.append("target timing:")
        lines += [f"  {x['target']}: {x['a']:.3f}s -> {x['b']:.3f}s ({x['delta_s']:+.3f}s)" for x in t["timing"]]
    if t["cache"]:
        lines.append("cache results:")
        lines += [f"  {x['target']}: {x['a']} -> {x['b']}" for x in t["cache"]]
    if t["status"]:
        lines.append("target status:")
        lines += [f"  {x['target']}: {x['a']} -> {x['b']}" for x in t["status"]]
    if t["added"] or t["removed"]:
        lines.append(f"targets: {len(t['added'])} only in B, {len(t['removed'])} only in A")
        lines += [f"  + {n}" for n in t["added"][:20]] + [f"  - {n}" for n in t["removed"][:20]]
    fd = d["first_divergence"]
    if fd == "unavailable":
        lines.append("event streams: unavailable for at least one side")
    elif fd is None:
        lines.append("event streams: no divergence")
    else:
        lines.append(f"event streams first diverge at event {fd['index']}: A {fd['a']} | B {fd['b']}")
    return "\n".join(lines)
