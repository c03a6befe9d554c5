"""Why an alert fired: what it carries beside the change itself (docs/analytics.md "Explanations").

An alert names two builds of its series: the last good one and the first bad one.  From those two
stored sessions (and, for a build judged host-slowed, the factor it was judged at) this module
works out, purely (no I/O; the service fetches the sessions):

* the **culprits**: targets that took longer in the bad build, each with its share of the added
  target time (the sum of every slower target's increase), largest first;
* the **critical-path shift**: the chain of targets that bounded each build's wall time
  (``bottlenecks.critical_path``), and which targets entered or left it;
* **what else changed**: the commit range, or "no code change between these builds" when both ran
  at the same commit, plus the environment variables, tool versions, working directory and
  command that differ (``shared/recording/diff``: the same comparison ``buildtel diff`` makes);
  and, when both builds were recorded (``buildtel run --record``), the input files that changed
  between their recordings (the recorder's ``diff``, fetched by ``explainer.py``: :func:`input_differences`).

What could not be worked out is said in ``notes`` (a session storage no longer holds, no
environment captured), never left blank without a word.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from buildtel.services.analyzer.bottlenecks import critical_path
from buildtel.shared.protocol import CACHE_HITS, BuildSession
from buildtel.shared.recording.diff import diff, side_from_session
from buildtel.shared.recording.diffview import BuildDiff, FilesDiff

NO_CODE_CHANGE = "no code change between these builds"
MAX_CULPRITS = 5  # culprits named at most (the largest increases)
MIN_CULPRIT_SHARE = 0.05  # a target adding less than 5 % of the added time explains nothing
MIN_CULPRIT_S = 0.1  # nor one adding less than this: run-to-run noise of any target
MAX_DIFFERENCES = 20  # environment differences named at most (the rest are counted); input files likewise
SUMMARY_INPUTS = 3  # input files the summary line names


class Culprit(msgspec.Struct, kw_only=True):
    target: str
    before_s: float  # its duration in the last good build
    after_s: float  # and in the first bad one
    # after_s - before_s, less what the load is expected to have added (before_s x (f_bad / f_good - 1),
    # when a build was judged host-slowed: docs/analytics.md "Host slowdowns")
    added_s: float
    share: float  # of the added target time: added_s / the sum of every slower target's added_s (0..1)
    on_critical_path: bool = False  # on the bad build's critical path


class PathShift(msgspec.Struct, kw_only=True):
    before_s: float  # sum of durations on the last good build's critical path
    after_s: float  # on the first bad one's
    moved: bool  # a target entered or left the path
    entered: list[str] = []  # on the bad build's path, not on the good one's
    left: list[str] = []  # on the good build's path, not on the bad one's
    basis: str = ""  # "dependencies" or "lane order" (bottlenecks.CriticalPath.basis)


class Difference(msgspec.Struct, kw_only=True):
    """One change besides the code.  For ``input`` (a file under the build's directory, ``key`` its
    path relative to it) and ``external_input`` (a file outside it, ``key`` as recorded): ``before``
    is ``"read"`` when the last good build read the file, null when it did not; ``after`` is
    ``"changed"`` (both read it, its content differs), ``"read"`` (only the first bad build read it:
    added) or null (only the last good one did: removed)."""

    what: Literal["env", "tool", "cwd", "command", "vcs", "input", "external_input"]
    key: str  # variable or tool name, file path; "" for cwd and command
    before: str | None  # None: not set / not known / not read in the last good build
    after: str | None


class HostSlowdown(msgspec.Struct, kw_only=True):
    """The evidence of a ``host`` event: most targets of one build slowed down together."""

    factor: float  # median over the judged targets of duration / their baseline
    slower_share: float  # share of the judged targets at least SLOWER (1.2) times their baseline
    judged: int  # targets with a baseline (executed, baseline at least MIN_BASE_S)
    cpu_ratio: float | None = None  # median CPU time / its baseline, where the capture has CPU time
    workers: int = 0  # parallel slots of the build (health); 0 when unknown
    cpus: int = 0  # logical CPUs of the machine (environment); 0 when unknown
    build_s: float = 0.0  # the build's wall time


class Explanation(msgspec.Struct, kw_only=True):
    summary: str  # one line for people: culprits, critical-path shift, code change or not
    code_change: bool | None  # False: both builds at the same commit; None: a commit is unknown
    added_s: float = 0.0  # wall time of the first bad build minus the last good's
    culprits: list[Culprit] = []
    critical_path: PathShift | None = None
    differences: list[Difference] = []  # environment / tool-version / directory / command changes
    differences_more: int = 0  # differences past MAX_DIFFERENCES, not listed
    host_factor_before: float = 1.0  # build-wide load factor the last good build was judged at (1: none)
    host_factor_after: float = 1.0  # the first bad build's
    host_slowdown: HostSlowdown | None = None  # host events only
    notes: list[str] = []  # what could not be worked out, and why


def _commit(s: BuildSession) -> str | None:
    env = s.environment
    return env.vcs.commit if env is not None and env.vcs is not None else None


def _durations(s: BuildSession) -> dict[str, float]:
    # Executed runs only: a cache hit against a miss is a change of the cache, not of the target.
    out: dict[str, float] = {}
    for t in s.targets:
        if t.status == "success" and t.cache not in CACHE_HITS and t.name not in out:
            out[t.name] = t.duration_s
    return out


def culprits(good: BuildSession, bad: BuildSession, f_good: float = 1.0, f_bad: float = 1.0,
             path: set[str] | None = None) -> list[Culprit]:
    a, b = _durations(good), _durations(bad)
    load = f_bad / f_good if f_good > 0 else 1.0  # what the machine alone is expected to have done
    added = {n: b[n] - a[n] * load for n in a.keys() & b.keys() if b[n] > a[n] * load}
    total = sum(added.values())
    if total <= 0:
        return []
    out = [Culprit(target=n, before_s=a[n], after_s=b[n], added_s=d, share=d / total,
                   on_critical_path=n in (path or ()))
           for n, d in added.items() if d / total >= MIN_CULPRIT_SHARE and d >= MIN_CULPRIT_S]
    out.sort(key=lambda c: (-c.added_s, c.target))
    return out[:MAX_CULPRITS]


def path_shift(good: BuildSession, bad: BuildSession) -> tuple[PathShift, set[str]]:
    """How the critical path changed, and the targets on the bad build's path."""
    pa, pb = critical_path(good), critical_path(bad)
    na, nb = [s.name for s in pa.steps], [s.name for s in pb.steps]
    entered = [n for n in nb if n not in set(na)]
    left = [n for n in na if n not in set(nb)]
    return PathShift(before_s=pa.path_s, after_s=pb.path_s, moved=bool(entered or left), entered=entered,
                     left=left, basis=pb.basis), set(nb)


