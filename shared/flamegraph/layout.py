"""Frame geometry in count units: which frames are drawn, where, how wide.

Two layouts, both following flamegraph.pl's rules (a frame narrower than the
minimum width is dropped with everything above it; the root ``all`` spans
the total):

* :func:`layout_merged` -- the flame graph.  Stacks are merged and siblings
  ordered by name.  The keys are sorted once; because the frame separator is
  NUL (see ``folded.py``) every node of the call tree is a contiguous run of
  sorted keys, so a child's extent is one ``bisect`` and its total one
  subtraction of prefix sums.  Only frames that will be drawn (and the
  siblings we must step over) are visited, never the whole tree: a 1M-line
  input with millions of tree nodes draws a few thousand frames, and the
  cost follows the frames drawn.
* :func:`layout_sequence` -- the flame chart.  Lines stay in input (time)
  order and only adjacent identical frames merge, as flamegraph.pl's
  ``--flamechart`` does.

A node is a frame: name, depth (root 0), start and total in counts, self
count, and optionally a differential delta.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate

from .folded import SEP

__all__ = ["Layout", "layout_merged", "layout_sequence", "reverse_key"]

_AFTER_SEP = chr(ord(SEP) + 1)


@dataclass(slots=True)
class Layout:
    """Drawn frames in pre-order (parents before children, siblings in order).

    ``starts`` place frames (flamegraph.pl's sibling order); ``tstarts`` are
    the same frames' offsets in ``line_keys`` order.  ``line_keys`` /
    ``line_counts`` are the input lines in the order the layout read them
    (sorted frame by frame, or time order for flame charts); a frame covers
    the lines whose cumulative offset lies in ``[tstart, tstart + total)``.
    The SVG embeds them so a search can count frames too narrow to draw.
    """

    names: list[str] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    tstarts: list[int] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)
    selfs: list[int] = field(default_factory=list)
    deltas: list[int] | None = None
    cats: list[int] | None = None  # per frame: OR of its lines' category bits (builds only)
    timemax: int = 0
    depthmax: int = 0
    maxdelta: int = 1
    line_keys: list[str] = field(default_factory=list)
    line_counts: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def frames(self) -> list[tuple[str, int, int, int, int]]:
        """``(name, depth, start, total, self)`` per drawn frame (for tests/tools)."""
        return list(zip(self.names, self.depths, self.starts, self.totals, self.selfs, strict=True))


# A child frame waiting to be queued: (prefix, lo, hi, depth, name, self, delta) -- a work item
# of layout_merged without its x, which is known only once its preceding siblings are placed.
_Child = tuple[str, int, int, int, str, int, int]


def _prefix_sums(vals: list[int]) -> array[int] | list[int]:
    """Cumulative counts.  A machine-integer array holds a million of them in
    8 MB instead of ~40 MB of int objects; totals beyond 2**63 (not a real
    profile, but legal input) fall back to a list."""
    try:
        return array("q", accumulate(vals, initial=0))
    except OverflowError:
        return list(accumulate(vals, initial=0))


def reverse_key(key: str) -> str:
    """The same stack leaf first (flamegraph.pl ``--reverse``)."""
    return SEP.join(reversed(key.split(SEP)))


def layout_merged(
    counts: Mapping[str, int],
    *,
    minwidth_count: float,
    root_name: str = "all",
    deltas: Mapping[str, int] | None = None,
    delta_mode: str = "self",
    categories: Mapping[str, int] | None = None,
) -> Layout:
    """Lay out merged stacks (SEP-joined keys -> counts).

    A frame is drawn when its total >= ``minwidth_count`` (flamegraph.pl drops
    ``total < minwidth``).  With ``deltas`` (key -> after-minus-before) each
    drawn frame also gets a delta: its own (``self``, as flamegraph.pl colours
    differentials) or its subtree's (``total``).  With ``categories`` (key ->
    bits) each drawn frame gets the OR of its lines' bits in ``cats``.
    """
    keys = sorted(counts)
    vals = list(map(counts.__getitem__, keys))
    cum = _prefix_sums(vals)
    n = len(keys)
    out = Layout(line_keys=keys, line_counts=vals, timemax=cum[-1])
    names, depths, starts, totals, selfs = out.names, out.depths, out.starts, out.totals, out.selfs
    tstarts = out.tstarts

    dvals: list[int] | None = None
    dcum: list[int] | None = None
    out_deltas: list[int] | None = None
    if deltas is not None:
        dvals = [deltas.get(k, 0) for k in keys]
        dcum = list(accumulate(dvals, initial=0))
        out_deltas = out.deltas = []
        # flamegraph.pl scales colours by the largest per-line delta (>= 1).
        out.maxdelta = max(1, max(map(abs, dvals), default=0))
        if delta_mode not in ("self", "total"):
            raise ValueError("delta_mode is 'self' or 'total'")

    # Category bits of a key run: bit b is set when its prefix count grows over the run.
    bitcums: list[tuple[int, array[int] | list[int]]] = []
    out_cats: list[int] | None = None
    if categories is not None:
        out_cats = out.cats = []
        cvals = [categories.get(k, 0) for k in keys]
        for bit in sorted({b for v in set(cvals) for b in (1 << i for i in range(v.bit_length())) if v & b}):
            bitcums.append((bit, _prefix_sums([1 if v & bit else 0 for v in cvals])))

    # Work items: (prefix, lo, hi, depth, name, self, delta, x) -- prefix is
    # the node's key plus a trailing SEP ("" for the root); [lo, hi) its key
    # run; x its start in flamegraph.pl's sibling order (see below).
    # The root has no self time, so in "self" mode it is white, as in flamegraph.pl.
    root_delta = dcum[n] if (dcum is not None and delta_mode == "total") else 0
    todo = [("", 0, n, 0, root_name, 0, root_delta, 0)]
    pop = todo.pop
    depthmax = 0
    maxnodedelta = 1
    total_mode = delta_mode == "total"
    while todo:
        prefix, lo, hi, depth, name, self_count, delta, xstart = pop()
        names.append(name)
        depths.append(depth)
        starts.append(xstart)
        tstarts.append(cum[lo])
        totals.append(cum[hi] - cum[lo])
        selfs.append(self_count)
        if out_cats is not None:
            out_cats.append(sum(bit for bit, bc in bitcums if bc[hi] != bc[lo]))
        if out_deltas is not None:
            out_deltas.append(delta)
            if depth and abs(delta) > maxnodedelta:
                maxnodedelta = abs(delta)
        if depth > depthmax:
            depthmax = depth

        plen = len(prefix)
        child_depth = depth + 1
        children = []
        # The node's own line (its self count), if any, sorts first in its
        # run and is not a child; its time sits left of the children.
        has_self = depth and len(keys[lo]) == plen - 1
        i = lo + 1 if has_self else lo
        pos = xstart + (vals[lo] if has_self else 0)
        # Sibling order.  flamegraph.pl sorts whole lines as strings, so a
        # frame X without self time comes *after* siblings named X+c when
        # c sorts below ';' ("lib2;..." < "lib;..."), while our keys (NUL
        # separator) put X first.  We reproduce its order by moving that
        # block of siblings [end, blk_end) before X, nesting as needed via
        # `pending`.  (Where X also has self time flamegraph.pl splits X in
        # two around the block -- its duplicate-frame bug -- and we keep X
        # whole, before the block.)
        pending: list[tuple[int, _Child | None, int]] = []
        while True:
            limit = pending[-1][0] if pending else hi
            if i >= limit:
                if not pending:
                    break
                _, child, ctotal = pending.pop()
                if child is not None:
                    children.append((*child, pos))
                pos += ctotal
                continue
            rest = cum[limit] - cum[i]
            if rest < minwidth_count:
                # Everything left here is too narrow to draw: step over it in
                # one go rather than one bisect per sibling.
                pos += rest
                i = limit
                continue
            key = keys[i]
            j = key.find(SEP, plen)
            if j < 0:
                path, cself = key, vals[i]
            else:
                path, cself = key[:j], 0
            end = bisect_left(keys, path + _AFTER_SEP, i + 1, limit)
            ctotal = cum[end] - cum[i]
            child = None
            if ctotal >= minwidth_count:
                if dvals is None:
                    cdelta = 0
                elif total_mode:
                    cdelta = dcum[end] - dcum[i]  # type: ignore[index]
                else:
                    cdelta = dvals[i] if j < 0 else 0  # the node's own line
                child = (path + SEP, i, end, child_depth, path[plen:], cself, cdelta)
            if j >= 0 and end < limit:
                nxt = keys[end]
                pl = len(path)
                if len(nxt) > pl and nxt[pl] < ";" and nxt.startswith(path):
                    pending.append((bisect_left(keys, path + ";", end, limit), child, ctotal))
                    i = end
                    continue
            if child is not None:
                children.append((*child, pos))
            pos += ctotal
            i = end
        if children:
            children.reverse()
            todo.extend(children)
    out.depthmax = depthmax
    if deltas is not None and delta_mode == "total":
        out.maxdelta = maxnodedelta
    return out


def layout_sequence(
    items: Iterable[tuple[str, int]],
    *,
    minwidth_count: float | None = None,
    minwidth_fraction: float | None = None,
    root_name: str = "all",
    categories: Mapping[str, int] | None = None,
) -> Layout:
    """Lay out lines in time order, merging only adjacent identical frames.

    Give the drop threshold either in counts or as a fraction of the total
    (the total is only known after the sweep).  ``categories``: as
    :func:`layout_merged`.
    """
    cats: list[int] = [0]
    names: list[str] = [root_name]
    depths: list[int] = [0]
    starts: list[int] = [0]
    totals: list[int] = [0]
    selfs: list[int] = [0]
    line_keys: list[str] = []
    line_counts: list[int] = []
    open_names: list[str] = []
    open_idx: list[int] = []
    t = 0
    for key, count in items:
        line_keys.append(key)
        line_counts.append(count)
        frames = key.split(SEP)
        same = 0
        for a, b in zip(open_names, frames, strict=False):  # common prefix only
            if a != b:
                break
            same += 1
        for idx in open_idx[same:]:
            totals[idx] = t - starts[idx]
        del open_idx[same:]
        for d in range(same, len(frames)):
            open_idx.append(len(names))
            names.append(frames[d])
            depths.append(d + 1)
            starts.append(t)
            totals.append(0)
            selfs.append(0)
            cats.append(0)
        selfs[open_idx[len(frames) - 1]] += count
        if categories is not None:
            bits = categories.get(key, 0)
            if bits:
                cats[0] |= bits
                for idx in open_idx:
                    cats[idx] |= bits
        open_names = frames
        t += count
    for idx in open_idx:
        totals[idx] = t - starts[idx]
    totals[0] = t

    if minwidth_count is None:
        minwidth_count = (minwidth_fraction or 0.0) * t
    out = Layout(timemax=t, line_keys=line_keys, line_counts=line_counts)
    if categories is not None:
        out.cats = []
    # A child is never wider than its parent, so filtering by width keeps
    # the pre-order intact (no orphans).
    for rec in zip(names, depths, starts, totals, selfs, cats, strict=True):
        if rec[3] >= minwidth_count:
            if out.cats is not None:
                out.cats.append(rec[5])
            out.names.append(rec[0])
            out.depths.append(rec[1])
            out.starts.append(rec[2])
            out.tstarts.append(rec[2])
            out.totals.append(rec[3])
            out.selfs.append(rec[4])
            if rec[1] > out.depthmax:
                out.depthmax = rec[1]
    return out
