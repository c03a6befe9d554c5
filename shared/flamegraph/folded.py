"""Folded stacks: the text format flamegraph.pl, inferno and speedscope read.

One stack per line, root frame first, frames separated by ``;``, then a
space and an integer count::

    main;compile;parse 1200
    main;link 800

Without further ado a bad line is an error naming its number; with an
:class:`Ignored` the parse follows flamegraph.pl instead (skip and count bad
lines, round decimal counts).

Counts are integers in a stated unit (microseconds unless the caller says
otherwise); the unit is not written into the file, because none of the tools
that read the format would accept a header line.

Internally a stack is kept as one string whose frames are joined by NUL
(``SEP``) instead of ``;``.  NUL sorts below every other character, so plain
string order on those keys is exactly frame-by-frame (tuple) order: every
stack under ``step`` sorts before every stack under ``step-2``.  Sorting the
``;`` form instead interleaves them (``' ' < '-' < ';'``), which is what makes
flamegraph.pl draw a frame twice.  The conversion costs one ``str.replace``
over the whole input, which is far cheaper than keeping tuples.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TextIO

SEP = "\x00"
"""Frame separator inside stack keys (see the module docstring)."""

DEFAULT_UNIT = "us"

__all__ = [
    "DEFAULT_UNIT",
    "SEP",
    "FoldedParseError",
    "FoldedStacks",
    "Ignored",
    "format_folded",
    "iter_folded",
    "parse_folded",
    "read_folded",
    "write_folded",
]

# Reading in chunks bounds memory for very large files: only the merged dict
# grows with the input, never a copy of the whole text.
_CHUNK_CHARS = 8 << 20


class FoldedParseError(ValueError):
    """A line of folded input is not ``frame;frame;... <count>``."""

    def __init__(self, lineno: int, line: str, reason: str, source: str | None = None) -> None:
        self.lineno = lineno
        self.line = line
        self.reason = reason
        self.source = source
        shown = line if len(line) <= 120 else line[:117] + "..."
        where = f"{source}:{lineno}" if source else f"line {lineno}"
        super().__init__(f"{where}: {reason}: {shown!r}")


class Ignored:
    """flamegraph.pl's input rules, for callers that want them: a line that is not
    ``<stack> <count>`` is skipped and counted (flamegraph.pl prints "Ignored N lines with invalid
    format"), and a decimal count (``12.5``, which flamegraph.pl accepts) is rounded to a whole
    number and counted too.  Pass one to the parse functions as ``ignored=``; without it they
    raise :class:`FoldedParseError` on the first bad line.
    """

    __slots__ = ("first", "lines", "rounded")

    def __init__(self) -> None:
        self.lines = 0  # lines skipped
        self.rounded = 0  # decimal counts rounded to whole numbers
        self.first: FoldedParseError | None = None  # the first line skipped, for the message

    def skip(self, err: FoldedParseError) -> None:
        self.lines += 1
        if self.first is None or err.lineno < self.first.lineno:
            self.first = err

    def __bool__(self) -> bool:
        return bool(self.lines or self.rounded)

    def message(self) -> str:
        """One line for stderr, flamegraph.pl's wording first."""
        parts = []
        if self.lines:
            parts.append(f"Ignored {self.lines} line{'s' * (self.lines != 1)} with invalid format "
                         f"(first: {self.first})")
        if self.rounded:
            parts.append(f"rounded {self.rounded} decimal count{'s' * (self.rounded != 1)} to whole numbers")
        return "; ".join(parts)


# flamegraph.pl's count: digits with an optional decimal part ("12", "12.", "12.5").
_DECIMAL = re.compile(r"[0-9]+\.[0-9]*")


def _key(frames: Sequence[str] | str) -> str:
    """Turn frames (a sequence, or an already ';'-joined string) into a key."""
    if isinstance(frames, str):
        frames = frames.split(";")
    if not frames:
        raise ValueError("a stack needs at least one frame")
    for f in frames:
        if not isinstance(f, str):
            raise TypeError(f"frame names must be str, got {type(f).__name__}")
        if ";" in f or "\n" in f or "\r" in f or SEP in f:
            raise ValueError(f"frame name {f!r} contains ';', a newline or NUL")
    key = SEP.join(frames)
    if not key.strip():
        raise ValueError("a stack needs a non-blank frame")
    return key


def _check_count(count: int) -> int:
    # bool is an int subclass; True as a count is almost certainly a bug.
    if not isinstance(count, int) or isinstance(count, bool):
        raise TypeError(f"counts are integers, got {type(count).__name__}")
    if count < 0:
        raise ValueError(f"counts cannot be negative, got {count}")
    return count


class FoldedStacks:
    """Merged folded stacks: stack -> summed integer count, plus the unit.

    Iteration yields ``(frames_tuple, count)`` in insertion order; output
    (``format_folded``) is sorted, so it is byte-identical run to run.
    """

    __slots__ = ("_counts", "unit")

    def __init__(
        self,
        stacks: Mapping[str, int] | Iterable[tuple[Sequence[str] | str, int]] | None = None,
        *,
        unit: str = DEFAULT_UNIT,
    ) -> None:
        if not unit or not unit.strip():
            raise ValueError("unit must be a non-empty string")
        self.unit = unit
        self._counts: dict[str, int] = {}
        if stacks is not None:
            items = stacks.items() if isinstance(stacks, Mapping) else stacks
            for frames, count in items:
                self.add(frames, count)

    @classmethod
    def _from_keys(cls, counts: dict[str, int], unit: str) -> FoldedStacks:
        # Trusted constructor for dicts already keyed by SEP-joined stacks.
        self = cls.__new__(cls)
        self.unit = unit
        self._counts = counts
        return self

    def add(self, frames: Sequence[str] | str, count: int) -> None:
        """Add ``count`` to a stack (frames root first, or a ';'-joined string)."""
        key = _key(frames)
        self._counts[key] = self._counts.get(key, 0) + _check_count(count)

    def update(self, other: FoldedStacks) -> None:
        """Sum another set of stacks into this one (units must agree)."""
        if other.unit != self.unit:
            raise ValueError(f"unit mismatch: {self.unit!r} vs {other.unit!r}")
        counts = self._counts
        get = counts.get
        for k, v in other._counts.items():
            counts[k] = get(k, 0) + v

    @property
    def keys_counts(self) -> dict[str, int]:
        """The raw mapping: SEP-joined stack key -> count (do not mutate)."""
        return self._counts

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def __len__(self) -> int:
        return len(self._counts)

    def __iter__(self) -> Iterator[tuple[tuple[str, ...], int]]:
        for k, v in self._counts.items():
            yield tuple(k.split(SEP)), v

    def __getitem__(self, frames: Sequence[str] | str) -> int:
        return self._counts.get(_key(frames), 0)

    def __contains__(self, frames: object) -> bool:
        if not isinstance(frames, (str, Sequence)):
            return False
        try:
            return _key(frames) in self._counts
        except (TypeError, ValueError):
            return False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FoldedStacks):
            return NotImplemented
        return self.unit == other.unit and self._counts == other._counts

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"FoldedStacks({len(self)} stacks, total={self.total} {self.unit})"

    def to_dict(self) -> dict[str, int]:
        """``{'a;b;c': count}`` in insertion order."""
        return {k.replace(SEP, ";"): v for k, v in self._counts.items()}

    def to_text(self) -> str:
        return format_folded(self)