def differences(good: BuildSession, bad: BuildSession) -> tuple[list[Difference], list[str]]:
    notes: list[str] = []
    if good.environment is None or bad.environment is None:
        notes.append("no environment was captured for "
                     + ("either build" if good.environment is None and bad.environment is None
                        else "the last good build" if good.environment is None else "the first bad build")
                     + ": environment and tool-version changes are unknown")
    d = diff(side_from_session(good), side_from_session(bad))
    out: list[Difference] = []
    for what, key in (("env", "env"), ("tool", "tool_versions")):
        m = d[key]
        out += [Difference(what=what, key=k, before=None, after=v) for k, v in m["added"].items()]  # type: ignore[arg-type]
        out += [Difference(what=what, key=k, before=v, after=None) for k, v in m["removed"].items()]  # type: ignore[arg-type]
        out += [Difference(what=what, key=k, before=x, after=y) for k, (x, y) in m["changed"].items()]  # type: ignore[arg-type]
    if d["cwd"]:
        out.append(Difference(what="cwd", key="", before=d["cwd"]["a"], after=d["cwd"]["b"]))
    if d["command"]:
        out.append(Difference(what="command", key="", before=" ".join(d["command"]["a"]),
                              after=" ".join(d["command"]["b"])))
    va = good.environment.vcs if good.environment else None
    vb = bad.environment.vcs if bad.environment else None
    if va is not None and vb is not None and va.dirty != vb.dirty:
        out.append(Difference(what="vcs", key="dirty", before=str(va.dirty).lower(), after=str(vb.dirty).lower()))
    for k, why in d["tool_versions"].get("unknown", {}).items():
        notes.append(f"tool version {k}: {why}")
    return out, notes


