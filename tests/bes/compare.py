"""The whole-session comparison of a live (BES) and an imported (``buildtel import bep``) build of
the same BEP stream: everything but what docs/bazel.md says differs by design — the labels naming
the path (``ingest``/``importer``/``source``), and of an abandoned session (no ``buildFinished``,
so no live ``BuildFinished``) its finish, which live is when the endpoint last heard of the build,
and what only the end carries live: failure records' output and end-of-build labels."""

from __future__ import annotations

from typing import Any

import pytest

from buildtel.shared.protocol import BuildSession, is_complete

PATH_LABELS = frozenset({"ingest", "importer", "source"})


def target_view(s: BuildSession) -> list[tuple[object, ...]]:
    return sorted((t.name, t.status, round(t.start, 3), round(t.duration_s, 3), t.cache, t.worker, t.exit_code,
                   t.kind, t.mnemonic, t.attempts, tuple((p.name, p.duration_s) for p in t.phases), t.error)
                  for t in s.targets)


def session_view(s: BuildSession) -> dict[str, Any]:
    env = s.environment
    return {
        "id": s.id, "name": s.name, "command": s.command, "outcome": s.outcome, "exit_code": s.exit_code,
        "complete": is_complete(s),
        "environment": None if env is None else (env.cwd, env.hostname, env.user, env.tool_versions, env.vcs),
        "targets": target_view(s),
        "totals": (s.totals.targets, s.totals.succeeded, s.totals.failed, s.totals.skipped, s.totals.cancelled),
        "cpu_s": s.cpu_s, "cache": (s.cache_hits, s.cache_misses),
        "labels": {k: v for k, v in s.labels.items() if k not in PATH_LABELS},
        "tests": s.tests, "tests_dropped": s.tests_dropped,
        "failures": sorted(s.failures, key=lambda f: f.target),
    }


def same_as_import(live: BuildSession, imported: BuildSession) -> None:
    """``live`` is the session ``imported`` is, field by field (a failing field is named)."""
    a, b = session_view(live), session_view(imported)
    if imported.outcome == "abandoned":
        assert a.pop("labels").items() <= b.pop("labels").items()
        # live the collector's records of failed targets (no output): the import names the same targets
        assert {f.target for f in a.pop("failures")} <= {f.target for f in b.pop("failures")}
    for key in a:
        assert a[key] == b[key], key
    assert live.labels.get("ingest") == "bes" and imported.labels.get("importer") == "bep"
    assert live.start == pytest.approx(imported.start, abs=1e-3)
    if imported.outcome != "abandoned":
        assert (live.finish, live.duration_s) == pytest.approx((imported.finish, imported.duration_s), abs=1e-3)