# --------------------------------------------------------------------------
# parsing

def _bad_line(line: str, lineno: int, source: str | None) -> FoldedParseError | None:
    """Classify one line the fast path refused; None means it is acceptable."""
    text = line.replace(SEP, ";")
    stripped = text.strip()
    if not stripped:
        return None
    parts = stripped.rsplit(None, 1)
    if len(parts) != 2:
        return FoldedParseError(lineno, text, "expected '<stack> <count>'", source)
    stack, count = parts
    if not (count.isascii() and count.isdigit()):
        if count.isascii() and count.replace(".", "", 1).isdigit():
            return FoldedParseError(lineno, text, "counts must be integers", source)
        return FoldedParseError(lineno, text, f"count {count!r} is not a non-negative integer", source)
    if not stack.strip():
        return FoldedParseError(lineno, text, "empty stack", source)
    return None


def _decimal(line: str, ignored: Ignored) -> tuple[str, int] | None:
    """A line whose count has a decimal part, rounded (flamegraph.pl accepts it); else None."""
    parts = line.strip().rsplit(None, 1)
    if len(parts) == 2 and parts[0].strip() and _DECIMAL.fullmatch(parts[1]):
        ignored.rounded += 1
        whole, _, frac = parts[1].partition(".")
        # Half up, in integers: float() would turn a long count into a guess.
        return parts[0], int(whole) + (frac[:1] >= "5" if frac else 0)
    return None


