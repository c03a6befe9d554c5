"""Time travel through a recorded stream, the replay/diff CLI, and diffs of recordings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import msgspec
import pytest

from buildtel.cli.cmd_replay import interactive
from buildtel.cli.main import main
from buildtel.shared.protocol import CACHE_HITS, TargetFinished, TargetStarted
from buildtel.shared.recording.diff import diff, side_from_recording
from buildtel.shared.recording.recorder import BuildRecorder
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.recording.timetravel import Timeline, rewrite
from buildtel.shared.settings import Settings
from tests.util import synthetic_build


def expected_at(events: list, step: int) -> dict[str, int]:  # type: ignore[type-arg]
    """Counts after ``step`` events, worked out directly from the generated build (not via Timeline):
    a target is done once its TargetFinished is among the first ``step`` events by time, running
    when only its TargetStarted is."""
    ordered = sorted(events, key=lambda e: (e.ts, e.agent_id, e.seq))
    applied = ordered[:step]
    names = {e.target for e in events if isinstance(e, TargetStarted)}
    finished = [e for e in applied if isinstance(e, TargetFinished)]
    done = {e.target for e in finished}
    started = {e.target for e in applied if isinstance(e, TargetStarted)}
    running = started - done
    return {"done": len(done), "running": len(running), "pending": len(names - done - running),
            "cache_hits": sum(e.cache in CACHE_HITS for e in finished),
            "workers_busy": len({e.worker for e in applied if isinstance(e, TargetStarted) and e.target in running})}


def all_events(per_agent: dict) -> list:  # type: ignore[type-arg]
    return [e for evs in per_agent.values() for e in evs]


@pytest.mark.parametrize("step", [0, 1, 17, 40, 63, 101])
def test_state_at_a_step_matches_independent_counts(step: int) -> None:
    _, per_agent, _ = synthetic_build(targets=50, seed=7, agents=("agent-a", "agent-b"))
    events = all_events(per_agent)
    state = Timeline(events).state(step).to_dict()
    exp = expected_at(events, step)
    assert {k: state[k] if k != "workers_busy" else len(state[k]) for k in exp} == exp
    assert state["done"] + state["running"] + state["pending"] == 50


def test_state_at_seconds_and_stepping() -> None:
    _, per_agent, _ = synthetic_build(targets=30, seed=2)
    events = all_events(per_agent)
    tl = Timeline(events)
    t0 = min(e.ts for e in events)
    step = tl.step_at(25.0)
    assert step == sum(1 for e in events if e.ts - t0 <= 25.0)
    end = tl.state(len(tl))
    assert end.finished and len(end.done) == 30 and not end.running and not end.pending
    out = io.StringIO()
    last = interactive(tl, 5, io.StringIO("n\nn3\np\n12\nq\n"), out)
    assert last == 12
    assert "step 6/" in out.getvalue() and "step 9/" in out.getvalue() and "step 8/" in out.getvalue()


def test_rewrite_keeps_everything_but_the_session() -> None:
    sid, per_agent, _ = synthetic_build(targets=5)
    events = all_events(per_agent)
    new = rewrite(events, "9" * 32, source=sid)
    assert len(new) == len(events) and {e.session_id for e in new} == {"9" * 32}
    assert new[0].labels["republished_from"] == sid and new[0].record is False  # type: ignore[union-attr]
    assert [msgspec.structs.replace(e, session_id=sid) for e in new[1:]] == events[1:]


# -- CLI: replay and diff ------------------------------------------------------------------------
@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    cache = tmp_path / "cache"
    monkeypatch.setenv("BUILDER_TELEMETRY_CACHE_DIR", str(cache))
    monkeypatch.delenv("BUILDER_TELEMETRY_NATS_URL", raising=False)
    return Settings(cache_dir=cache, fsync=False)


def _recording(settings: Settings, work: Path, source: str, durations: dict[str, float], cache: str = "miss") -> str:
    work.mkdir(parents=True, exist_ok=True)
    (work / "main.c").write_text(source)
    (work / "Makefile").write_text("all:\n\ttrue\n")
    sid, per_agent, _ = synthetic_build(targets=3, seed=1)
    events = all_events(per_agent)
    # The same build shape, with our durations and cache results per target.
    fixed = []
    for e in events:
        if isinstance(e, TargetFinished):
            key = e.target.rsplit(":", 1)[-1]
            e = msgspec.structs.replace(e, duration_s=durations[key], cache=cache if key == "t1" else e.cache)
        fixed.append(e)
    rec = BuildRecorder(store=RecordingStore.from_settings(settings))
    rec.start_recording(["make"], cwd=work, tools=(), env={"PATH": "/usr/bin", "CC": "gcc"}, session_id=sid)
    rec.record_input("main.c")
    rec.record_input("Makefile")
    return rec.stop_recording(0, events=fixed)


def test_cli_step_json_and_text(cli_env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rid = _recording(cli_env, tmp_path / "w", "int main(){}\n", {"t0": 1.0, "t1": 2.0, "t2": 3.0})
    assert main(["replay", rid[:8], "--step", "3", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    events = RecordingStore.from_settings(cli_env).load_events(rid)
    exp = expected_at(events, 3)
    assert (state["done"], state["running"], state["pending"]) == (exp["done"], exp["running"], exp["pending"])
    assert main(["replay", rid, "--at", "1000"]) == 0
    assert "build finished" in capsys.readouterr().out
    assert main(["replay", rid]) == 0
    assert "nothing was run" in capsys.readouterr().out
    assert main(["replay", "0" * 32]) == 2
    assert main(["replay", rid, "--step", "99999"]) == 2


def test_diff_reports_changed_input_and_timing(cli_env: Settings, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    a = _recording(cli_env, tmp_path / "a", "int main(){return 0;}\n", {"t0": 1.0, "t1": 2.0, "t2": 3.0})
    b = _recording(cli_env, tmp_path / "b", "int main(){return 1;}\n", {"t0": 1.0, "t1": 2.0, "t2": 4.5},
                   cache="remote_hit")
    store = RecordingStore.from_settings(cli_env)
    ma, mb = store.load_manifest(a), store.load_manifest(b)
    d = diff(side_from_recording(ma, store.load_events(a)), side_from_recording(mb, store.load_events(b)))
    assert d["inputs"] == {"changed": ["main.c"], "added": [], "removed": []}
    assert [(t["target"].rsplit(":", 1)[-1], t["delta_s"]) for t in d["targets"]["timing"]] == [("t2", 1.5)]
    assert d["cwd"] == {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    # The t1 cache change shows in the results and is where the streams first diverge.
    assert [c["b"] for c in d["targets"]["cache"]] == ["remote_hit"]
    assert d["first_divergence"] is not None and "t1" in d["first_divergence"]["b"]

    assert main(["diff", a, b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"]["changed"] == ["main.c"]
    assert main(["diff", a[:10], b[:10]]) == 0
    text = capsys.readouterr().out
    assert "~ main.c (changed)" in text and "+1.500s" in text and "first diverge" in text
