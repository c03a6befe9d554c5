"""SVG flame graphs: geometry hand-computed from flamegraph.pl's algorithm.

flamegraph.pl, for image width W (default 1200), xpad 10, frame height h
(16), font size 12: ypad1 = 36, ypad2 = 34, image height
(depthmax + 1) * h + 70; a frame at depth d spans
x = 10 + start * (W - 20) / total, width = total_frame * (W - 20) / total
(both printed %.1f, width as the difference of the printed ends),
y = H - 34 - (d + 1) * h + 1, height h - 1; frames narrower than minwidth
(0.1 px) are dropped.  Percentages are 100 * count / total, %.2f.
"""

from __future__ import annotations

import base64
import re
import struct
import xml.etree.ElementTree as ET
import zlib

import pytest

from buildtel.shared.flamegraph import (
    FlameGraphBuilder,
    SVGFlameGraphGenerator,
    parse_folded,
)
from buildtel.shared.flamegraph.colors import PALETTES, frame_color, perl_name_rand

SVGNS = "{http://www.w3.org/2000/svg}"


def frames(svg: str) -> list[dict[str, str]]:
    """Drawn frames, in document order, parsed as XML (so the SVG must be well formed)."""
    root = ET.fromstring(svg)
    group = root.find(f".//{SVGNS}g[@id='frames']")
    assert group is not None
    out = []
    for g in group:
        rect = g.find(f"{SVGNS}rect")
        text = g.find(f"{SVGNS}text")
        title = g.find(f"{SVGNS}title")
        assert rect is not None and text is not None and title is not None
        out.append({
            "title": title.text or "", "x": rect.get("x"), "y": rect.get("y"),
            "w": rect.get("width"), "h": rect.get("height"), "fill": rect.get("fill"),
            "label": text.text or "", "tx": text.get("x"), "ty": text.get("y"),
            "s": g.get("data-s"), "t": g.get("data-t"), "d": g.get("data-d"),
        })
    return out


def by_name(svg: str) -> dict[str, dict[str, str]]:
    return {f["title"].split(" (")[0]: f for f in frames(svg)}


def geometry(svg: str) -> list[tuple[str, str, str, str]]:
    return [(f["title"].split(" (")[0], f["x"], f["y"], f["w"]) for f in frames(svg)]


def test_small_input_hand_computed() -> None:
    # total 100 -> 11.8 px per count; depthmax 2 -> height 3*16 + 70 = 118
    svg = SVGFlameGraphGenerator().render(parse_folded("a;b 30\na;c 10\nd 60\n"))
    assert 'width="1200" height="118"' in svg
    assert geometry(svg) == [
        ("all", "10.0", "69", "1180.0"),
        ("a", "10.0", "53", "472.0"),
        ("b", "10.0", "37", "354.0"),
        ("c", "364.0", "37", "118.0"),
        ("d", "482.0", "53", "708.0"),
    ]
    f = by_name(svg)
    assert f["all"]["title"] == "all (100 us, 100%)"
    assert f["a"]["title"] == "a (40 us, 40.00%; self 0 us)"
    assert f["c"]["title"] == "c (10 us, 10.00%; self 10 us)"
    assert f["d"]["h"] == "15.0" and f["d"]["ty"] == "63.5" and f["d"]["tx"] == "485.00"
    # labels: int(width / (12 * 0.59)) characters, ".." when cut, none under 3
    assert (f["a"]["label"], f["all"]["label"]) == ("a", "")


def test_minwidth_drops_frames_narrower_than_a_tenth_of_a_pixel() -> None:
    # total 100000: 0.0118 px per count, so 8 counts = 0.0944 px (dropped), 9 = 0.1062 px (kept)
    text = "big 99983\nsmall8 8\nsmall9 9\n"
    names = [g[0] for g in geometry(SVGFlameGraphGenerator().render(parse_folded(text)))]
    assert names == ["all", "big", "small9"]
    names = [g[0] for g in geometry(SVGFlameGraphGenerator(minwidth=0).render(parse_folded(text)))]
    assert names == ["all", "big", "small8", "small9"]
    # minwidth in pixels: 9 counts = 0.1062 px < 0.2
    names = [g[0] for g in geometry(SVGFlameGraphGenerator(minwidth=0.2).render(parse_folded(text)))]
    assert names == ["all", "big"]
    # percentage of the total, as flamegraph.pl's --minwidth=N%
    names = [g[0] for g in geometry(SVGFlameGraphGenerator(minwidth="0.009%").render(parse_folded(text)))]
    assert names == ["all", "big", "small9"]


