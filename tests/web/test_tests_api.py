"""``GET /api/v1/tests`` and ``/api/v1/tests/history`` over stored sessions with test results,
checked against the served OpenAPI document."""

from __future__ import annotations

from typing import Any

import msgspec

from buildtel.shared.protocol import TestCase as Case
from buildtel.shared.protocol import VcsInfo
from tests.storage.conftest import build_session
from tests.web.conftest import Api, publish, stored


def _with_tests(i: int, commit: str, outcome: str) -> Any:
    s = build_session(i)
    assert s.environment is not None
    env = msgspec.structs.replace(s.environment, vcs=VcsInfo(commit=commit, branch="main"))
    cases = [Case(suite="pkg.T", name="steady", duration_s=0.5),
             Case(suite="pkg.T", name="wobbly", duration_s=2.0, outcome=outcome,  # type: ignore[arg-type]
                  message="" if outcome == "passed" else "assert False")]
    return msgspec.structs.replace(s, environment=env, tests=cases)


async def test_flaky_tests_and_one_tests_history(api: Api, nc: Any, settings: Any) -> None:
    sessions = [_with_tests(0, "a" * 40, "passed"), _with_tests(1, "a" * 40, "failed"),
                _with_tests(2, "b" * 40, "failed"), _with_tests(3, "c" * 40, "passed")]
    await publish(nc, settings, sessions)
    await stored(nc, settings, 4)

    status, _, body = await api.get("/api/v1/tests", flaky="true")
    assert status == 200, body
    api.check(body, "TestsReply")
    [wobbly] = body["tests"]
    assert wobbly["test"] == "pkg.T::wobbly" and wobbly["flaky_commits"] == 1
    assert wobbly["flake_rate"] == 0.25  # one failure of four runs shared its commit with a pass
    assert wobbly["flaky_sessions"] == [sessions[1].id]

    status, _, body = await api.get("/api/v1/tests", sort="slowest")
    assert [t["test"] for t in body["tests"]] == ["pkg.T::wobbly", "pkg.T::steady"]

    status, _, body = await api.get("/api/v1/tests/history", name="pkg.T::wobbly")
    assert status == 200
    api.check(body, "TestHistoryReply")
    assert [r["session_id"] for r in body["runs"]] == [s.id for s in reversed(sessions)]
    assert body["runs"][1]["message"] == "assert False"

    status, ctype, body = await api.get("/api/v1/tests", sort="fastest")
    api.check_problem(status, ctype, body, 400)
    status, ctype, body = await api.get("/api/v1/tests/history")
    api.check_problem(status, ctype, body, 400)