def _files(what: Literal["input", "external_input"], f: FilesDiff) -> list[Difference]:
    return ([Difference(what=what, key=p, before="read", after="changed") for p in f.changed]
            + [Difference(what=what, key=p, before=None, after="read") for p in f.added]
            + [Difference(what=what, key=p, before="read", after=None) for p in f.removed])


def input_differences(d: BuildDiff) -> tuple[list[Difference] | None, list[str]]:
    """The input files that changed between two recordings (the recorder's diff of the last good
    build's recording and the first bad one's): in the tree first, then outside it; None (with a
    note) when a recording holds no file capture."""
    if d.inputs is None:
        return None, ["input files not compared: a build's recording kept its events only, not its files "
                      "(files are recorded by `buildtel run --record`)"]
    out = _files("input", d.inputs)
    if d.external_inputs is not None:
        out += _files("external_input", d.external_inputs)
    return out, []


def _unrecorded_note(good: BuildSession, bad: BuildSession, code_change: bool | None) -> list[str]:
    """Why input files were not compared, when the builds were not both recorded: said when one of
    them was, or when no code change explains the alert (else every alert would carry it)."""
    if good.record and bad.record:
        return []  # the fetcher said why it has no comparison
    if not (good.record or bad.record) and code_change is True:
        return []
    which = ("neither build was" if not (good.record or bad.record)
             else "the last good build was not" if not good.record else "the first bad build was not")
    return [f"input files not compared: {which} recorded (buildtel run --record)"]


def explain(good: BuildSession | None, bad: BuildSession | None, *, f_good: float = 1.0, f_bad: float = 1.0,
            host: HostSlowdown | None = None, notes: list[str] | None = None,
            inputs: list[Difference] | None = None) -> Explanation:
    """The explanation of a change between ``good`` (the last good build) and ``bad`` (the first
    bad one); either may be None (not stored any more, or no build before the change).  ``inputs``:
    the input files that changed between their recordings (:func:`input_differences`); None when
    not compared (why is in ``notes``, or said here when a build was not recorded)."""
    notes = list(notes or [])
    if good is None or bad is None:
        if bad is not None and good is None and not notes:
            notes.append("no build before the change to compare with")
        return Explanation(summary=notes[0] if notes else "", code_change=None, host_slowdown=host, notes=notes,
                           host_factor_before=f_good, host_factor_after=f_bad)
    ca, cb = _commit(good), _commit(bad)
    code_change = None if ca is None or cb is None else ca != cb
    shift, path = path_shift(good, bad)
    # A host event is the machine, not a target: its builds' target differences are load, not culprits.
    found = culprits(good, bad, f_good, f_bad, path) if host is None else []
    diffs, more_notes = differences(good, bad)
    notes += more_notes
    if inputs is None:
        notes += _unrecorded_note(good, bad, code_change)
    parts: list[str] = []
    if host is not None:
        parts.append(f"most targets slowed down together (x{host.factor:.2f}, "
                     f"{host.slower_share:.0%} of {host.judged} targets)")
    if found:
        parts.append("culprits: " + ", ".join(f"{c.target} +{c.added_s:.2f}s ({c.share:.0%})" for c in found))
    if shift.moved:
        parts.append("critical path moved" + (f": +{', '.join(shift.entered)}" if shift.entered else "")
                     + (f" -{', '.join(shift.left)}" if shift.left else ""))
    if code_change is False:
        parts.append(NO_CODE_CHANGE)
    elif code_change is None:
        parts.append("commit unknown for " + ("the last good build" if ca is None else "the first bad build"))
    if code_change is not True and inputs is not None:
        more = len(inputs) - SUMMARY_INPUTS
        parts.append(("inputs changed: " + ", ".join(_input_short(x) for x in inputs[:SUMMARY_INPUTS])
                      + (f" and {more} more" if more > 0 else "")) if inputs else "recorded inputs unchanged")
    if diffs and code_change is not True:
        parts.append("changed: " + ", ".join(_short(x) for x in diffs[:3]) + (" …" if len(diffs) > 3 else ""))
    listed = inputs or []
    # Each kind capped on its own: a commit touching hundreds of files must not hide a changed compiler.
    return Explanation(summary="; ".join(parts), code_change=code_change, added_s=bad.duration_s - good.duration_s,
                       culprits=found, critical_path=shift,
                       differences=diffs[:MAX_DIFFERENCES] + listed[:MAX_DIFFERENCES],
                       differences_more=max(0, len(diffs) - MAX_DIFFERENCES) + max(0, len(listed) - MAX_DIFFERENCES),
                       host_factor_before=f_good, host_factor_after=f_bad, host_slowdown=host, notes=notes)