def test_step_and_step2_are_never_split() -> None:
    # flamegraph.pl sorts lines as strings: "a;step 5" < "a;step-2;x 3" < "a;step;y 2"
    # and so draws "step" twice.  We draw it once, with self and child.
    text = "a;step 5\na;step-2;x 3\na;step;y 2\n"
    svg = SVGFlameGraphGenerator().render(parse_folded(text))
    g = geometry(svg)
    assert [n for n, *_ in g].count("step") == 1
    # total 10 -> 118 px per count
    assert g == [
        ("all", "10.0", "85", "1180.0"),
        ("a", "10.0", "69", "1180.0"),
        ("step", "10.0", "53", "826.0"),
        ("y", "600.0", "37", "236.0"),
        ("step-2", "836.0", "53", "354.0"),
        ("x", "836.0", "37", "354.0"),
    ]
    assert by_name(svg)["step"]["title"] == "step (7 us, 70.00%; self 5 us)"
    keys = [(f["title"].split(" (")[0], f["d"]) for f in frames(svg)]
    assert len(keys) == len(set(keys))


def test_sibling_order_matches_flamegraph_pl() -> None:
    # flamegraph.pl sorts "p;lib2;y" before "p;lib;x" ('2' < ';'), so lib2 is drawn first.
    svg = SVGFlameGraphGenerator().render(parse_folded("p;lib;x 10\np;lib2;y 30\n"))
    g = {n: (x, w) for n, x, _, w in geometry(svg)}
    # total 40 -> 29.5 px per count
    assert g["lib2"] == ("10.0", "885.0") and g["lib"] == ("895.0", "295.0")
    assert g["y"] == ("10.0", "885.0") and g["x"] == ("895.0", "295.0")


def test_output_is_byte_identical_and_order_independent() -> None:
    text = "".join(f"main;m{i % 7};f{i % 13};leaf{i} {i * 37 % 101 + 1}\n" for i in range(500))
    gen = SVGFlameGraphGenerator(title="T")
    one = gen.render(parse_folded(text))
    two = SVGFlameGraphGenerator(title="T").render(parse_folded(text))
    shuffled = "".join(reversed(text.splitlines(keepends=True)))
    three = gen.render(parse_folded(shuffled))
    assert one == two == three


def test_colours_are_flamegraph_pl_name_seeded() -> None:
    # Values flamegraph.pl produces for these names (srand(sum of ord); rand -> drand48).
    assert frame_color("hot", "c") == "rgb(224,87,20)"
    assert frame_color("hot", "") == "rgb(213,39,9)"
    assert abs(perl_name_rand("c") - 0.3807) < 1e-3
    svg = SVGFlameGraphGenerator().render(parse_folded("c 1\n"))
    f = by_name(svg)
    assert f["all"]["fill"] == "rgb(213,39,9)" and f["c"]["fill"] == "rgb(224,87,20)"
    svg = SVGFlameGraphGenerator().render(parse_folded("x;- 1\nx;-- 1\n"))
    assert by_name(svg)["-"]["fill"] == "rgb(200,200,200)"
    assert by_name(svg)["--"]["fill"] == "rgb(160,160,160)"


@pytest.mark.parametrize("palette", PALETTES)
@pytest.mark.parametrize("hashed", [False, True])
def test_every_palette_is_deterministic(palette: str, hashed: bool) -> None:
    text = "java/lang/Thread;std::vector::push;foo.js:12;Perl_pp;swapper_[k];app_[j] 5\n"
    a = SVGFlameGraphGenerator(colors=palette, hash=hashed).render(parse_folded(text))
    b = SVGFlameGraphGenerator(colors=palette, hash=hashed).render(parse_folded(text))
    assert a == b
    fills = {f["fill"] for f in frames(a)}
    assert all(re.fullmatch(r"rgb\(\d+,\d+,\d+\)", c) for c in fills)


