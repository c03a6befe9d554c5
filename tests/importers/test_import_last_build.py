"""``import ninja --last-build``: only the newest build of an appended log, exactly as a whole-log
import has it (id, targets, labels), whatever builds came before it.

Logs are made of real builds (the shared data's zstd and zlib ninja logs, ``tests/data/ninja``)
appended in any order and number, as ninja appends one run after another to one ``.ninja_log``."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from buildtel.shared.importers.ninja import parse_ninja_log
from tests.importers.importer_samples import NINJA

HEADER = "# ninja log v5\n"
# The builds of the real logs, as their lines: zstd release, zstd incremental, zlib.
_appended = (NINJA / "zstd-release-then-incremental.ninja_log").read_text().splitlines(keepends=True)[1:]
_release_lines = len((NINJA / "zstd-release.ninja_log").read_text().splitlines()) - 1
BUILDS = ["".join(_appended[:_release_lines]), "".join(_appended[_release_lines:]),
          "".join((NINJA / "zlib-clang.ninja_log").read_text().splitlines(keepends=True)[1:])]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(range(len(BUILDS))), min_size=1, max_size=5), st.booleans())
def test_last_build_is_the_whole_logs_last_session(order: list[int], repeat_header: bool) -> None:
    sep = HEADER if repeat_header else ""  # concatenated logs repeat the header; ninja's own appends do not
    data = (HEADER + sep.join(BUILDS[i] for i in order)).encode()
    whole = parse_ninja_log(data, file_mtime=1_800_000_000.0, source="x/.ninja_log")
    last = parse_ninja_log(data, file_mtime=1_800_000_000.0, source="x/.ninja_log", last_build=True)
    assert last.sessions == whole.sessions[-1:]
    assert last.details["builds_skipped"] == whole.details["builds"] - 1
    assert last.details["entries_skipped"] == whole.details["entries"] - whole.sessions[-1].totals.events
    # The newest build is the last one appended, whichever it was (when the rules told every run
    # apart: a build appended after a later one can merge with it, docs/importers.md).
    if whole.details["builds"] == len(order):
        (alone,) = parse_ninja_log((HEADER + BUILDS[order[-1]]).encode()).sessions
        assert [t.name for t in last.sessions[0].targets] == [t.name for t in alone.targets]


def test_last_build_with_start_places_that_build() -> None:
    data = (NINJA / "zstd-release-then-incremental.ninja_log").read_bytes()
    (s,) = parse_ninja_log(data, base_time=1_800_000_000.0, last_build=True).sessions
    assert s.start == 1_800_000_000.0 and s.labels["time_source"] == "base_time"
    assert s.labels["build_index"] == "2" and s.labels["builds_in_log"] == "2"
