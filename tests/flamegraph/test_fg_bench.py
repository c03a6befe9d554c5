"""The benchmark's input generator is deterministic and realistic enough to mean something."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_flamegraph import generate
from buildtel.shared.flamegraph import SVGFlameGraphGenerator, read_folded


def test_generator_is_deterministic_distinct_and_deep(tmp_path: Path) -> None:
    a, b = tmp_path / "a.folded", tmp_path / "b.folded"
    generate(a, 3000)
    generate(b, 3000)
    assert a.read_bytes() == b.read_bytes()
    lines = a.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3000
    stacks = [line.rsplit(" ", 1)[0] for line in lines]
    assert len(set(stacks)) == 3000
    depths = [s.count(";") + 1 for s in stacks]
    assert min(depths) >= 4 and max(depths) >= 12
    fs = read_folded(a)
    svg = SVGFlameGraphGenerator().render(fs)
    assert svg == SVGFlameGraphGenerator().render(read_folded(b))