def _merge_chunk(
    lines: list[str], counts: dict[str, int], first_lineno: int, source: str | None,
    ignored: Ignored | None = None,
) -> None:
    """Merge lines (';' already replaced by SEP) into counts.

    The common shape ``stack count`` is handled inline; anything else (blank
    lines, tabs, trailing spaces or CR, garbage) goes through the careful
    path, which either accepts it or raises with the line number (or, given
    ``ignored``, skips and counts it).
    """
    get = counts.get
    lineno = first_lineno - 1
    for lineno, line in enumerate(lines, first_lineno):
        stack, sep, c = line.rpartition(" ")
        if sep and stack and c.isdigit() and c.isascii():
            counts[stack] = get(stack, 0) + int(c)
            continue
        err = _bad_line(line, lineno, source)
        if err is not None:
            if ignored is None:
                raise err
            rounded = _decimal(line, ignored)
            if rounded is None:
                ignored.skip(err)
            else:
                counts[rounded[0]] = get(rounded[0], 0) + rounded[1]
            continue
        stripped = line.strip()
        if not stripped:
            continue  # blank line: tolerated
        stack, c = stripped.rsplit(None, 1)
        # Keep frame names exactly as the careful split produced them, as
        # flamegraph.pl does (it splits on the last run of whitespace).
        counts[stack] = get(stack, 0) + int(c)


def _check_nul(text: str, first_lineno: int, source: str | None) -> None:
    if SEP in text:
        before = text[: text.index(SEP)]
        lineno = first_lineno + before.count("\n")
        line = text[before.rfind("\n") + 1:].split("\n", 1)[0]
        raise FoldedParseError(lineno, line.replace(SEP, "\\0"), "NUL byte in stack", source)


# One well-formed line: a stack ending in a non-blank character, blanks, an
# ASCII count, optional trailing blanks/CR.  findall() runs in C, so a clean
# block costs one regex pass instead of a Python loop iteration per line.
_LINE = re.compile(r"^(.*\S)[ \t]+([0-9]+)[ \t\r]*$", re.MULTILINE)


def _merge_text(text: str, counts: dict[str, int], first_lineno: int, source: str | None,
                ignored: Ignored | None = None) -> int:
    """Merge a block of whole lines; returns the number of lines consumed."""
    if ignored is not None:
        # flamegraph.pl draws a NUL inside a name; U+FFFD is how the SVG shows a control anyway.
        text = text.replace(SEP, "\ufffd")
    _check_nul(text, first_lineno, source)
    text = text.replace(";", SEP)
    nlines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    pairs = _LINE.findall(text)
    if len(pairs) != nlines:
        # Blank or malformed lines somewhere: take the careful path, which
        # accepts the former and reports the first of the latter by number.
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        _merge_chunk(lines, counts, first_lineno, source, ignored)
        return nlines
    if not pairs:
        return nlines
    stacks, numbers = zip(*pairs, strict=True)
    block = dict(zip(stacks, map(int, numbers), strict=True))
    if len(block) == len(stacks) and counts.keys().isdisjoint(block):
        counts.update(block)  # the usual case: every stack is new
    else:
        get = counts.get
        for stack, number in zip(stacks, numbers, strict=True):
            counts[stack] = get(stack, 0) + int(number)
    return nlines


