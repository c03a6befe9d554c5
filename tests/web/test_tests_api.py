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


async def test_a_targets_tests_are_its_own_runs_in_the_builds_that_built_it(api: Api, nc: Any,
                                                                           settings: Any) -> None:
    def attributed(i: int, outcome: str, target: str, prefix: str = "//pkg:t") -> Any:
        s = _with_tests(i, "d" * 40, outcome)
        s = msgspec.structs.replace(s, targets=build_session(i, target_prefix=prefix).targets)
        # steady ran outside any target (a report no target wrote); wobbly ran in `target`
        return msgspec.structs.replace(s, tests=[s.tests[0], msgspec.structs.replace(s.tests[1], target=target)])

    sessions = [attributed(0, "passed", "//pkg:t0"), attributed(1, "failed", "//pkg:t0"),
                attributed(2, "passed", "//other:t0", prefix="//other:t")]
    await publish(nc, settings, sessions)
    await stored(nc, settings, 3)

    status, _, body = await api.get("/api/v1/tests", target="//pkg:t0")
    assert status == 200, body
    api.check(body, "TestsReply")
    assert body["sessions_read"] == 2  # the builds that built //pkg:t0, not the third
    [wobbly] = body["tests"]
    assert (wobbly["test"], wobbly["runs"], wobbly["passed"], wobbly["failed"]) == ("pkg.T::wobbly", 2, 1, 1)
    assert wobbly["flaky"] and wobbly["flake_rate"] == 0.5 and wobbly["flaky_sessions"] == [sessions[1].id]

    status, _, body = await api.get("/api/v1/tests", target="//other:t0")
    assert [(t["test"], t["runs"], t["flaky"]) for t in body["tests"]] == [("pkg.T::wobbly", 1, False)]
    status, _, body = await api.get("/api/v1/tests", target="//pkg:t2")  # built, but ran no test
    assert (status, body["sessions_read"], body["tests"]) == (200, 2, [])
    status, _, body = await api.get("/api/v1/tests")  # no target: every run, attributed or not
    assert {t["test"]: t["runs"] for t in body["tests"]} == {"pkg.T::wobbly": 3, "pkg.T::steady": 3}

    status, ctype, body = await api.get("/api/v1/tests", target="")
    api.check_problem(status, ctype, body, 400)
    params = {p["name"] for p in api.doc["paths"]["/api/v1/tests"]["get"]["parameters"]}
    assert "target" in params