def _input_short(d: Difference) -> str:
    change = "" if d.after == "changed" else " (added)" if d.before is None else " (removed)"
    return d.key + change


def _short(d: Difference) -> str:
    if d.what in ("cwd", "command"):
        return d.what
    if d.what in ("input", "external_input"):
        how = "changed" if d.after == "changed" else "added" if d.before is None else "removed"
        return f"input{' outside the tree' if d.what == 'external_input' else ''} {d.key}: {how}"
    return f"{'tool ' if d.what == 'tool' else ''}{d.key}: {d.before or '(unset)'} -> {d.after or '(unset)'}"


def lines(e: Explanation) -> list[str]:
    """The explanation for people, a few lines (``buildtel alerts``, Slack)."""
    out: list[str] = []
    if e.host_slowdown is not None:
        h = e.host_slowdown
        cpu = f", CPU time x{h.cpu_ratio:.2f}" if h.cpu_ratio is not None else ", CPU time not captured"
        mach = f", {h.workers} workers on {h.cpus} CPUs" if h.workers and h.cpus else ""
        out.append(f"host slowdown: targets x{h.factor:.2f} their baseline ({h.slower_share:.0%} of {h.judged} "
                   f"slower{cpu}{mach})")
    for c in e.culprits:
        out.append(f"culprit {c.target}: {c.before_s:.2f}s -> {c.after_s:.2f}s (+{c.added_s:.2f}s, "
                   f"{c.share:.0%} of the added time){' on the critical path' if c.on_critical_path else ''}")
    if e.critical_path is not None:
        p = e.critical_path
        if p.moved:
            out.append(f"critical path moved ({p.before_s:.2f}s -> {p.after_s:.2f}s)"
                       + (f"; entered: {', '.join(p.entered)}" if p.entered else "")
                       + (f"; left: {', '.join(p.left)}" if p.left else ""))
        else:
            out.append(f"critical path unchanged ({p.before_s:.2f}s -> {p.after_s:.2f}s)")
    if e.code_change is False:
        out.append(NO_CODE_CHANGE)
    for d in e.differences:
        out.append("  " + _short(d) if d.what not in ("cwd", "command") else
                   f"  {d.what}: {d.before} -> {d.after}")
    if e.differences_more:
        out.append(f"  and {e.differences_more} more differences")
    if e.host_factor_before != 1.0 or e.host_factor_after != 1.0:
        out.append(f"added time net of the machine's load (build-wide factor: last good x{e.host_factor_before:.2f}, "
                   f"first bad x{e.host_factor_after:.2f})")
    out += [f"note: {n}" for n in e.notes]
    return out
