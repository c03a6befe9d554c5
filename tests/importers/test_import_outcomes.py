"""Honest outcomes of imports: real ninja builds (a compile error, a SIGINT mid-build, a success)
imported with and without their console output and exit code; Bazel BEP streams derived from a
real one (failed, interrupted, aborted, cut before ``buildFinished``); traces with and without an
exit code; and the console-output parser under Hypothesis."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from buildtel.shared.failrecord import records
from buildtel.shared.importers import ImportFormatError, parse_bep, parse_chrome_trace, parse_ninja_log
from buildtel.shared.importers.ninja_output import ninja_outcome, parse_ninja_output
from tests.capture.project import ninja_binaries
from tests.importers.importer_samples import BEP, TRACE
from tests.importers.ninja_runs import GOOD, NinjaRun, project, run

KAHLYS = BEP / "kahlys-battools_bazel7.1.2_test_build_events.json"
NINJAS = ninja_binaries()  # the test extra's ninja (1.13) and a distribution's where there is one


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NinjaRun]:
    root = tmp_path_factory.mktemp("ninja-runs")
    return {"ok": run(project(root / "ok")), "failed": run(project(root / "failed", bad=True)),
            "interrupted": run(project(root / "interrupted", slow=True), interrupt=True),
            **{f"killed-{v}": run(project(root / f"killed-{v}", killed=True), ninja=path)
               for v, path in NINJAS.items()}}


def _import(r: NinjaRun, *, output: bool = True, code: bool = True):  # type: ignore[no-untyped-def]
    result = parse_ninja_log(r.log.read_bytes(), output=r.output.read_bytes() if output else None,
                             exit_code=r.exit_code if code else None)
    (session,) = result.sessions
    return session, result.warnings


def _statuses(session) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {t.name: t.status for t in session.targets}


def test_a_compile_error_is_a_failed_build_with_the_failed_edge_and_its_error(runs: dict[str, NinjaRun]) -> None:
    r = runs["failed"]
    text = r.output.read_text()
    assert r.exit_code == 1 and "FAILED: " in text and "ninja: build stopped: subcommand failed." in text
    # What ninja printed for the edge, cut independently of the parser: from the line after
    # FAILED: up to ninja's last line.
    expected_error = text.split("FAILED: ", 1)[1].split("\n", 1)[1].split("ninja: build stopped")[0].strip()
    assert "src/bad.c" in expected_error and "error" in expected_error

    session, warnings = _import(r)
    assert (session.outcome, session.exit_code, warnings) == ("failed", 1, [])
    good = {f"obj/u{i}.o": "success" for i in range(GOOD)}
    assert _statuses(session) == {**good, "obj/bad.o": "failed"}
    (bad,) = [t for t in session.targets if t.status == "failed"]
    assert bad.error is None and bad.duration_s == 0.0  # its text is in its failure record (one home)
    (rec,) = session.failures
    assert (rec.target, rec.source, "\n".join(rec.output)) == ("obj/bad.o", "import", expected_error)
    assert rec.signature and "bad.c" in rec.signature
    assert bad.exit_code == (1 if "[code=1]" in text else None)  # ninja >= 1.13 prints the code
    assert session.labels["ninja_stopped"] == "subcommand failed"
    assert session.labels["outcome_evidence"] == "exit code 1 + ninja output"
    assert session.totals.failed == 1 and session.totals.succeeded == GOOD

    alone, _ = _import(r, output=False)  # the exit code alone: failed, but nothing names the edge
    assert (alone.outcome, _statuses(alone)) == ("failed", good)
    out_only, _ = _import(r, code=False)
    assert (out_only.outcome, out_only.exit_code, _statuses(out_only)["obj/bad.o"]) == ("failed", None, "failed")


def test_an_interrupted_build_is_cancelled(runs: dict[str, NinjaRun]) -> None:
    r = runs["interrupted"]
    assert r.exit_code == 130 and "ninja: build stopped: interrupted by user." in r.output.read_text()
    good = {f"obj/u{i}.o": "success" for i in range(GOOD)}
    for output, code in ((True, True), (True, False), (False, True)):
        session, warnings = _import(r, output=output, code=code)
        assert (session.outcome, _statuses(session), warnings) == ("cancelled", good, []), (output, code)
        assert session.exit_code == (130 if code else None)
    assert _import(r, code=False)[0].labels["ninja_stopped"] == "interrupted by user"
    assert _import(r, output=False)[0].labels["outcome_evidence"] == "exit code 130 (SIGINT)"


@pytest.mark.parametrize("version", NINJAS)
def test_an_edge_killed_by_sigkill_is_a_failed_build_not_a_cancelled_one(runs: dict[str, NinjaRun],
                                                                          version: str) -> None:
    """ninja >= 1.13 exits with the failed edge's own code: 137 for a SIGKILLed edge (the OOM
    killer's way), with "build stopped: subcommand failed."; older ninjas exit 1.  Either way the
    build failed: nobody interrupted ninja."""
    r = runs[f"killed-{version}"]
    text = r.output.read_text()
    coded = tuple(int(x) for x in version.split(".")[:2]) >= (1, 13)
    assert ("FAILED: [code=137] killed.stamp" in text) == coded, text
    assert r.exit_code == (137 if coded else 1), text
    assert "ninja: build stopped: subcommand failed." in text
    for output, code in ((True, True), (True, False), (False, True)):
        session, warnings = _import(r, output=output, code=code)
        assert (session.outcome, warnings) == ("failed", []), (output, code)
    session, _ = _import(r)
    (rec,) = records(session)  # classified as `buildtel import` stores it (failrecord.unify)
    # With ninja's code the record is infra (rule signal); without it nothing says how the edge died.
    assert (rec.target, rec.exit_code, rec.source) == ("killed.stamp", 137 if coded else None, "import")
    assert (rec.failure_class, rec.class_rule) == (("infra", "signal") if coded else ("unknown", ""))


@pytest.mark.parametrize("code, outcome", [(0, "success"), (1, "failed"), (2, "failed"), (137, "failed"),
                                           (139, "failed"), (-9, "failed"), (129, "cancelled"),
                                           (130, "cancelled"), (143, "cancelled"), (-2, "cancelled"),
                                           (-15, "cancelled")])
def test_ninja_exit_code_alone(code: int, outcome: str) -> None:
    """Only SIGHUP/SIGINT/SIGTERM to ninja itself cancel a build; 137 is an edge's SIGKILL (ninja 1.13)."""
    assert ninja_outcome(None, code)[0] == outcome


