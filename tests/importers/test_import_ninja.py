"""The ninja importer against real ninja 1.11 logs and hand-written v5/v6/v7 edge cases."""

from __future__ import annotations

import gzip
import itertools

import pytest

from buildtel.shared.codec import decode_session, encode
from buildtel.shared.importers.common import ImportFormatError
from buildtel.shared.importers.ninja import parse_ninja_log
from tests.importers.importer_samples import (
    NINJA,
    ninja_builds,
    ninja_edges,
    wall_starts,
)

SAMPLES = ["zlib-clang.ninja_log", "zstd-release.ninja_log", "zstd-release-then-incremental.ninja_log"]


@pytest.mark.parametrize("name", SAMPLES)
def test_real_log_gives_exactly_the_builds_and_edges_in_the_file(name: str) -> None:
    path = NINJA / name
    expected = ninja_builds(path)
    result = parse_ninja_log(path.read_bytes())
    assert result.warnings == []
    assert len(result.sessions) == len(expected) == len(wall_starts(name))
    assert result.details["entries"] == sum(len(b) for b in expected)
    for session, build, wall in zip(result.sessions, expected, wall_starts(name), strict=True):
        edges = ninja_edges(build)
        assert session.totals.targets == len(session.targets) == len(edges)
        assert session.totals.events == len(build)
        by_name = {t.name: t for t in session.targets}
        assert sorted(by_name) == sorted(e["outputs"][0] for e in edges)
        for e in edges:
            t = by_name[e["outputs"][0]]
            assert t.duration_s == (e["end"] - e["start"]) / 1000  # exactly end - start
            assert t.start == pytest.approx(session.start + e["start"] / 1000, abs=1e-6)
            assert [p.name for p in t.phases] == [f"output:{o}" for o in e["outputs"][1:]]
        assert session.duration_s == max(e["end"] for e in edges) / 1000
        assert session.totals.target_time_s == pytest.approx(sum(e["end"] - e["start"] for e in edges) / 1000)
        # The build's clock comes from the mtimes; ninja was started within a few ms of it.
        assert session.start == pytest.approx(wall, abs=0.05)
        assert session.labels["time_source"] == "mtime"
        assert decode_session(encode(session)) == session


@pytest.mark.parametrize("name", SAMPLES)
def test_lanes_never_overlap_and_match_ninja_j2(name: str) -> None:
    for session in parse_ninja_log((NINJA / name).read_bytes()).sessions:
        workers = {t.worker for t in session.targets}
        assert len(workers) == 2  # the builds ran with -j2 and kept both lanes busy
        for worker in workers:
            spans = sorted((t.start, t.end) for t in session.targets if t.worker == worker)
            for (_, end), (start, _) in itertools.pairwise(spans):
                assert start >= end - 1e-9


def test_appended_log_keeps_the_first_builds_id() -> None:
    alone = parse_ninja_log((NINJA / "zstd-release.ninja_log").read_bytes()).sessions
    both = parse_ninja_log((NINJA / "zstd-release-then-incremental.ninja_log").read_bytes()).sessions
    assert both[0].id == alone[0].id  # re-importing a log that grew does not duplicate old builds
    assert both[1].id != both[0].id
    assert [s.id for s in parse_ninja_log((NINJA / "zstd-release-then-incremental.ninja_log").read_bytes()).sessions] \
        == [s.id for s in both]
    assert both[1].labels["boundary"] == "end-decreased"
    # touch of two sources: both objects of each + what links them was rebuilt
    assert {t.name.rsplit("/", 1)[-1] for t in both[1].targets} >= {"zstd_compress.c.o", "fileio.c.o"}


def test_gzip_and_base_time() -> None:
    raw = (NINJA / "zlib-clang.ninja_log").read_bytes()
    plain = parse_ninja_log(raw, base_time=1000.0).sessions[0]
    zipped = parse_ninja_log(gzip.compress(raw), base_time=1000.0).sessions[0]
    assert plain == zipped
    assert plain.start == 1000.0 and plain.labels["time_source"] == "base_time"
    assert plain.finish == pytest.approx(1000.0 + 2.205)


def _log(version: int, *lines: str) -> bytes:
    return (f"# ninja log v{version}\n" + "".join(line + "\n" for line in lines)).encode()


@pytest.mark.parametrize("version", [5, 6, 7])
@pytest.mark.parametrize("digest", ["0", "1a2b3c4d5e6f7788", "ABCDEF", "12345678901234567890"])
def test_versions_and_hash_formats(version: int, digest: str) -> None:
    result = parse_ninja_log(_log(version, f"0\t10\t0\ta.o\t{digest}", f"10\t25\t0\tb\t{digest}"), base_time=5.0)
    (session,) = result.sessions
    assert session.labels["ninja_log_version"] == str(version)
    assert [(t.name, t.duration_s) for t in session.targets] == [("a.o", 0.010), ("b", 0.015)]


