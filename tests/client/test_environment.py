"""Environment capture against real git repositories made in tmp_path: what ``git`` itself says
is what the file reader says, in every layout git writes; a probe without an answer is named."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from buildtel.shared.environment import EnvironmentSnapshot, capture
from buildtel.shared.redaction import REDACTED
from buildtel.shared.vcs import StatusProbe, _unquote, find_git, origin_url, read_vcs

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=dict(os.environ, **GIT_ENV), check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "a.c").write_text("int main(void) { return 0; }\n")
    git(r, "add", "a.c")
    git(r, "commit", "-q", "-m", "first")
    return r


def test_commit_branch_and_clean_tree_as_git_says(repo: Path) -> None:
    (repo / "src").mkdir()
    vcs = capture(str(repo / "src"), environ={}, tools=()).vcs  # from a subdirectory, like a build in src/
    assert vcs is not None
    assert (vcs.commit, vcs.branch, vcs.dirty) == (git(repo, "rev-parse", "HEAD"), "main", False)


def test_packed_refs_detached_head_and_unborn_branch(repo: Path, tmp_path: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature/x")
    git(repo, "pack-refs", "--all")  # no loose ref file left
    assert not (repo / ".git/refs/heads/feature/x").exists()
    info = read_vcs(str(repo)).info
    assert info is not None and (info.commit, info.branch) == (git(repo, "rev-parse", "HEAD"), "feature/x")

    git(repo, "checkout", "-q", "--detach")
    info = read_vcs(str(repo)).info
    assert info is not None and (info.commit, info.branch) == (git(repo, "rev-parse", "HEAD"), "HEAD")

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    git(fresh, "init", "-q", "-b", "trunk")
    read = read_vcs(str(fresh))
    assert read.info is not None and (read.info.commit, read.info.branch) == (None, "trunk") and not read.missing


def test_linked_worktree_reads_its_own_head(repo: Path, tmp_path: Path) -> None:
    wt = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "side", str(wt))
    (wt / "b.c").write_text("x\n")
    git(wt, "add", "b.c")
    git(wt, "commit", "-q", "-m", "side")
    info = read_vcs(str(wt)).info
    assert info is not None and (info.commit, info.branch) == (git(wt, "rev-parse", "HEAD"), "side")
    assert info.commit != git(repo, "rev-parse", "HEAD")


def test_remote_is_read_from_config_without_credentials(repo: Path) -> None:
    git(repo, "remote", "add", "origin", "https://ci-bot:ghp_s3cr3tT0ken@git.example.com/team/app.git")
    git(repo, "remote", "add", "zz", "https://other.example.com/x.git")  # only origin is the remote
    info = read_vcs(str(repo)).info
    assert info is not None and info.remote is not None
    assert "ghp_s3cr3tT0ken" not in info.remote and REDACTED in info.remote
    assert info.remote.endswith("@git.example.com/team/app.git")


def test_dirty_tracked_change(repo: Path) -> None:
    (repo / "a.c").write_text("int main(void) { return 1; }\n")
    (repo / "untracked.o").write_text("")  # untracked files do not count, as before
    env = capture(str(repo), environ={}, tools=())
    assert env.vcs is not None and env.vcs.dirty and not env.missing_probes


def test_not_a_checkout_has_no_vcs_and_nothing_missing(tmp_path: Path) -> None:
    env = capture(str(tmp_path), environ={}, tools=())
    assert env.vcs is None and env.missing_probes == {}


def _block_git_status(repo: Path) -> None:
    # git status opens the index first; a FIFO with no writer holds it there until killed.
    (repo / ".git/index").unlink()
    os.mkfifo(repo / ".git/index")


def test_status_that_does_not_finish_is_recorded_as_missing_with_the_reason(repo: Path) -> None:
    _block_git_status(repo)
    probe = StatusProbe(repo, timeout_s=0.2)
    assert probe.result(wait=True) == (None, "git status did not finish within 0.2 s")

    snap = EnvironmentSnapshot(str(repo), environ={}, tools=())
    env = snap.result("the session start could not wait")  # git status still blocked: stopped now
    assert env.vcs is not None and env.vcs.commit == git(repo, "rev-parse", "HEAD") and env.vcs.branch == "main"
    assert env.missing_probes["vcs.dirty"].startswith("git status still running")


def test_status_that_fails_says_why(repo: Path) -> None:
    (repo / ".git/index").write_bytes(b"garbage")
    env = capture(str(repo), environ={}, tools=())
    assert env.vcs is not None and env.vcs.commit == git(repo, "rev-parse", "HEAD")
    assert env.missing_probes["vcs.dirty"].startswith("git status failed (exit 128)")


def _tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_slow_and_broken_tools_are_missing_probes_not_absent_tools(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "fast", "echo 'fast 1.2.3'")
    _tool(bin_dir, "slow", "exec sleep 60")
    _tool(bin_dir, "broken", "exit 3")
    snap = EnvironmentSnapshot(str(tmp_path), environ={"PATH": str(bin_dir)}, tools=("fast", "slow", "broken", "nope"))
    before = snap.result("probes not run yet")
    assert before.tool_versions == {}
    assert before.missing_probes == {f"tool_versions.{t}": "probes not run yet" for t in ("fast", "slow", "broken")}
    snap.probe()
    after = snap.result()
    assert after.tool_versions == {"fast": "fast 1.2.3"}  # "nope" is not installed: a fact, not missing
    assert after.missing_probes == {"tool_versions.slow": "slow --version did not answer within 1.0 s",
                                    "tool_versions.broken": "broken --version failed (exit 3)"}


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40))
@hsettings(max_examples=200, deadline=None)
def test_config_values_round_trip_through_git_quoting(value: str) -> None:
    # How git writes a value: quoted, with \\ and \" escaped; the reader gets it back exactly.
    quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert _unquote(" " + quoted + " # a comment") == value


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00"),
               min_size=1, max_size=30).map(lambda v: f" {v}\t"))
@hsettings(max_examples=40, deadline=None)
def test_remote_url_read_from_config_is_what_git_reads(value: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = Path(d)
        git(r, "init", "-q")
        git(r, "config", "remote.origin.url", value)  # git's own quoting and escaping
        dirs = find_git(str(r))
        expected = subprocess.run(["git", "config", "--get", "remote.origin.url"], cwd=r, check=True,
                                  capture_output=True, text=True).stdout.removesuffix("\n")
        assert dirs is not None and origin_url(dirs) == (expected or None)