@pytest.mark.parametrize("stop, code, outcome", [("subcommand failed", 130, "failed"),
                                                 ("subcommand failed", 137, "failed"),
                                                 ("subcommand failed", None, "failed"),
                                                 ("interrupted by user", 1, "cancelled"),
                                                 ("interrupted by user", 137, "cancelled"),
                                                 ("interrupted by user", None, "cancelled")])
def test_what_ninja_said_decides_over_its_exit_code(stop: str, code: int | None, outcome: str) -> None:
    out = parse_ninja_output(f"[1/2] CC a.o\nninja: build stopped: {stop}.\n".encode())
    assert ninja_outcome(out, code)[0] == outcome


def test_a_successful_build_needs_evidence_to_be_a_success(runs: dict[str, NinjaRun]) -> None:
    r = runs["ok"]
    assert r.exit_code == 0
    for output, code in ((True, True), (True, False), (False, True)):
        session, warnings = _import(r, output=output, code=code)
        assert (session.outcome, warnings) == ("success", []), (output, code)
    for name, r in runs.items():  # the log alone says nothing of how the build ended
        session, warnings = _import(r, output=False, code=False)
        assert (session.outcome, session.exit_code, warnings) == ("unknown", None, []), name
        assert session.labels["outcome_evidence"] == "none"
        assert session.id != _import(r)[0].id  # the evidence is part of the id: never "already stored"


