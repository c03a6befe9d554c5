"""``buildtel diff``: a tool version a side did not get (its probe timed out, or there is no
environment at all) is "unknown" with the reason, never reported as removed or added."""

from __future__ import annotations

from buildtel.shared.protocol import BuildEnvironment, BuildSession
from buildtel.shared.recording.diff import diff, render, side_from_session

TOOLS = {"gcc": "gcc 13.2", "make": "GNU Make 4.3", "cmake": "cmake 3.28"}


def _session(sid: str, env: BuildEnvironment | None) -> BuildSession:
    return BuildSession(id=sid * 32, environment=env)


def test_a_tool_not_probed_is_unknown_not_removed() -> None:
    a = _session("a", BuildEnvironment(tool_versions=TOOLS))
    b = _session("b", BuildEnvironment(tool_versions={"make": "GNU Make 4.4"}, missing_probes={
        "tool_versions.gcc": "not finished 2 s after the command exited"}))
    d = diff(side_from_session(a), side_from_session(b))["tool_versions"]
    assert d["removed"] == {"cmake": "cmake 3.28"}  # probed and not found: really gone
    assert d["changed"] == {"make": ["GNU Make 4.3", "GNU Make 4.4"]}
    assert d["unknown"] == {"gcc": "not probed in B: not finished 2 s after the command exited"}
    text = render(diff(side_from_session(a), side_from_session(b)))
    assert "  - gcc" not in text and "  ? gcc: not probed in B: not finished 2 s after the command exited" in text
    assert "  - cmake=cmake 3.28" in text


def test_a_side_without_environment_knows_no_tools_in_either_direction() -> None:
    a = _session("a", None)  # e.g. an old session whose BuildStarted went out before the probes
    b = _session("b", BuildEnvironment(tool_versions=TOOLS))
    d = diff(side_from_session(a), side_from_session(b))["tool_versions"]
    assert d["added"] == {} and d["removed"] == {}
    assert d["unknown"] == {t: "not probed in A: no environment recorded" for t in sorted(TOOLS)}
