"""Replay trusts nothing on disk: an edited manifest is refused before anything runs, and
``replay --execute`` shows the exact command and environment before running it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from buildtel.shared.recording.manifest import decode_manifest, encode
from buildtel.shared.recording.replay import ReplayEngine, ReplayError
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.recording.trust import KEY_NAME
from buildtel.shared.settings import Settings
from tests.recorder.cproject import write_project
from tests.recorder.test_capture_replay import record_build

PY = sys.executable


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "proj" / ".builder-cache"


@pytest.fixture
def recorded(cache: Path, tmp_path: Path) -> tuple[Settings, str]:
    settings = Settings(cache_dir=cache, fsync=False, log_format="json")
    root = write_project(tmp_path / "proj")
    env = {**os.environ, "API_TOKEN": "s3cret-value-123", "BUILD_FLAVOUR": "release"}
    rid, code = record_build(settings, root, ["make", "-j2"], env=env)
    assert code == 0
    return settings, rid


def buildtel(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BUILDER_TELEMETRY_CACHE_DIR": str(cache)}
    env.pop("BUILDER_TELEMETRY_NATS_URL", None)
    return subprocess.run([PY, "-m", "buildtel.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def manifest_path(settings: Settings, rid: str) -> Path:
    return settings.recordings_dir / "manifests" / f"{rid}.rec"


def edit_command(settings: Settings, rid: str, marker: Path) -> None:
    """What an attacker with write access to the store would do: change the command."""
    path = manifest_path(settings, rid)
    m = decode_manifest(path.read_bytes())
    m = msgspec.structs.replace(m, command=["sh", "-c", f"touch {marker}"])
    os.chmod(path, 0o600)
    path.write_bytes(encode(m))


def test_execute_shows_command_and_env_then_runs(recorded: tuple[Settings, str], cache: Path,
                                                 tmp_path: Path) -> None:
    _settings, rid = recorded
    res = buildtel(cache, "replay", rid, "--execute", "--sandbox-dir", str(tmp_path / "boxes"))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    plan, _, result = out.partition(f"replay of {rid}: ")
    assert f"manifest  {rid} verified (sha256 " in plan
    assert "will run  make -j2" in plan
    assert "  BUILD_FLAVOUR=release" in plan
    assert "API_TOKEN" in plan.split("not set")[1]  # named as not restored, never its value
    assert "s3cret" not in out and "s3cret" not in res.stderr
    assert result.startswith("reproducible")


def test_edited_manifest_is_refused_and_nothing_runs(recorded: tuple[Settings, str], cache: Path,
                                                     tmp_path: Path) -> None:
    settings, rid = recorded
    marker = tmp_path / "pwned"
    edit_command(settings, rid, marker)
    boxes = tmp_path / "boxes"
    res = buildtel(cache, "replay", rid, "--execute", "--sandbox-dir", str(boxes))
    assert res.returncode != 0
    assert "refusing to replay" in res.stderr and "was changed after it was recorded" in res.stderr
    assert "will run" not in res.stdout
    assert not marker.exists()
    assert not boxes.exists() or not any(boxes.iterdir())  # no sandbox was even made
    # Describing it (no --execute) still works: it runs nothing.
    assert "nothing was run" in buildtel(cache, "replay", rid).stdout


def test_rewriting_the_recorded_hash_too_needs_the_key(recorded: tuple[Settings, str], tmp_path: Path) -> None:
    settings, rid = recorded
    marker = tmp_path / "pwned"
    edit_command(settings, rid, marker)
    sig = manifest_path(settings, rid).with_suffix(".sig")
    version, _, mac = sig.read_text().split()
    new_sha = hashlib.sha256(manifest_path(settings, rid).read_bytes()).hexdigest()
    sig.write_text(f"{version} {new_sha} {mac}\n")
    with pytest.raises(ReplayError, match="does not match this store's key"):
        ReplayEngine(settings).replay(rid)
    assert not marker.exists()


def test_signature_of_another_recording_does_not_transfer(recorded: tuple[Settings, str], tmp_path: Path) -> None:
    settings, rid = recorded
    store = RecordingStore.from_settings(settings)
    other = "cd" * 16
    data = manifest_path(settings, rid).read_bytes()
    (store.manifests / f"{other}.rec").write_bytes(data)
    (store.manifests / f"{other}.sig").write_text(manifest_path(settings, rid).with_suffix(".sig").read_text())
    with pytest.raises(ReplayError, match="does not match this store's key"):
        ReplayEngine(settings).replay(other)


def test_unsigned_manifest_and_loose_key_are_refused(recorded: tuple[Settings, str]) -> None:
    settings, rid = recorded
    store = RecordingStore.from_settings(settings)
    key = store.root / KEY_NAME
    assert (key.stat().st_mode & 0o777) == 0o600
    os.chmod(key, 0o644)
    with pytest.raises(ReplayError, match="only 0600 is trusted"):
        ReplayEngine(settings).replay(rid)
    os.chmod(key, 0o600)
    manifest_path(settings, rid).with_suffix(".sig").unlink()
    with pytest.raises(ReplayError, match="no signature file"):
        ReplayEngine(settings).replay(rid)


def test_store_verification_returns_the_checked_bytes(recorded: tuple[Settings, str]) -> None:
    settings, rid = recorded
    store = RecordingStore.from_settings(settings)
    m, sha = store.load_verified_manifest(rid)
    assert sha == hashlib.sha256(manifest_path(settings, rid).read_bytes()).hexdigest()
    assert m == store.load_manifest(rid)
    store.delete_recording(rid)
    assert not manifest_path(settings, rid).with_suffix(".sig").exists()
