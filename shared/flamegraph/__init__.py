"""Flame graphs for build data: folded stacks, a merge model, interactive SVGs.

Pure functions and classes: no bus, no I/O except files the caller names.

* :mod:`.folded` -- parse/write folded stacks (flamegraph.pl/inferno/speedscope).
* :mod:`.model` -- :class:`FlameGraphBuilder` / :class:`FlameNode`; targets,
  sessions and trace spans to stacks.
* :mod:`.svg` -- :class:`SVGFlameGraphGenerator`, flamegraph.pl-compatible SVGs.
* :mod:`.diff` -- differential flame graphs (difffolded.pl + flamegraph.pl).
* :mod:`.chart` -- a build's timeline, one lane per worker.
* :mod:`.build` -- what flame graphs of builds add: durations, the build at
  the root, colours by cache result, a legend.
"""

from .build import BuildMarks, fmt_duration
from .chart import BuildChartGenerator, chart_items_from_session
from .diff import DiffStacks, diff_folded, parse_diff_folded, render_diff_svg
from .folded import (
    DEFAULT_UNIT,
    FoldedParseError,
    FoldedStacks,
    Ignored,
    format_folded,
    iter_folded,
    parse_folded,
    read_folded,
    write_folded,
)
from .layout import Layout
from .model import FlameGraphBuilder, FlameNode, Span, target_frames
from .svg import FlameGraphOptions, SVGFlameGraphGenerator

__all__ = [
    "DEFAULT_UNIT",
    "BuildChartGenerator",
    "BuildMarks",
    "DiffStacks",
    "FlameGraphBuilder",
    "FlameGraphOptions",
    "FlameNode",
    "FoldedParseError",
    "FoldedStacks",
    "Ignored",
    "Layout",
    "SVGFlameGraphGenerator",
    "Span",
    "chart_items_from_session",
    "diff_folded",
    "fmt_duration",
    "format_folded",
    "iter_folded",
    "parse_diff_folded",
    "parse_folded",
    "read_folded",
    "render_diff_svg",
    "target_frames",
    "write_folded",
]
