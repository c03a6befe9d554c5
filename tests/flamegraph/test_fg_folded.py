"""Folded stacks: parsing, merging, errors with line numbers, writing."""

from __future__ import annotations

from pathlib import Path

import pytest

from buildtel.shared.flamegraph import (
    FoldedParseError,
    FoldedStacks,
    format_folded,
    iter_folded,
    parse_folded,
    read_folded,
    write_folded,
)
from buildtel.shared.flamegraph import folded as folded_mod


def test_parse_merges_duplicates_and_tolerates_blank_lines() -> None:
    fs = parse_folded("a;b;c 10\n\n   \na;b 5\na;b;c 7\r\nd\t3\nx y;z  4   \n")
    assert fs.to_dict() == {"a;b;c": 17, "a;b": 5, "d": 3, "x y;z": 4}
    assert fs.total == 29
    assert fs.unit == "us"
    assert fs["a;b;c"] == 17 and fs[("a", "b")] == 5 and fs["nope"] == 0
    assert ("a", "b", "c") in fs


def test_frame_names_keep_spaces_and_unicode() -> None:
    fs = parse_folded("main;std::vector<int> push_back;naïve ƒ 12\n")
    assert list(fs) == [(("main", "std::vector<int> push_back", "naïve ƒ"), 12)]


@pytest.mark.parametrize(
    ("text", "lineno", "reason"),
    [
        ("a;b 1\na;b\n", 2, "expected '<stack> <count>'"),
        ("a 1\nb 2\nc x\n", 3, "not a non-negative integer"),
        ("a 1\nb -3\n", 2, "not a non-negative integer"),
        ("a 1.5\n", 1, "counts must be integers"),
        ("\n\n42\n", 3, "expected '<stack> <count>'"),
        ("a 1\nb\x00c 2\n", 2, "NUL byte"),
        ("a 1\n# comment\n", 2, "not a non-negative integer"),
        ("a ²\n", 1, "not a non-negative integer"),
    ],
)
def test_malformed_lines_name_the_line(text: str, lineno: int, reason: str) -> None:
    with pytest.raises(FoldedParseError) as exc:
        parse_folded(text)
    assert exc.value.lineno == lineno
    assert reason in str(exc.value)
    assert f"line {lineno}" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_read_folded_reports_file_and_line_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny chunks force lines to straddle chunk boundaries.
    monkeypatch.setattr(folded_mod, "_CHUNK_CHARS", 7)
    p = tmp_path / "in.folded"
    p.write_text("".join(f"root;f{i} {i}\n" for i in range(1, 40)) + "root;bad count\n", encoding="utf-8")
    with pytest.raises(FoldedParseError) as exc:
        read_folded(p)
    assert exc.value.lineno == 40
    assert str(p) in str(exc.value)
    p.write_text("".join(f"root;f{i % 5} {i}\n" for i in range(1, 40)) + "root;last 1", encoding="utf-8")
    fs = read_folded(p)
    assert fs.total == sum(range(1, 40)) + 1
    assert len(fs) == 6


def test_format_is_sorted_and_roundtrips(tmp_path: Path) -> None:
    fs = FoldedStacks(unit="ms")
    fs.add(["b", "x"], 2)
    fs.add("a;step-2", 1)
    fs.add(["a", "step", "y"], 3)
    fs.add(["a", "step"], 4)
    text = format_folded(fs)
    # Frame-by-frame order: everything under "step" before "step-2".
    assert text == "a;step 4\na;step;y 3\na;step-2 1\nb;x 2\n"
    assert parse_folded(text, unit="ms") == fs
    out = tmp_path / "o.folded"
    write_folded(out, fs)
    assert out.read_text(encoding="utf-8") == text
    assert read_folded(out, unit="ms") == fs
    assert format_folded({"z;y": 1, "a": 2}) == "a 2\nz;y 1\n"
    assert format_folded(FoldedStacks()) == ""


def test_add_validates() -> None:
    fs = FoldedStacks()
    with pytest.raises(ValueError):
        fs.add(["a;b"], 1)
    with pytest.raises(ValueError):
        fs.add(["a\nb"], 1)
    with pytest.raises(ValueError):
        fs.add([], 1)
    with pytest.raises(ValueError):
        fs.add(["a"], -1)
    with pytest.raises(TypeError):
        fs.add(["a"], 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fs.add(["a"], True)
    with pytest.raises(ValueError):
        FoldedStacks(unit="")
    other = FoldedStacks(unit="ms")
    with pytest.raises(ValueError):
        fs.update(other)


def test_iter_folded_keeps_time_order_without_merging() -> None:
    items = list(iter_folded("a;b 1\nc 2\n\na;b 3\n"))
    assert items == [("a\x00b", 1), ("c", 2), ("a\x00b", 3)]
    with pytest.raises(FoldedParseError) as exc:
        list(iter_folded("a 1\nb x\n"))
    assert exc.value.lineno == 2


def test_parse_accepts_bytes_and_line_iterables() -> None:
    assert parse_folded(b"a;b 2\n").to_dict() == {"a;b": 2}
    assert parse_folded(["a;b 2\n", "a;b 3", ""]).to_dict() == {"a;b": 5}
    with pytest.raises(FoldedParseError) as exc:
        parse_folded(["a 1\n", "\n", "oops\n"])
    assert exc.value.lineno == 3