def test_multi_output_edge_and_superseded_output() -> None:
    result = parse_ninja_log(_log(5,
                                  "0\t10\t0\tlib.so.1\taa", "0\t10\t0\tlib.so\taa",   # one edge, two outputs
                                  "5\t20\t0\tx.o\tbb",
                                  "20\t30\t0\tx.o\tcc"), base_time=0.0)          # x.o rebuilt: supersedes
    (session,) = result.sessions
    assert [(t.name, t.start, t.end) for t in session.targets] == [("lib.so.1", 0.0, 0.01), ("x.o", 0.02, 0.03)]
    assert session.targets[0].phases[0].name == "output:lib.so"
    assert [w.line for w in result.warnings] == [5]
    assert session.totals.events == 4


def test_tiny_build_then_bigger_build_is_split_by_the_mtime_clock() -> None:
    t0 = 1_700_000_000  # ninja log v5: mtime ≈ wall clock at the edge's end, in ns
    ns = 10**9
    result = parse_ninja_log(_log(5,
                                  f"0\t500\t{t0 * ns + 500 * 10**6}\ta.o\taa",
                                  # 60 s later another ninja: its first edge ends *later* (800 ms)
                                  f"0\t800\t{(t0 + 60) * ns + 800 * 10**6}\tb.o\tbb",
                                  f"0\t900\t{(t0 + 60) * ns + 900 * 10**6}\tc.o\tcc"))
    assert [len(s.targets) for s in result.sessions] == [1, 2]
    assert result.sessions[1].labels["boundary"] == "mtime-jump"
    assert [s.start for s in result.sessions] == [pytest.approx(t0), pytest.approx(t0 + 60)]


def test_v6_generator_output_mtime_does_not_split_a_build() -> None:
    t0, ns = 1_700_000_000, 10**9  # v6: mtime = edge start, except generator/restat outputs
    result = parse_ninja_log(_log(6,
                                  f"0\t100\t{t0 * ns}\ta.o\taa",
                                  f"100\t9000\t{t0 * ns + 9 * ns}\tbuild.ninja\tbb",  # output mtime at its end
                                  f"9000\t9100\t{t0 * ns + 9 * ns}\tc.o\tcc"))
    assert len(result.sessions) == 1 and len(result.sessions[0].targets) == 3


def test_repeated_header_starts_a_build_and_without_clock_builds_are_chained() -> None:
    data = _log(5, "0\t10\t0\ta\taa") + _log(7, "0\t20\t0\tb\tbb")
    result = parse_ninja_log(data, file_mtime=100.0)
    assert [s.labels["boundary"] for s in result.sessions] == ["first", "header"]
    assert [s.labels["ninja_log_version"] for s in result.sessions] == ["5", "7"]
    # the file was last written when the last build ended; the first build ends where it began
    assert result.sessions[1].finish == pytest.approx(100.0)
    assert result.sessions[0].finish == pytest.approx(result.sessions[1].start)


def test_header_only_log_has_no_builds() -> None:
    assert parse_ninja_log(b"# ninja log v5\n").sessions == []


@pytest.mark.parametrize(("data", "line", "text"), [
    (b"", 1, "not a ninja log"),
    (b"hello\n", 1, "not a ninja log"),
    (b"# ninja log v4\n0\t1\t0\ta\tb\n", 2, "unsupported ninja log version 4"),
    (b"# ninja log v5\n0\t1\t0\ta\taa\n0\t1\t0\n", 3, "expected 5 tab-separated fields"),
    (b"# ninja log v5\nx\t1\t0\ta\taa\n", 2, "milliseconds"),
    (b"# ninja log v5\n0\t1\tnow\ta\taa\n", 2, "mtime"),
    (b"# ninja log v5\n0\t1\t0\ta\tzz\n", 2, "hexadecimal"),
    (b"# ninja log v5\n9\t1\t0\ta\taa\n", 2, "before it starts"),
    (b"# ninja log v5\n0\t1\t0\t\taa\n", 2, "empty output"),
    (b"# ninja log v5\n\n", 2, "empty line"),
    (b"# ninja log v5\n# comment\n", 2, "unexpected comment"),
    (b"# ninja log v5\n0\t1\t0\t\xff\taa\n", 2, "not UTF-8"),
    (b"\x1f\x8bnot really gzip", 1, "gzip"),
])
def test_garbage_is_an_import_format_error_naming_the_line(data: bytes, line: int, text: str) -> None:
    with pytest.raises(ImportFormatError) as info:
        parse_ninja_log(data)
    assert info.value.line == line
    assert text in str(info.value) and str(info.value).startswith(f"line {line}:")