def test_evidence_that_cannot_be_the_logs_last_build_is_refused(runs: dict[str, NinjaRun]) -> None:
    first_edge_failed = b"[1/3] CC obj/bad.o\nFAILED: obj/bad.o \ncc -c src/bad.c\nerror\nninja: build stopped: " \
                        b"subcommand failed.\n"
    with pytest.raises(ImportFormatError, match="no edge finished successfully"):
        parse_ninja_log(runs["ok"].log.read_bytes(), output=first_edge_failed, exit_code=1)
    with pytest.raises(ImportFormatError, match="no build to apply"):
        parse_ninja_log(b"# ninja log v7\n", exit_code=0)
    # Exit code 0 with failures in the output: the failures win, and the disagreement is said.
    session, warnings = _import(NinjaRun(runs["failed"].log, runs["failed"].output, 0))
    assert session.outcome == "failed" and "exit code 0 but the output shows failures" in warnings[0].message


def test_evidence_applies_to_the_last_build_of_an_appended_log() -> None:
    log = b"# ninja log v5\n0\t900\t0\ta.o\taa\n900\t1000\t0\tb.o\tbb\n0\t100\t0\ta.o\tcc\n"
    result = parse_ninja_log(log, exit_code=2, base_time=1000.0)
    assert [(s.outcome, s.exit_code, s.labels["outcome_evidence"]) for s in result.sessions] == \
        [("unknown", None, "none"), ("failed", 2, "exit code 2")]
    assert result.details["edges"] == 3 and result.details["failed_edges"] == 0


@pytest.mark.parametrize("code, outcome", [(None, "unknown"), (0, "success"), (2, "failed"), (130, "cancelled"),
                                           (143, "cancelled"), (129, "cancelled"), (-15, "cancelled"),
                                           (137, "failed"), (-9, "failed")])
def test_a_trace_has_an_outcome_only_with_an_exit_code(code: int | None, outcome: str) -> None:
    data = (TRACE / "clang-zlib-adler32.c.json").read_bytes()
    (session,) = parse_chrome_trace(data, exit_code=code).sessions
    assert (session.outcome, session.exit_code) == (outcome, code)
    if code is not None:
        assert session.id != parse_chrome_trace(data).sessions[0].id


# -- Bazel BEP: streams derived from a real Bazel 7.1.2 one -----------------------------------------

def _events() -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in KAHLYS.read_text().splitlines() if line.strip()]


def _stream(events: list[dict]) -> bytes:  # type: ignore[type-arg]
    return "".join(json.dumps(e) + "\n" for e in events).encode()


def _finished(events: list[dict], name: str, code: int) -> None:  # type: ignore[type-arg]
    (fin,) = [e for e in events if "buildFinished" in e["id"]]
    fin["finished"]["overallSuccess"] = False
    fin["finished"]["exitCode"] = {"name": name, "code": code}


