"""Interactive SVG flame graphs, drawn the way flamegraph.pl draws them.

For the same folded input and options this draws the same frames, at the
same pixel positions and widths, with the same counts and percentages as
flamegraph.pl (geometry: ``x = xpad + start * (width - 2*xpad) / total``,
frames narrower than ``minwidth`` dropped, ``%0.1f`` rounding).  Deliberate
differences, each a flamegraph.pl bug or a requirement of ours:

* a frame is never drawn twice: flamegraph.pl merges frames by sorting whole
  lines as strings, so ``step`` with self time is split around a sibling
  ``step-2``; we merge by frame and order siblings by name;
* colours are a pure function of the frame name (flamegraph.pl's default
  name-seeded colours, reproduced exactly; ``--random`` is not offered), so
  output is byte-identical run to run;
* hover details include self time as well as total;
* search "Matched" counts frames too narrow to draw (see ``svg_script``);
* with ``inverted`` and a subtitle, frames start below the subtitle.

Given :class:`~.build.BuildMarks` (flame graphs of builds, never of folded
files) it says more: durations instead of raw counts (unless ``countname`` is
set), the build named at the root and in the title, colours by cache result
with the ``cache`` palette, and a legend.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

from .build import (
    BuildMarks,
    category_color,
    category_name,
    fmt_duration,
    fmt_signed_duration,
    legend_entries,
    legend_svg,
)
from .colors import PALETTES, background_colors, diff_color, frame_color
from .folded import FoldedStacks, iter_folded, read_folded
from .layout import Layout, layout_merged, layout_sequence, reverse_key
from .svg_script import CSS, SCRIPT
from .xmltext import escape_xml
from .xmltext import perl_num as _num

__all__ = ["FLAME_OPTIONS", "FlameGraphOptions", "SVGFlameGraphGenerator", "escape_xml"]

XPAD = 10  # flamegraph.pl: pad left and right
FRAMEPAD = 1  # vertical gap between frames
_BACKGROUND_LINES = 20_000  # from this many input lines the search data is deflated in a thread


# The FlameGraphOptions a caller sets (the CLI's flags, the analyzer's request fields); the rest
# keep flamegraph.pl's defaults.  Here, beside the options, so drawing needs no bus module.
FLAME_OPTIONS = ("title", "subtitle", "width", "height", "minwidth", "countname", "colors", "hash", "reverse",
                 "inverted", "flamechart", "negate", "search_data")


@dataclass(frozen=True, slots=True)
class FlameGraphOptions:
    """flamegraph.pl's options (same names and defaults, where they exist)."""

    title: str | None = None  # default: Flame Graph / Icicle Graph / Flame Chart
    subtitle: str = ""
    width: int = 1200  # image width, pixels
    height: int = 16  # frame height, pixels
    minwidth: float | str = 0.1  # pixels, or "N%" of the total
    countname: str | None = None  # default: the stacks' unit
    nametype: str = "Function:"
    colors: str = "hot"
    hash: bool = False  # flamegraph.pl --hash colouring
    bgcolors: str | None = None
    fonttype: str = "Verdana"
    fontsize: float = 12
    fontwidth: float = 0.59
    reverse: bool = False
    inverted: bool = False
    flamechart: bool = False
    negate: bool = False  # differentials: swap red and blue
    notes: str = ""
    searchcolor: str = "rgb(230,0,230)"
    root_name: str = "all"
    # Embed every input line so "Matched" counts frames too narrow to draw.
    # Costs SVG size proportional to the input; off means flamegraph.pl's
    # behaviour (only drawn frames count).
    search_data: bool = True

    def __post_init__(self) -> None:
        if self.colors not in PALETTES:
            raise ValueError(f"unknown colors {self.colors!r}; choose from {', '.join(PALETTES)}")
        if self.width <= 2 * XPAD:
            raise ValueError("width must exceed the 20 px of padding")
        if self.height <= 0 or self.fontsize <= 0 or self.fontwidth <= 0:
            raise ValueError("height, fontsize and fontwidth must be positive")
        self.minwidth_spec()  # validates
        background_colors(self.colors, self.bgcolors)  # validates

    def minwidth_spec(self) -> tuple[float, bool]:
        """``(value, is_percent)``."""
        mw = self.minwidth
        if isinstance(mw, str):
            pct = mw.endswith("%")
            try:
                value = float(mw[:-1] if pct else mw)
            except ValueError:
                raise ValueError(f"minwidth {mw!r} is not a number or percentage") from None
        else:
            pct, value = False, float(mw)
        if value < 0:
            raise ValueError("minwidth cannot be negative")
        return value, pct

    def resolved_title(self) -> str:
        if self.title:
            return self.title
        if self.flamechart:
            return "Flame Chart"
        return "Icicle Graph" if self.inverted else "Flame Graph"