def test_options_title_subtitle_inverted_countname_height() -> None:
    fs = parse_folded("a;b 3\na 1\n")
    svg = SVGFlameGraphGenerator(inverted=True, subtitle="sub & <x>", countname="samples",
                                 height=20, title="T <1>").render(fs)
    root = ET.fromstring(svg)
    assert root.find(f".//{SVGNS}text[@id='title']").text == "T <1>"  # type: ignore[union-attr]
    assert root.find(f".//{SVGNS}text[@id='subtitle']").text == "sub & <x>"  # type: ignore[union-attr]
    # icicle: depth d at y = ypad1 + ypad3 + d*h = 36 + 24 + 20d; height h - 1
    assert [(n, y) for n, _, y, _ in geometry(svg)] == [("all", "60"), ("a", "80"), ("b", "100")]
    assert by_name(svg)["b"]["title"] == "b (3 samples, 75.00%; self 3 samples)"
    assert by_name(svg)["b"]["h"] == "19.0"
    assert "Icicle Graph" in SVGFlameGraphGenerator(inverted=True).render(fs)
    assert "Flame Chart" in SVGFlameGraphGenerator(flamechart=True).render(fs)


def test_reverse_merges_leaf_first() -> None:
    svg = SVGFlameGraphGenerator(reverse=True).render(parse_folded("a;x 1\nb;x 2\nc;y 3\n"))
    f = by_name(svg)
    assert f["x"]["t"] == "3" and f["y"]["t"] == "3" and f["x"]["d"] == "1"


def test_flamechart_keeps_time_order_and_only_merges_neighbours(tmp_path) -> None:
    p = tmp_path / "chart.folded"
    p.write_text("a;b 1\na;c 2\na;b 3\nd 4\n", encoding="utf-8")
    svg = SVGFlameGraphGenerator(flamechart=True).render_file(p)
    g = [(f["title"].split(" (")[0], f["s"], f["t"]) for f in frames(svg)]
    assert g == [("all", "0", "10"), ("a", "0", "6"), ("b", "0", "1"), ("c", "1", "2"),
                 ("b", "3", "3"), ("d", "6", "4")]


def test_xml_escaping_and_annotations() -> None:
    text = 'main;std::map<int, "x"> & co 2\nmain;do_sys_open_[k] 1\nmain;ctl\x01x 1\n'
    svg = SVGFlameGraphGenerator().render(parse_folded(text))
    f = by_name(svg)  # parsing as XML proves escaping
    assert 'std::map<int, "x"> & co' in f
    assert "do_sys_open" in f  # perf annotation stripped for display, as flamegraph.pl
    assert "ctl\ufffdx" in f


def test_search_data_embeds_every_line() -> None:
    text = "big 99983\nsmall;t1 8\nsmall;t2 9\n"
    svg = SVGFlameGraphGenerator().render(parse_folded(text))
    lines = re.search(r'<metadata id="fg-lines">([^<]*)</metadata>', svg).group(1)  # type: ignore[union-attr]
    counts = re.search(r'<metadata id="fg-counts">([^<]*)</metadata>', svg).group(1)  # type: ignore[union-attr]
    keys = zlib.decompress(base64.b64decode(lines)).decode().split("\n")
    raw = zlib.decompress(base64.b64decode(counts))
    assert keys == ["big", "small\x00t1", "small\x00t2"]
    assert list(struct.unpack(f"<{len(keys)}d", raw)) == [99983, 8, 9]
    assert '<metadata id="fg-lines"' not in SVGFlameGraphGenerator(search_data=False).render(parse_folded(text))


def test_empty_and_zero_inputs_render_a_message() -> None:
    assert "No stack counts" in SVGFlameGraphGenerator().render(parse_folded(""))
    assert "No stack counts" in SVGFlameGraphGenerator().render(parse_folded("a 0\n"))


def test_invalid_options() -> None:
    with pytest.raises(ValueError):
        SVGFlameGraphGenerator(colors="rainbow")
    with pytest.raises(ValueError):
        SVGFlameGraphGenerator(minwidth="abc")
    with pytest.raises(ValueError):
        SVGFlameGraphGenerator(width=10)
    with pytest.raises(ValueError):
        SVGFlameGraphGenerator(bgcolors="plaid")


def test_builder_and_mapping_inputs() -> None:
    b = FlameGraphBuilder()
    b.add_stack(["a", "b"], 3)
    gen = SVGFlameGraphGenerator()
    assert gen.render(b) == gen.render(b.stacks) == gen.render({"a;b": 3})
    assert gen.render([(("a", "b"), 1), ("a;b", 2)]) == gen.render(b.stacks)
