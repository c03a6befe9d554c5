"""Record a real C project built by gcc and make, replay it in a sandbox, compare the outputs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from buildtel.shared.recording.capture import RunCapture
from buildtel.shared.recording.manifest import FileEntry, RecordingManifest, UnsafePath, encode
from buildtel.shared.recording.replay import ReplayEngine, ReplayError
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.settings import Settings
from tests.recorder.cproject import write_project


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    # The cache dir sits inside the project, as the default relative .builder-cache does:
    # the capture must not mistake the store's own files for build outputs.
    return Settings(cache_dir=tmp_path / "proj" / ".builder-cache", fsync=False, log_format="json")


def record_build(settings: Settings, root: Path, argv: list[str], *, inputs: str = "auto",
                 env: dict[str, str] | None = None) -> tuple[str, int]:
    cap = RunCapture(settings, inputs=inputs)
    env = dict(os.environ if env is None else env)
    assert cap.before(root, argv, env) is not None, cap.error
    code = subprocess.run(argv, cwd=root, env=env, capture_output=True, check=False).returncode
    rid = cap.after(code)
    assert rid is not None, cap.error
    return rid, code


def test_make_build_is_recorded_and_replays_reproducibly(local_settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj")
    rid, code = record_build(local_settings, root, ["make", "-j4"])
    assert code == 0
    engine = ReplayEngine(local_settings)
    m = engine.manifest(rid)
    assert m.input_method == "make"
    inputs = {e.path for e in m.inputs}
    # make's database after the build: the sources, the headers named only in the -MMD files,
    # and the makefiles (Makefile and the .d files it included are read before building).
    assert {"Makefile", "src/add.c", "src/mul.c", "src/greet.c", "src/main.c",
            "include/util.h", "include/config.h"} <= inputs
    outputs = {e.path for e in m.outputs}
    assert {"build/app", "build/add.o", "build/main.o", "build/add.d"} <= outputs
    assert not any(p.startswith(".builder-cache") for p in inputs | outputs)
    assert m.environment is not None and "gcc" in m.environment.tool_versions
    assert m.command == ["make", "-j4"] and m.exit_code == 0

    result = engine.replay(rid)
    assert result.reproducible, (result.differing, result.log)
    assert result.status == "reproducible"
    assert result.outputs_checked == len(m.outputs) and not result.differing
    assert result.sandbox is None  # cleaned up


def test_timestamped_output_is_reported_not_reproducible(local_settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj", timestamp=True)
    rid, _ = record_build(local_settings, root, ["make"])
    result = ReplayEngine(local_settings).replay(rid)
    assert not result.reproducible
    assert result.status == "not reproducible"
    assert [d.path for d in result.differing] == ["build/stamp.txt"]
    assert result.differing[0].reason == "differs"


def test_generic_tree_capture_for_other_commands(local_settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj")
    (root / "notes.txt").write_text("not read by the build, but the tree scan cannot know\n")
    rid, _ = record_build(local_settings, root, ["sh", "-c", "make && cp build/app build/app.copy"])
    m = ReplayEngine(local_settings).manifest(rid)
    assert m.input_method == "tree"
    assert "notes.txt" in {e.path for e in m.inputs}
    assert "build/app.copy" in {e.path for e in m.outputs}
    assert ReplayEngine(local_settings).replay(rid).reproducible


def test_incremental_build_records_only_what_changed(local_settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj")
    record_build(local_settings, root, ["make"])
    (root / "src" / "add.c").write_text('#include "util.h"\nint add(int a, int b) { return b + a; }\n')
    rid, _ = record_build(local_settings, root, ["make"])
    m = ReplayEngine(local_settings).manifest(rid)
    assert {e.path for e in m.outputs} == {"build/add.o", "build/add.d", "build/app"}
    # The untouched objects are inputs of this build (make read them to link).
    assert {"build/main.o", "build/mul.o"} <= {e.path for e in m.inputs}
    # add.d was read by make (an included makefile) before the build rewrote it: hash only.
    # Rebuilt targets were not read: outputs only.
    hash_only = {e.path for e in m.inputs if not e.stored}
    assert hash_only == {"build/add.d"}
    assert ReplayEngine(local_settings).replay(rid).reproducible


def test_ninja_inputs_come_from_its_graph_and_deps_log(local_settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj")
    (root / "build.ninja").write_text(
        "rule cc\n  command = gcc -O2 -Iinclude -MMD -MF $out.d -c $in -o $out\n  depfile = $out.d\n  deps = gcc\n"
        "rule link\n  command = gcc $in -o $out\n"
        + "".join(f"build out/{n}.o: cc src/{n}.c\n" for n in ("add", "mul", "greet", "main"))
        + "build out/app: link " + " ".join(f"out/{n}.o" for n in ("add", "mul", "greet", "main")) + "\n")
    rid, code = record_build(local_settings, root, ["ninja"])
    assert code == 0
    m = ReplayEngine(local_settings).manifest(rid)
    assert m.input_method == "ninja"
    inputs = {e.path for e in m.inputs}
    assert {"build.ninja", "src/main.c", "include/util.h", "include/config.h"} <= inputs
    assert "Makefile" not in inputs  # ninja never read it
    assert ".ninja_log" not in {e.path for e in m.outputs}
    assert ReplayEngine(local_settings).replay(rid).reproducible


# -- refusing paths that leave the sandbox ------------------------------------------------------
def _tampered(store: RecordingStore, rid: str, *entries: FileEntry) -> None:
    """Write a manifest straight to disk and sign it, as an attacker holding the store's key
    would: the path checks must hold even for a manifest that passes verification
    (an unsigned one never gets that far, see test_replay_trust.py)."""
    sha = store.put_bytes(b"payload\n")
    fixed = [FileEntry(path=e.path, sha256=sha, kind=e.kind, target=e.target) for e in entries]
    m = RecordingManifest(id=rid, created=1.0, command=["true"], inputs=fixed)
    (store.manifests / f"{rid}.rec").write_bytes(encode(m))
    (store.manifests / f"{rid}.sig").write_text(store.signer.signature(rid, encode(m)))


@pytest.mark.parametrize("entries", [
    [FileEntry(path="../escape.txt", sha256="")],
    [FileEntry(path="ok/../../escape.txt", sha256="")],
    [FileEntry(path="/tmp/escape.txt", sha256="")],
    [FileEntry(path="link", sha256="", kind="symlink", target="../../..")],
    [FileEntry(path="link", sha256="", kind="symlink", target="/etc")],
    # A chain: "a" points at the sandbox root itself, so "a/b -> ../x" lexically stays inside
    # ("x") but really lands one level above the sandbox.
    [FileEntry(path="a", sha256="", kind="symlink", target="."),
     FileEntry(path="a/b", sha256="", kind="symlink", target="../x")],
], ids=["dotdot", "inner-dotdot", "absolute", "symlink-up", "symlink-absolute", "symlink-chain"])
def test_restore_refuses_paths_outside_the_sandbox(local_settings: Settings, tmp_path: Path,
                                                   entries: list[FileEntry]) -> None:
    store = RecordingStore.from_settings(local_settings)
    rid = "ab" * 16
    _tampered(store, rid, *entries)
    sandbox_parent = tmp_path / "sandboxes"
    sandbox_parent.mkdir()
    before = set(tmp_path.rglob("*"))
    with pytest.raises(UnsafePath):
        ReplayEngine(store=store).restore(rid, sandbox_parent / "box")
    with pytest.raises(UnsafePath):
        ReplayEngine(store=store).replay(rid, sandbox_root=sandbox_parent)
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/escape.txt").exists()
    created = {p for p in set(tmp_path.rglob("*")) - before if not p.is_relative_to(sandbox_parent / "box")}
    assert created <= {sandbox_parent}, created  # replay removed its sandbox, nothing else appeared


def test_capture_skips_symlinks_that_leave_the_tree(local_settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.h").write_text("#define X 1\n")
    os.symlink(outside / "secret.h", root / "include" / "secret.h")
    os.symlink(outside, root / "vendor")
    os.symlink("util.h", root / "include" / "alias.h")  # inside: kept as a link
    rid, _ = record_build(local_settings, root, ["sh", "-c", "make"])
    m = ReplayEngine(local_settings).manifest(rid)
    paths = {e.path for e in m.inputs}
    assert "include/secret.h" not in paths and "vendor" not in paths
    assert any(r.startswith("include/secret.h") for r in m.refused)
    assert any(r.startswith("vendor") for r in m.refused)
    alias = next(e for e in m.inputs if e.path == "include/alias.h")
    assert alias.kind == "symlink" and alias.target == "util.h"
    assert ReplayEngine(local_settings).replay(rid).reproducible


def test_replay_refuses_missing_content_and_redacted_command(local_settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj")
    rid, _ = record_build(local_settings, root, ["make"])
    engine = ReplayEngine(local_settings)
    m = engine.manifest(rid)
    obj = engine.store.object_path(next(e.sha256 for e in m.inputs if e.path == "src/main.c"))
    os.chmod(obj, 0o644)
    obj.unlink()
    with pytest.raises(ReplayError, match="no content"):
        engine.replay(rid)
    m.argv_redacted = True
    engine.store.save_manifest(m)
    with pytest.raises(ReplayError, match="redacted"):
        engine.replay(rid)


def test_system_headers_from_dependency_files_are_external_inputs(local_settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj")
    makefile = root / "Makefile"
    makefile.write_text(makefile.read_text().replace("-MMD", "-MD"))  # -MD lists system headers too
    rid, _ = record_build(local_settings, root, ["make"])
    m = ReplayEngine(local_settings).manifest(rid)
    stdio = [e for e in m.external_inputs if e.path.endswith("/stdio.h")]
    assert stdio and len(stdio[0].sha256) == 64  # hashed, so a diff sees a changed system header
    assert not any(e.path.endswith("stdio.h") for e in m.inputs)
    store = RecordingStore.from_settings(local_settings)
    assert not store.has_object(stdio[0].sha256) or stdio[0].sha256 in {e.sha256 for e in m.inputs}


def test_second_recording_rehashes_only_what_changed(local_settings: Settings, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from buildtel.shared.recording import capture

    root = write_project(tmp_path / "proj")
    old = 1_600_000_000
    for p in root.rglob("*"):
        os.utime(p, (old, old))  # older than the racy-clean window, so their hashes are cached
    record_build(local_settings, root, ["make"])
    hashed: list[str] = []
    real = capture.sha256_file
    monkeypatch.setattr(capture, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    (root / "src" / "mul.c").write_text('#include "util.h"\nint mul(int a, int b) { return a * b; }\n')
    cap = RunCapture(local_settings)
    cap.before(root, ["make"], dict(os.environ))
    assert "mul.c" in hashed and not {"add.c", "main.c", "util.h", "Makefile"} & set(hashed)