def _merge_stream(fh: TextIO, counts: dict[str, int], source: str | None,
                  ignored: Ignored | None = None) -> None:
    lineno = 1
    rest = ""
    while True:
        chunk = fh.read(_CHUNK_CHARS)
        if not chunk:
            break
        chunk = rest + chunk
        cut = chunk.rfind("\n")
        if cut < 0:
            rest = chunk
            continue
        rest = chunk[cut + 1:]
        lineno += _merge_text(chunk[: cut + 1], counts, lineno, source, ignored)
    if rest:
        _merge_text(rest, counts, lineno, source, ignored)


def parse_folded(
    source: str | bytes | Iterable[str],
    *,
    unit: str = DEFAULT_UNIT,
    name: str | None = None,
    ignored: Ignored | None = None,
) -> FoldedStacks:
    """Parse folded text (``str``/``bytes``) or an iterable of lines.

    Duplicate stacks are summed; blank lines, CRLF line ends, tabs before the
    count and trailing whitespace are tolerated.  Anything else raises
    :class:`FoldedParseError` naming the (1-based) line number, or, given
    ``ignored`` (:class:`Ignored`), is skipped and counted as flamegraph.pl does.
    ``name`` (e.g. a file name) is only used in error messages.
    """
    counts: dict[str, int] = {}
    if isinstance(source, bytes):
        source = source.decode("utf-8")
    if isinstance(source, str):
        _merge_stream(io.StringIO(source), counts, name, ignored)
    else:
        lineno = 1
        for line in source:
            lineno += _merge_text(line.rstrip("\n") + "\n", counts, lineno, name, ignored)
    return FoldedStacks._from_keys(counts, unit)


def read_folded(path: str | os.PathLike[str], *, unit: str = DEFAULT_UNIT,
                ignored: Ignored | None = None) -> FoldedStacks:
    """Parse a folded file (UTF-8), streaming it in chunks (``ignored``: as :func:`parse_folded`)."""
    counts: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        _merge_stream(fh, counts, os.fspath(path), ignored)
    return FoldedStacks._from_keys(counts, unit)


def iter_folded(
    source: str | bytes | Iterable[str], *, name: str | None = None, ignored: Ignored | None = None
) -> Iterator[tuple[str, int]]:
    """Yield ``(key, count)`` per line, in input order, without merging.

    Flame charts need this: there the order of lines is the order in time
    and only adjacent identical frames merge.  Keys are SEP-joined.
    ``ignored``: as :func:`parse_folded`.
    """
    if isinstance(source, bytes):
        source = source.decode("utf-8")
    lines: Iterable[str] = source.split("\n") if isinstance(source, str) else source
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        one: dict[str, int] = {}
        if ignored is not None:
            line = line.replace(SEP, "\ufffd")  # as _merge_text
        _check_nul(line, lineno, name)
        _merge_chunk([line.replace(";", SEP)], one, lineno, name, ignored)
        yield from one.items()


# --------------------------------------------------------------------------
# writing

def format_folded(stacks: FoldedStacks | Mapping[str, int]) -> str:
    """Folded text, one line per stack, sorted frame by frame.

    Sorting makes the output byte-identical run to run regardless of the
    order stacks were added in.  A plain mapping is taken as
    ``{'a;b;c': count}``.
    """
    if isinstance(stacks, FoldedStacks):
        counts = stacks.keys_counts
    else:
        counts = {_key(k): _check_count(v) for k, v in stacks.items()}
    if not counts:
        return ""
    # Build with SEP keys and translate once: one replace over the output is
    # cheaper than one per line.
    out = "".join([f"{k} {counts[k]}\n" for k in sorted(counts)])
    return out.replace(SEP, ";")


def write_folded(
    dest: str | os.PathLike[str] | TextIO, stacks: FoldedStacks | Mapping[str, int]
) -> None:
    """Write folded text to a path or an open text file."""
    text = format_folded(stacks)
    if isinstance(dest, (str, os.PathLike)):
        with open(dest, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
    else:
        dest.write(text)
