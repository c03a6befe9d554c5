"""The recording store and BuildRecorder: dedup, limits, path refusal, secrets, format evolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from buildtel.shared.protocol import BuildStarted, TargetFinished
from buildtel.shared.recording.manifest import (
    FORMAT_VERSION,
    UnsafePath,
    UnsupportedFormat,
    decode_manifest,
    encode,
)
from buildtel.shared.recording.recorder import BuildRecorder
from buildtel.shared.recording.store import RecordingNotFound, RecordingStore


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    return RecordingStore(tmp_path / "recordings", fsync=False)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    (w / "src").mkdir(parents=True)
    (w / "src" / "a.c").write_text("int a;\n")
    (w / "src" / "b.c").write_text("int b;\n")
    (w / "out").mkdir()
    (w / "out" / "a.o").write_bytes(b"\x7fELF object")
    return w


def _record(store: RecordingStore, work: Path, inputs: list[str], outputs: list[str], **kw: object) -> str:
    rec = BuildRecorder(store=store)
    rec.start_recording(["cc", "-c", "src/a.c"], cwd=work, tools=(), **kw)  # type: ignore[arg-type]
    for p in inputs:
        rec.record_input(p)
    for p in outputs:
        rec.record_output(p)
    return rec.stop_recording(exit_code=0)


def test_objects_are_content_addressed_and_shared(store: RecordingStore, work: Path) -> None:
    r1 = _record(store, work, ["src/a.c", "src/b.c"], ["out/a.o"])
    r2 = _record(store, work, ["src/a.c", "src/b.c"], ["out/a.o"])
    assert r1 != r2
    m1 = store.load_manifest(r1)
    sha = next(e.sha256 for e in m1.inputs if e.path == "src/a.c")
    import hashlib

    assert sha == hashlib.sha256(b"int a;\n").hexdigest()
    assert store.object_path(sha) == store.root / "objects" / sha[:2] / sha[2:]
    objects = [p for p in store.objects.rglob("*") if p.is_file()]
    assert len(objects) == 3  # two recordings, three distinct contents
    assert not any(store.tmp.iterdir())  # every write went through tmp + rename
    assert b"".join(store.read_object(sha)) == b"int a;\n"


def test_directories_are_recorded_file_by_file(store: RecordingStore, work: Path) -> None:
    rid = _record(store, work, ["src"], ["out"])
    m = store.load_manifest(rid)
    assert [e.path for e in m.inputs] == ["src/a.c", "src/b.c"]
    assert [e.path for e in m.outputs] == ["out/a.o"]


@pytest.mark.parametrize("bad", ["../outside.txt", "src/../../outside.txt", "/etc/passwd", "link-out",
                                 "dir-out/passwd"])
def test_record_refuses_paths_leaving_the_working_directory(store: RecordingStore, work: Path, tmp_path: Path,
                                                            bad: str) -> None:
    (tmp_path / "outside.txt").write_text("x")
    os.symlink(tmp_path / "outside.txt", work / "link-out")
    os.symlink("/etc", work / "dir-out")
    rec = BuildRecorder(store=store)
    rec.start_recording(["true"], cwd=work, tools=())
    with pytest.raises(UnsafePath):
        rec.record_input(bad)
    with pytest.raises(UnsafePath):
        rec.record_output(bad)
    rid = rec.stop_recording(0)
    assert store.load_manifest(rid).inputs == []


def test_secrets_in_the_environment_never_reach_the_store(store: RecordingStore, work: Path) -> None:
    secret = "s3cr3t-Value-7Hq2xLp9"
    token = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/home/builder", "DEPLOY_PASSWORD": secret,
           "innocent_looking": token, "CI": "true"}
    rec = BuildRecorder(store=store)
    rec.start_recording(["make", f"--api-token={secret}", "--password", secret, "all"], cwd=work, env=env,
                        tools=("make",))
    rec.record_input("src/a.c")
    rid = rec.stop_recording(0, events=[BuildStarted(session_id="c" * 32, agent_id="a", seq=0, ts=1.0,
                                                     command=["make"], record=True)])
    m = store.load_manifest(rid)
    assert m.environment is not None
    assert m.environment.env["DEPLOY_PASSWORD"] == "[REDACTED]"
    assert m.environment.env["innocent_looking"] == "[REDACTED]"
    assert m.environment.env["CI"] == "true"
    assert m.argv_redacted and secret not in " ".join(m.command)
    for path in store.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data, path
            assert token.encode() not in data, path


def test_retention_and_size_cap(tmp_path: Path, work: Path) -> None:
    store = RecordingStore(tmp_path / "rec", fsync=False, retention_s=3600, prune_grace_s=0, max_bytes=10**9)
    old = _record(store, work, ["src/a.c"], [])
    m = store.load_manifest(old)
    m.created = time.time() - 7200
    store.save_manifest(m)
    (work / "big.bin").write_bytes(os.urandom(300_000))
    mid = _record(store, work, ["big.bin"], [])
    (work / "big2.bin").write_bytes(os.urandom(300_000))
    new = _record(store, work, ["big2.bin", "src/a.c"], [])
    result = store.gc()
    assert result["recordings_dropped"] == 1
    with pytest.raises(RecordingNotFound):
        store.load_manifest(old)
    # a.c's object survives: the newest recording still refers to it.
    assert store.has_object(store.load_manifest(new).inputs[1].sha256)
    store.max_bytes = 450_000  # room for one big recording, not two: the older one goes
    store.gc()
    assert not store.has_manifest(mid) and store.has_manifest(new)
    assert store.disk_bytes() <= 450_000


def test_unreferenced_objects_survive_the_prune_grace(tmp_path: Path, work: Path) -> None:
    store = RecordingStore(tmp_path / "rec", fsync=False)
    sha, _ = store.put_file(work / "src" / "a.c")  # stored by a recording still in progress
    store.gc()
    assert store.has_object(sha)
    store.prune_grace_s = 0
    store.gc()
    assert not store.has_object(sha)


def test_recording_is_readable_by_a_new_process(store: RecordingStore, work: Path) -> None:
    events = [BuildStarted(session_id="d" * 32, agent_id="a", seq=0, ts=1.0, record=True),
              TargetFinished(session_id="d" * 32, agent_id="a", seq=1, ts=2.0, target="//x", start=1.5,
                             duration_s=0.5)]
    rec = BuildRecorder(store=store)
    rid = rec.start_recording(["make"], cwd=work, tools=(), session_id="d" * 32)
    rec.record_input("src/a.c")
    rec.record_output("out/a.o")
    rec.stop_recording(3, events=events)
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from buildtel.shared.recording.store import RecordingStore\n"
        "s = RecordingStore(Path(sys.argv[1]))\n"
        "m = s.load_manifest(sys.argv[2])\n"
        "ev = s.load_events(m.session_id)\n"
        "data = b''.join(s.read_object(m.inputs[0].sha256)).decode()\n"
        "print(json.dumps({'cmd': m.command, 'exit': m.exit_code, 'in': [e.path for e in m.inputs],"
        " 'out': [e.path for e in m.outputs], 'events': [type(e).__name__ for e in ev], 'data': data,"
        " 'format': m.format}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(store.root), rid], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    got = json.loads(out.stdout)
    assert got == {"cmd": ["make"], "exit": 3, "in": ["src/a.c"], "out": ["out/a.o"],
                   "events": ["BuildStarted", "TargetFinished"], "data": "int a;\n", "format": FORMAT_VERSION}


def test_manifest_schema_evolution() -> None:
    # An older writer knew fewer fields: they decode with their defaults.
    old = msgspec.msgpack.encode({"type": "recording", "id": "e" * 32, "created": 5.0, "command": ["make"],
                                  "inputs": [{"path": "a.c", "sha256": "0" * 64}]})
    m = decode_manifest(old)
    assert m.outputs == [] and m.session_id is None and m.inputs[0].kind == "file" and m.inputs[0].stored
    assert m.format == FORMAT_VERSION
    # A newer writer added fields this version does not know: they are skipped.
    newer = msgspec.msgpack.encode({"type": "recording", "id": "e" * 32, "created": 5.0, "format": 1,
                                    "sandbox_policy": {"network": False}, "inputs": [
                                        {"path": "a.c", "sha256": "0" * 64, "xattrs": {"user.x": "1"}}]})
    assert decode_manifest(newer).inputs[0].path == "a.c"
    # An incompatible format is refused rather than misread.
    with pytest.raises(UnsupportedFormat):
        decode_manifest(msgspec.msgpack.encode({"type": "recording", "id": "e" * 32, "created": 5.0,
                                                "format": FORMAT_VERSION + 1}))
    assert decode_manifest(encode(m)) == m


def test_event_batches_compact_without_losing_late_ones(store: RecordingStore) -> None:
    from buildtel.shared.codec import encode as wire
    from buildtel.shared.protocol import EventBatch

    sid = "f" * 32
    evs = [TargetFinished(session_id=sid, agent_id="a", seq=i, ts=float(i), target=f"t{i}", start=float(i),
                          duration_s=0.1) for i in range(6)]
    store.save_batch(sid, "a", 0, wire(EventBatch(session_id=sid, agent_id="a", events=evs[:3])))
    store.save_batch(sid, "a", 0, wire(EventBatch(session_id=sid, agent_id="a", events=evs[:3])))  # redelivery
    store.save_batch(sid, "a", 3, wire(EventBatch(session_id=sid, agent_id="a", events=evs[3:5])))
    assert store.compact_events(sid) == 2
    store.save_batch(sid, "a", 5, wire(EventBatch(session_id=sid, agent_id="a", events=evs[5:])))
    assert [e.seq for e in store.load_events(sid)] == list(range(6))
    store.compact_events(sid)
    assert [p.name for p in (store.events / sid).iterdir() if not p.name.startswith(".")] == ["log.msgpack"]
    assert [e.seq for e in store.load_events(sid)] == list(range(6))