def _completed(events: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    return [e for e in events if "targetCompleted" in e["id"] and "completed" in e]


def test_bep_failed_target_and_exit_code_make_a_failed_build() -> None:
    events = _events()
    assert parse_bep(_stream(events)).sessions[0].outcome == "success"
    broken = _completed(events)[0]
    broken["completed"] = {"success": False, "failureDetail": {
        "message": "Compiling basespy.go failed: (Exit 1): builder failed", "spawn": {"code": "NON_ZERO_EXIT"}}}
    _finished(events, "BUILD_FAILURE", 1)
    result = parse_bep(_stream(events))
    (session,) = result.sessions
    assert (session.outcome, session.exit_code, session.labels["exit_name"]) == ("failed", 1, "BUILD_FAILURE")
    (failed,) = [t for t in session.targets if t.kind != "test" and t.status == "failed"]
    assert failed.name == broken["id"]["targetCompleted"]["label"]
    (rec,) = session.failures  # one failure record, with Bazel's own failure code
    assert (rec.target, rec.output, rec.tool_code) == (
        failed.name, ["Compiling basespy.go failed: (Exit 1): builder failed"], "spawn.NON_ZERO_EXIT")
    assert failed.error is None


def test_bep_interrupted_build_is_cancelled_with_its_reason() -> None:
    events = _events()
    _finished(events, "INTERRUPTED", 8)
    last = _completed(events)[-1]
    del last["completed"]
    last["aborted"] = {"reason": "USER_INTERRUPTED", "description": "Build was interrupted"}
    (session,) = parse_bep(_stream(events)).sessions
    assert (session.outcome, session.exit_code) == ("cancelled", 8)
    assert "cancelled" in {t.status for t in session.targets}

    # Cut before buildFinished after the abort: still cancelled (the abort says why), with no exit code
    # (Bazel never said one); nothing is lost, so complete — as the BES endpoint stores it.
    cut = [e for e in events if "buildFinished" not in e["id"] and "buildMetrics" not in e["id"]
           and "buildToolLogs" not in e["id"]]
    result = parse_bep(_stream(cut))
    (session,) = result.sessions
    assert (session.outcome, session.exit_code) == ("cancelled", None)
    assert session.labels["aborted"] == "USER_INTERRUPTED Build was interrupted"
    assert session.completeness is None
    assert any("no buildFinished" in w.message and "USER_INTERRUPTED" in w.message for w in result.warnings)


def test_bep_cut_before_build_finished_is_abandoned_never_success() -> None:
    events = _events()
    cut = events[: next(i for i, e in enumerate(events) if "buildFinished" in e["id"])]
    assert all(e.get("completed", {}).get("success", True) for e in cut)  # every target succeeded…
    (session,) = parse_bep(_stream(cut)).sessions
    assert session.outcome == "abandoned" and session.exit_code is None  # …but nothing says the build did
    assert session.completeness is not None and not session.completeness.complete


# -- the console-output parser ------------------------------------------------------------------------

# No health check that times data generation: a loaded machine must not fail the test.
PROPERTY = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])

@settings(PROPERTY, max_examples=300)
@given(st.binary(max_size=2000) | st.text(max_size=400).map(str.encode))
@example(b"[" + b"9" * 5000 + b"/1] CC a.o\nFAILED: [code=" + b"7" * 5000 + b"] a.o\n\x1b[31m\r\xff")
def test_the_output_parser_never_raises(data: bytes) -> None:
    out = parse_ninja_output(data)
    assert ninja_outcome(out, None)[0] in ("success", "failed", "cancelled", "unknown")


_WORD = st.text("abcdefghijklmnopqrstuvwxyz0123456789_./-", min_size=1, max_size=12)
_LINE = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40).filter(
    lambda s: not re.match(r"\[\d+/\d+\]|FAILED: |ninja: ", s))


@settings(PROPERTY, max_examples=200)
@given(st.lists(st.tuples(st.lists(_WORD, min_size=1, max_size=3), st.none() | st.integers(-5, 300),
                          st.lists(_LINE, max_size=6)), max_size=5), st.integers(0, 3))
def test_failed_blocks_round_trip(blocks: list[tuple[list[str], int | None, list[str]]], ok_edges: int) -> None:
    total = ok_edges + len(blocks)
    text, n = [], 0
    for _ in range(ok_edges):
        n += 1
        text.append(f"[{n}/{total}] CC ok{n}.o")
    for outputs, code, lines in blocks:
        n += 1
        text += [f"[{n}/{total}] CC {outputs[0]}",
                 "FAILED: " + (f"[code={code}] " if code is not None else "") + " ".join(outputs) + " ", *lines]
    text.append("ninja: build stopped: subcommand failed.")
    out = parse_ninja_output("\n".join(text).encode())
    assert [(f.outputs, f.code) for f in out.failed] == [(o, c) for o, c, _ in blocks]
    for f, (_, _, lines) in zip(out.failed, blocks, strict=True):
        while lines and not lines[-1].strip():
            lines = lines[:-1]
        assert f.text == "\n".join(lines)
        assert f.finished_before == ok_edges
    # Without any status line the count is unknown, not 0.
    assert out.stopped == "subcommand failed" and out.succeeded_edges == (ok_edges if total else None)
    assert ninja_outcome(out, None)[0] == "failed"  # a stop that is no interruption