def _strip_annotation(name: str) -> str:
    # flamegraph.pl drops perf-style _[k]/_[w]/_[i]/_[j] suffixes when showing names.
    if len(name) > 4 and name[-4:-2] == "_[" and name[-1] == "]" and name[-2] in "kwij":
        return name[:-4]
    return name


StacksInput = FoldedStacks | Mapping[str, int] | Iterable[tuple[Sequence[str] | str, int]]


def _keys_counts(stacks: StacksInput) -> tuple[dict[str, int], str | None]:
    """Normalise any accepted input to SEP-keyed counts (+ unit if known)."""
    builder_stacks = getattr(stacks, "stacks", None)
    if isinstance(builder_stacks, FoldedStacks):  # a FlameGraphBuilder
        stacks = builder_stacks
    if isinstance(stacks, FoldedStacks):
        return stacks.keys_counts, stacks.unit
    fs = FoldedStacks(stacks)
    return fs.keys_counts, None


class SVGFlameGraphGenerator:
    """Render folded stacks to an interactive SVG.

    >>> gen = SVGFlameGraphGenerator(title="Build", width=1200)
    >>> svg = gen.render(read_folded("build.folded"))   # doctest: +SKIP
    """

    def __init__(self, options: FlameGraphOptions | None = None, **overrides: object) -> None:
        base = options or FlameGraphOptions()
        self.options = replace(base, **overrides) if overrides else base  # type: ignore[arg-type]

    # ------------------------------------------------------------------ layout
    def _minwidth_count(self, total: int) -> float:
        value, pct = self.options.minwidth_spec()
        if pct:
            return total * value / 100.0
        return value * total / (self.options.width - 2 * XPAD)

    def _categories(self, marks: BuildMarks | None) -> dict[str, int] | None:
        if marks is None or self.options.colors != "cache":
            return None
        if not self.options.reverse:
            return dict(marks.categories)
        return {reverse_key(k): v for k, v in marks.categories.items()}

    def layout(self, stacks: StacksInput, marks: BuildMarks | None = None) -> Layout:
        """Frames that will be drawn (count units), honouring reverse/flamechart."""
        counts, _ = _keys_counts(stacks)
        if self.options.flamechart:
            return self.layout_sequence(counts.items(), marks)
        cats = self._categories(marks)
        if self.options.reverse:
            rev: dict[str, int] = {}
            for k, v in counts.items():
                rk = reverse_key(k)
                rev[rk] = rev.get(rk, 0) + v
            counts = rev
            if cats is not None:  # reversed keys merge: their bits too
                cats = {}
                for k, v in marks.categories.items():  # type: ignore[union-attr]
                    rk = reverse_key(k)
                    cats[rk] = cats.get(rk, 0) | v
        total = sum(counts.values())
        return layout_merged(
            counts, minwidth_count=self._minwidth_count(total), root_name=self.options.root_name,
            categories=cats,
        )

    def layout_sequence(self, items: Iterable[tuple[str, int]], marks: BuildMarks | None = None) -> Layout:
        """Flame-chart layout of SEP-keyed lines in time order."""
        if self.options.reverse:
            items = ((reverse_key(k), v) for k, v in items)
        value, pct = self.options.minwidth_spec()
        frac = value / 100.0 if pct else value / (self.options.width - 2 * XPAD)
        return layout_sequence(items, minwidth_fraction=frac, root_name=self.options.root_name,
                               categories=self._categories(marks))

    # ------------------------------------------------------------------ render
    def render(self, stacks: StacksInput, *, unit: str | None = None, marks: BuildMarks | None = None) -> str:
        counts, counts_unit = _keys_counts(stacks)  # consume iterables once
        fs = FoldedStacks._from_keys(counts, counts_unit or "us")
        return self.render_layout(self.layout(fs, marks), unit=unit or counts_unit, marks=marks)

    def render_file(self, path: str | os.PathLike[str], *, unit: str = "us") -> str:
        """Parse a folded file and render it (time order kept for flame charts)."""
        if self.options.flamechart:
            with open(path, encoding="utf-8") as fh:
                lay = self.layout_sequence(iter_folded(fh, name=os.fspath(path)))
            return self.render_layout(lay, unit=unit)
        return self.render(read_folded(path, unit=unit))

    def write(self, dest: str | os.PathLike[str], stacks: StacksInput) -> None:
        with open(dest, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(self.render(stacks))

    def render_layout(self, lay: Layout, *, unit: str | None = None, marks: BuildMarks | None = None) -> str:
        o = self.options
        countname = escape_xml(o.countname or unit or "us")
        # Builds' counts are microseconds: shown as durations unless a count name was asked for.
        durations = marks is not None and o.countname is None

        def amount(v: int) -> str:
            return fmt_duration(v) if durations else f"{v:,} {countname}"

        fontsize, fh = o.fontsize, o.height
        ypad1 = fontsize * 3
        ypad2 = fontsize * 2 + 10
        ypad3 = fontsize * 2 if o.subtitle else 0
        width = o.width
        if lay.timemax <= 0:
            return self._render_empty()
        legend = self._legend(lay, marks)
        ypad3 += fontsize * 2 if legend else 0  # the legend's row, under the (sub)title
        height = (lay.depthmax + 1) * fh + ypad1 + ypad2 + ypad3
        wpt = (width - 2 * XPAD) / lay.timemax
        timemax = lay.timemax

        # Everything that depends only on depth or name is computed once.
        rowy: list[tuple[str, str]] = []
        rect_h = f"{fh - FRAMEPAD:.1f}"
        for depth in range(lay.depthmax + 1):
            if o.inverted:
                y1 = ypad1 + ypad3 + depth * fh
                y2 = ypad1 + ypad3 + (depth + 1) * fh - FRAMEPAD
            else:
                y1 = height - ypad2 - (depth + 1) * fh + FRAMEPAD
                y2 = height - ypad2 - depth * fh
            rowy.append((_num(y1), _num(3 + (y1 + y2) / 2)))
        glyph = fontsize * o.fontwidth
        colors: dict[str, str] = {}
        escaped: dict[str, tuple[str, str]] = {}
        palette, hashed = o.colors, o.hash
        deltas = lay.deltas
        maxdelta = lay.maxdelta
        cats = lay.cats if palette == "cache" else None
        root_name = marks.root if marks is not None else o.root_name

        tail = self._tail_beside(lay)
        out: list[str] = []
        add = out.append
        for i, (name, depth, start, tstart, total, self_count) in enumerate(
            zip(lay.names, lay.depths, lay.starts, lay.tstarts, lay.totals, lay.selfs, strict=True)
        ):
            x1 = XPAD + start * wpt
            x2 = XPAD + (start + total) * wpt
            # flamegraph.pl prints both ends with %.1f and the width as the
            # difference of those printed numbers; round() gives the same doubles.
            r1 = round(x1, 1)
            x1s = f"{r1:.1f}"
            ws = f"{round(x2, 1) - r1:.1f}"
            y1s, tys = rowy[depth]
            if depth == 0:
                info = f"{escape_xml(root_name)} ({amount(total)}, 100%)"
                cname, label = "", ""
                if marks is not None:  # a build's root says which build (flamegraph.pl: blank)
                    chars = int((x2 - x1) / glyph)
                    if chars >= 3:
                        label = escape_xml(root_name if chars >= len(root_name) else root_name[: chars - 2] + "..")
            else:
                esc = escaped.get(name)
                if esc is None:
                    shown = _strip_annotation(name)
                    esc = escaped[name] = (escape_xml(shown), shown)
                pct = f"{100 * total / timemax:.2f}"
                if deltas is not None:
                    d = -deltas[i] if o.negate else deltas[i]
                    dp = f"{'+' if d > 0 else ''}{100 * d / timemax:.2f}%"
                    if durations:
                        dp += f" = {fmt_signed_duration(deltas[i])}"
                    info = f"{esc[0]} ({amount(total)}, {pct}%; {dp}; self {amount(self_count)})"
                else:
                    info = f"{esc[0]} ({amount(total)}, {pct}%; self {amount(self_count)})"
                cname = name
                chars = int((x2 - x1) / glyph)
                if chars >= 3:
                    shown = esc[1]
                    label = escape_xml(shown if chars >= len(shown) else shown[: chars - 2] + "..")
                else:
                    label = ""
            if deltas is not None and name not in ("-", "--"):
                color = diff_color(deltas[i], maxdelta, negate=o.negate)
            elif cats is not None:
                color = category_color(category_name(cats[i]), cname)
            else:
                known = colors.get(cname)
                if known is not None:
                    color = known
                else:
                    if cname == "--":
                        color = "rgb(160,160,160)"
                    elif cname == "-":
                        color = "rgb(200,200,200)"
                    else:
                        color = frame_color(palette, cname, hash=hashed)
                    colors[cname] = color
            add(
                f'<g data-s="{start}" data-t="{total}" data-d="{depth}" data-c="{tstart}"><title>{info}</title>'
                f'<rect x="{x1s}" y="{y1s}" width="{ws}" height="{rect_h}" fill="{color}" rx="2" ry="2"/>'
                f'<text x="{x1 + 3:.2f}" y="{tys}">{label}</text></g>\n'
            )
        # One join over all the pieces: no intermediate copies of a large SVG.
        title = o.title or ("Differential Flame Graph" if deltas is not None else o.resolved_title())
        if marks is not None and not o.title:
            title += f": {marks.root} ({fmt_duration(timemax)})"
        parts = self._chrome(height, timemax, title, lay)
        if legend:
            parts.insert(-1, legend_svg(legend, y=ypad1 + ypad3 - fontsize * 0.8, fontsize=fontsize,
                                        fontwidth=o.fontwidth, xpad=XPAD))
        parts.extend(out)
        del out
        parts.extend(tail())
        return "".join(parts)

    # ------------------------------------------------------------------ pieces
    def _legend(self, lay: Layout, marks: BuildMarks | None) -> list[tuple[str, str]]:
        """What the colours mean, for builds: slower/faster, or the cache categories drawn."""
        if marks is None:
            return []
        if lay.deltas is not None:
            slower, faster = "slower (more time after)", "faster (less time after)"
            red, blue = (faster, slower) if self.options.negate else (slower, faster)
            return [(red, "rgb(255,60,60)"), (blue, "rgb(60,60,255)"), ("unchanged", "rgb(255,255,255)")]
        if lay.cats is None or self.options.colors != "cache":
            return []
        return legend_entries({category_name(c) for c in lay.cats[1:]} or {"other"})

    def _chrome(self, height: float, timemax: int, title: str, lay: Layout) -> list[str]:
        o = self.options
        width, fontsize = o.width, o.fontsize
        hs = _num(height)
        bg1, bg2 = background_colors(o.colors, o.bgcolors)
        config = {
            "xpad": XPAD, "width": width, "fontsize": fontsize, "fontwidth": o.fontwidth,
            "nametype": o.nametype, "searchcolor": o.searchcolor, "timemax": timemax,
            "lines": bool(o.search_data and lay.line_keys),
        }
        css = CSS % {"font": o.fonttype, "fontsize": _num(fontsize), "titlesize": _num(fontsize + 5)}
        notes = escape_xml(o.notes).replace("--", "- -")
        parts = [
            '<?xml version="1.0" standalone="no"?>\n'
            '<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
            '"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
            f'<svg version="1.1" width="{width}" height="{hs}" onload="init(evt)" '
            f'viewBox="0 0 {width} {hs}" xmlns="http://www.w3.org/2000/svg" '
            'xmlns:xlink="http://www.w3.org/1999/xlink">\n'
            "<!-- Flame graph: builder-telemetry buildtel.shared.flamegraph (flamegraph.pl layout). -->\n"
            f"<!-- NOTES: {notes} -->\n"
            '<defs>\n\t<linearGradient id="background" y1="0" y2="1" x1="0" x2="0" >\n'
            f'\t\t<stop stop-color="{bg1}" offset="5%" />\n'
            f'\t\t<stop stop-color="{bg2}" offset="95%" />\n'
            "\t</linearGradient>\n</defs>\n"
            f'<style type="text/css">\n{css}</style>\n'
            '<script type="text/ecmascript">\n<![CDATA[\n'
            f"var FG = {json.dumps(config, sort_keys=True)};\n{SCRIPT}]]>\n</script>\n",
            f'<rect x="0.0" y="0" width="{width}.0" height="{hs}" fill="url(#background)"/>\n',
        ]
        text_y = _num(height - (fontsize * 2 + 10) / 2)  # half of the bottom padding
        top = _num(fontsize * 2)
        parts.append(f'<text id="title" x="{width // 2:.2f}" y="{top}">{escape_xml(title)}</text>\n')
        if o.subtitle:
            parts.append(f'<text id="subtitle" x="{width // 2:.2f}" y="{_num(fontsize * 4)}">'
                         f"{escape_xml(o.subtitle)}</text>\n")
        parts.append(f'<text id="details" x="{XPAD:.2f}" y="{text_y}"> </text>\n')
        parts.append(f'<text id="unzoom" x="{XPAD:.2f}" y="{top}" class="hide">Reset Zoom</text>\n')
        parts.append(f'<text id="search" x="{width - XPAD - 100:.2f}" y="{top}">Search</text>\n')
        parts.append(f'<text id="ignorecase" x="{width - XPAD - 16:.2f}" y="{top}">ic</text>\n')
        parts.append(f'<text id="matched" x="{width - XPAD - 100:.2f}" y="{text_y}" class="hide"> </text>\n')
        parts.append('<g id="frames">\n')
        return parts

    def _tail_beside(self, lay: Layout) -> Callable[[], list[str]]:
        """:meth:`_tail`, for a large input computed in a thread while the frames are drawn: the
        search data is every input line deflated (a third of a 100k-line drawing's time), needs
        nothing from the frames, and zlib releases the GIL while it works."""
        if not (self.options.search_data and len(lay.line_keys) >= _BACKGROUND_LINES):
            return lambda: self._tail(lay)
        box: list[list[str] | BaseException] = []

        def run() -> None:
            try:
                box.append(self._tail(lay))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box.append(exc)

        worker = threading.Thread(target=run, name="flamegraph-search-data", daemon=True)
        worker.start()

        def result() -> list[str]:
            worker.join()
            if isinstance(box[0], BaseException):
                raise box[0]
            return box[0]

        return result

    def _tail(self, lay: Layout) -> list[str]:
        if not (self.options.search_data and lay.line_keys):
            return ["</g>\n</svg>\n"]
        return ["</g>\n", *_lines_metadata(lay), "</svg>\n"]

    def _render_empty(self) -> str:
        o = self.options
        h = _num(o.fontsize * 5)
        return (
            '<?xml version="1.0" standalone="no"?>\n'
            f'<svg version="1.1" width="{o.width}" height="{h}" viewBox="0 0 {o.width} {h}" '
            'xmlns="http://www.w3.org/2000/svg">\n'
            f'<text x="{o.width // 2:.2f}" y="{_num(o.fontsize * 2)}" text-anchor="middle" '
            f'font-family="{escape_xml(o.fonttype)}" font-size="{_num(o.fontsize)}">'
            "No stack counts to draw.</text>\n</svg>\n"
        )


def _lines_metadata(lay: Layout) -> list[str]:
    """Every input line, zlib-compressed and base64-encoded, for search."""
    comp = zlib.compressobj(1)  # level 1: the size gain of higher levels is not worth the time
    chunks = []
    keys = lay.line_keys
    step = 50_000
    for i in range(0, len(keys), step):
        chunks.append(comp.compress("\n".join(keys[i:i + step]).encode("utf-8")))
        if i + step < len(keys):
            chunks.append(comp.compress(b"\n"))
    chunks.append(comp.flush())
    counts = array("d", lay.line_counts)
    if sys.byteorder != "little":
        counts.byteswap()  # the script reads little-endian Float64Array
    packed = b"".join(chunks)
    del chunks
    lines_b64 = base64.b64encode(packed).decode("ascii")
    del packed
    counts_b64 = base64.b64encode(zlib.compress(counts.tobytes(), 1)).decode("ascii")
    return [
        '<metadata id="fg-lines">', lines_b64, "</metadata>\n",
        '<metadata id="fg-counts">', counts_b64, "</metadata>\n",
    ]


def option_names() -> list[str]:
    """Names accepted by :class:`FlameGraphOptions` (for CLIs)."""
    return [f.name for f in fields(FlameGraphOptions)]

