"""Hypothesis properties of folded I/O, layout and differentials."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from buildtel.shared.flamegraph import (
    FoldedStacks,
    SVGFlameGraphGenerator,
    diff_folded,
    format_folded,
    parse_folded,
)

# Frame names as they occur in folded files: no ';', no line breaks, no NUL,
# no surrounding whitespace (the count is separated by the last space).
frame = st.text(
    alphabet=st.characters(blacklist_characters=";\n\r\x00\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029",
                           blacklist_categories=("Cs",)),
    min_size=1, max_size=8,
).map(str.strip).filter(bool)
stack = st.lists(st.sampled_from(["a", "a1", "a-2", "b", "step", "step-2"]) | frame, min_size=1, max_size=6)
stacks = st.lists(st.tuples(stack, st.integers(min_value=0, max_value=10**9)), max_size=40)


def build(items: list[tuple[list[str], int]]) -> FoldedStacks:
    fs = FoldedStacks()
    for frames, count in items:
        fs.add(frames, count)
    return fs


@given(stacks)
@settings(max_examples=200, deadline=None)
def test_folded_output_total_equals_input_total(items: list[tuple[list[str], int]]) -> None:
    text = format_folded(build(items))
    assert parse_folded(text).total == sum(c for _, c in items)
    assert sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines()) == sum(c for _, c in items)


@given(stacks)
@settings(max_examples=200, deadline=None)
def test_parse_write_parse_is_identity(items: list[tuple[list[str], int]]) -> None:
    first = parse_folded(format_folded(build(items)))
    text = format_folded(first)
    second = parse_folded(text)
    assert second == first
    assert format_folded(second) == text


@given(stacks, stacks)
@settings(max_examples=150, deadline=None)
def test_differential_totals_equal_each_side(a: list, b: list) -> None:
    before, after = build(a), build(b)
    d = diff_folded(before, after)
    assert d.before_total == before.total
    assert d.after_total == after.total
    assert d.side("before") == FoldedStacks({k: v for k, v in before.to_dict().items() if v})
    assert d.side("after") == FoldedStacks({k: v for k, v in after.to_dict().items() if v})


@given(stacks)
@settings(max_examples=150, deadline=None)
def test_layout_is_a_proper_tree(items: list[tuple[list[str], int]]) -> None:
    fs = build(items)
    lay = SVGFlameGraphGenerator(minwidth=0).layout(fs)
    total = fs.total
    assert lay.totals[0] == total
    # No frame twice: (depth, name) is unique among the children of a frame,
    # children lie inside their parent and a frame = self + children.
    parents: list[int] = []
    kids: dict[int, list[int]] = {}
    for i, depth in enumerate(lay.depths):
        del parents[depth:]
        if parents:
            kids.setdefault(parents[-1], []).append(i)
        parents.append(i)
    for p, cs in kids.items():
        names = [lay.names[c] for c in cs]
        assert len(names) == len(set(names))
        assert sum(lay.totals[c] for c in cs) + lay.selfs[p] == lay.totals[p]
        for c in cs:
            assert lay.starts[p] <= lay.starts[c]
            assert lay.starts[c] + lay.totals[c] <= lay.starts[p] + lay.totals[p]
    assert sum(lay.selfs) == total
