"""The one failure record of a failed target (``TargetFailure``), whatever found it (pure;
``docs/failures.md`` "One failure record").

A failed target's text had two homes: ``BuildSession.failures`` (what ``buildtel run`` found in
the console) and ``TargetMetrics.error`` (what an importer read in the tool's output).  New
sessions keep it in ``failures`` only, each record with its signature and class: the collector
(live builds) and ``buildtel import`` call :func:`unify` before a session is stored.  Readers
call :func:`records`, which gives the same records for a session stored by an older version
(its ``error`` texts converted, unclassified records classified with the reader's rules), so old
sessions still show.
"""

from __future__ import annotations

from typing import Any

import msgspec

from buildtel.shared.failclass import Evidence, Rule, classify
from buildtel.shared.failsig import error_lines, quoted_only, signature
from buildtel.shared.protocol import BuildSession, TargetFailure, TargetMetrics

MAX_RECORDS = 500  # failure records stored per session (readers make the rest's on read)
NO_OUTPUT = "no output kept for it (captured by another tool, or not captured)"
IMPORTED = "its error text, as the importer found it in the tool's output"


def is_bazel(s: BuildSession) -> bool:
    """Whether the build's exit code is Bazel's (documented codes: failclass ``bazel-exit``)."""
    tools = s.environment.tool_versions if s.environment is not None else {}
    return s.labels.get("importer") == "bep" or "bazel" in tools


def from_error(m: TargetMetrics) -> TargetFailure:
    """The record of an imported target's error text (``TargetMetrics.error``)."""
    lines = (m.error or "").splitlines()
    errors = error_lines(lines)
    # The tool's own words first: not ninja's "FAILED: <outputs>" header, not an echoed message.
    own = sorted((e for e in errors if not e.startswith("FAILED: ")), key=quoted_only)
    first = own[0] if own else errors[0] if errors else next((x for x in lines if x.strip()), None)
    return TargetFailure(target=m.name, note=IMPORTED, output=lines, errors=errors, exit_code=m.exit_code,
                         signature=signature(first) if first else None, source="import")


def classified(f: TargetFailure, m: TargetMetrics | None, build_exit: int | None,
               rules: tuple[Rule, ...]) -> TargetFailure:
    """``f`` with its class (kept when it has one) and exit code."""
    code = f.exit_code if f.exit_code is not None else (m.exit_code if m is not None else None)
    if f.failure_class is not None:
        return f if code == f.exit_code else msgspec.structs.replace(f, exit_code=code)
    ev = Evidence(text="\n".join([*f.errors, *f.output]), exit_code=code, tool_code=f.tool_code,
                  build_exit_code=build_exit)
    cls, rule = classify(ev, rules)
    return msgspec.structs.replace(f, failure_class=cls, class_rule=rule, exit_code=code)


def records(s: BuildSession, rules: tuple[Rule, ...] = (), *, limit: int | None = None) -> list[TargetFailure]:
    """One classified record per failed target of ``s`` (targets order), then records of targets
    not among them; at most ``limit``."""
    kept = {f.target: f for f in s.failures}
    build_exit = s.exit_code if is_bazel(s) else None
    out: list[TargetFailure] = []
    done: set[str] = set()
    for m in s.targets:
        if m.status != "failed" or m.name in done:
            continue
        done.add(m.name)
        f = kept.get(m.name)
        if f is None:
            f = from_error(m) if m.error else TargetFailure(target=m.name, attributed=False, note=NO_OUTPUT)
        out.append(classified(f, m, build_exit, rules))
        if limit is not None and len(out) >= limit:
            return out
    for f in s.failures:
        if f.target not in done:
            done.add(f.target)
            out.append(classified(f, None, build_exit, rules))
    return out[:limit] if limit is not None else out


def unify(s: BuildSession, rules: tuple[Rule, ...] = ()) -> BuildSession:
    """``s`` as stored from now on: every failed target's record in ``failures`` (at most
    ``MAX_RECORDS``), classified, and no text left in ``TargetMetrics.error``."""
    if not any(m.status == "failed" or m.error for m in s.targets) and not s.failures:
        return s
    recs = records(s, rules, limit=MAX_RECORDS)
    moved = {f.target for f in recs if f.source == "import"}
    targets = [msgspec.structs.replace(m, error=None) if m.error and m.name in moved else m for m in s.targets]
    return msgspec.structs.replace(s, failures=recs, targets=targets)


def failed_targets(s: BuildSession, rules: tuple[Rule, ...] = ()) -> list[dict[str, Any]]:
    """Every failed target of ``s`` with its record: what ``buildtel show --failures`` and the
    dashboard's session page show."""
    by_name = {m.name: m for m in s.targets}
    rows: list[dict[str, Any]] = []
    for f in records(s, rules):
        m = by_name.get(f.target)
        rows.append({"target": f.target, "exit_code": f.exit_code, "duration_s": m.duration_s if m else 0.0,
                     "attributed": f.attributed, "note": f.note, "errors": f.errors, "signature": f.signature,
                     "failure_class": f.failure_class, "class_rule": f.class_rule, "tool_code": f.tool_code,
                     "source": f.source, "output": f.output, "output_cut_bytes": f.output_cut_bytes,
                     "kept_with": f.kept_with})
    return rows
