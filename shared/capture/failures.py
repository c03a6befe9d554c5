"""What each failed target printed, found in the build's console log (``docs/failures.md``).

**ninja** buffers each edge's output and prints it whole when the edge ends; a failed edge is
``FAILED: <outputs>``, its command line, then its output, up to the next status line
(``[k/n] …``), ``FAILED:`` or ``ninja: …`` line.  That is exact at any ``-j``.  ninja does not
log failed edges in ``.ninja_log``, so such an edge also becomes a failed target here (ended when
its ``FAILED:`` line was read; its start is not known: duration 0).

**make** prints a recipe's lines as they run.  A failed recipe's output is the console read
from just before its start (make echoes the command before it spawns it) until just after its
end (``make: *** [Makefile:N: target] Error 1`` follows the reap), cut short where another
recipe started or ended.  When another recipe ran at the same time (parallel make, or the
recipe of a recursive make around it), the output cannot be told apart: the target gets no
output and a note saying so, never a guess.  Times are when the console was read, so on a
machine too loaded to read its console promptly the last lines of a recipe can land after
``GRACE_S``.

Output, error lines and signatures are redacted (``buildlog.redact_line``) and bounded.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass

from buildtel.shared.buildlog import Chunk, redact_line
from buildtel.shared.failsig import error_lines, quoted_only, signature
from buildtel.shared.protocol import TargetFailure

GRACE_S = 0.5
MAX_FAILURES = 100
MAX_LINES = 400
LINE_CHARS = 4096  # the longest string an event may carry (shared/validate.py)
NOTE_CHARS = 1000  # notes name other targets: bounded, so an event never breaks a string limit
ERROR_CHARS = 300  # of each error line: 100 failures' error lines stay well within one bus message
OUTPUT_BUDGET = 256 * 1024  # failure output in one build_finished event, all targets together
_NINJA_FAILED = re.compile(r"^FAILED: (?:\[code=(?P<code>-?\d{1,9})\] )?(?P<outputs>.*)$")
_NINJA_END = re.compile(r"^(?:\[\d+/\d+\]|FAILED: |ninja: )")
_MAKE_ANCHOR = re.compile(r"^\S*make(?:\[\d+\])?: \*\*\* \[(?P<inside>[^\]]*)\] ")


@dataclass(frozen=True, slots=True)
class Seen:
    """A target as the capture reported it."""

    target: str
    start: float
    end: float
    status: str
    exit_code: int | None = None  # a failed ninja edge's ``[code=N]`` (ninja >= 1.13); None: not said


Line = tuple[float, int, str]  # (when its end was read, stream, text)


def timed_lines(chunks: list[Chunk]) -> list[Line]:
    """Each line of the console, in the order read, with the time its end was read and its stream
    (a last unterminated line of each stream included)."""
    out: list[Line] = []
    part: dict[int, tuple[float, bytes]] = {}
    for t, data, stream in chunks:
        pieces = (part.get(stream, (t, b""))[1] + data).split(b"\n")
        part[stream] = (t, pieces.pop())
        out.extend((t, stream, p.rstrip(b"\r").decode("utf-8", "replace")) for p in pieces)
    for stream, (t, rest) in part.items():
        if rest:
            out.append((t, stream, rest.rstrip(b"\r").decode("utf-8", "replace")))
    return out


def ninja_blocks(lines: list[Line]) -> list[tuple[str, float, list[str], int | None]]:
    """(first output, time its FAILED line was read, command + output lines, its exit code) per
    failed ninja edge (ninja prints all of it on its stdout).  The exit code is ninja's
    ``[code=N]`` (since 1.13: 137 for an edge killed by SIGKILL); None when ninja did not print it."""
    blocks: list[tuple[str, float, list[str], int | None]] = []
    current: list[str] | None = None
    for t, stream, line in lines:
        if stream == 2:
            continue
        m = _NINJA_FAILED.match(line)
        if m:
            current = []
            outputs = m.group("outputs").strip()
            code = int(m.group("code")) if m.group("code") is not None else None
            blocks.append((outputs.split(" ")[0], t, current, code))
            continue
        if current is None:
            continue
        if _NINJA_END.match(line):
            current = None
            continue
        current.append(line)
    return blocks


def make_anchor(line: str) -> str | None:
    """The target a ``make: *** [Makefile:N: target] Error 1`` line (or ``make[2]: *** [target]
    Killed``, make < 4) names; None for any other line."""
    m = _MAKE_ANCHOR.match(line)
    return m.group("inside").rsplit(": ", 1)[-1] if m else None


def _window(f: Seen, others: list[Seen]) -> tuple[float, float]:
    lo = max([f.start - GRACE_S, *(o.end for o in others if o.end <= f.start)])
    hi = min([f.end + GRACE_S, *(o.start for o in others if o.start >= f.end)])
    return lo, hi


class Console:
    """The console's lines with what every failed recipe looks up: read times made non-decreasing
    (for bisection; a wall clock stepping back does not reorder lines) and make's ``***`` lines."""

    def __init__(self, lines: list[Line]) -> None:
        self.lines = lines
        self.times = list(itertools.accumulate((t for t, _, _ in lines), max))
        self.anchors = [(i, self.times[i], a) for i, (_, stream, line) in enumerate(lines)
                        if stream != 1 and (a := make_anchor(line)) is not None]
        self.apart = any(stream == 1 for _, stream, _ in lines)


def make_output(f: Seen, seen: list[Seen], con: Console) -> tuple[list[tuple[int, str]] | None, str]:
    """(the (stream, line)s ``f`` printed, how they were found); None when they cannot be told apart.

    Within one stream the order is exact (stdout and stderr are one stream when they went to the
    same place, ``console.py``); across two it is the order they were read.  When make printed
    its ``*** [..: target]`` line for the recipe (on stderr, after reaping it), the recipe's lines
    of that stream are those after the previous such line and up to it, and its stdout lines
    (when apart) those read until ``GRACE_S`` after it: a console read late can bring in lines
    of the next recipe.  Otherwise the lines are those read from the recipe's start (less
    ``GRACE_S``, not before the previous recipe's end) to its end (plus ``GRACE_S``, not after
    the next recipe's start)."""
    others = [o for o in seen if o is not f]
    during = [o for o in others if o.start < f.end and o.end > f.start]
    if during:
        names = ", ".join(o.target for o in during[:3]) + (", …" if len(during) > 3 else "")
        return None, (f"not attributed: {len(during)} other recipe(s) ran at the same time ({names}); parallel or "
                      "recursive make interleaves their output; see the build log")
    lo, hi = _window(f, others)
    lines, times = con.lines, con.times
    first, anchor = -1, None  # on make's stream: after the previous recipe's *** line, up to ours
    for i, t, a in con.anchors:
        if t >= lo and (f.target == a or f.target.endswith("/" + a)):
            anchor = i
            break
        first = i
    start = bisect.bisect_left(times, lo)
    if anchor is None:
        out = [(stream, line) for _, stream, line in lines[start:bisect.bisect_right(times, hi)]]
        return out, f"the console from the recipe's start to its end (+{GRACE_S} s)"
    until = times[anchor] + GRACE_S
    end = max(anchor + 1, bisect.bisect_right(times, until))
    out = [(lines[i][1], lines[i][2]) for i in range(start, end)
           if (first < i <= anchor if lines[i][1] != 1 else times[i] <= until)]
    return out, ("the console from the recipe's start to make's *** line for it"
                 + ("; stdout and stderr went to different places, so their lines are in the order read and "
                    "stdout may hold lines of the next recipe" if con.apart else ""))


def _bounded(lines: list[str], budget: int) -> tuple[list[str], int]:
    """The last lines within ``budget`` bytes and MAX_LINES; and the bytes left out before them."""
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        n = len(line.encode("utf-8", "replace")) + 1
        if size + n > budget or len(kept) >= MAX_LINES:
            break
        kept.append(line[:LINE_CHARS])
        size += n
    kept.reverse()
    total = sum(len(line.encode("utf-8", "replace")) + 1 for line in lines)
    return kept, total - size


def _failure(target: str, note: str, output: list[tuple[int, str]] | None, output_kib: int, budget: int,
             skip_for_errors: int = 0, exit_code: int | None = None) -> tuple[TargetFailure, int]:
    note = note[:NOTE_CHARS]
    if output is None:
        return TargetFailure(target=target, attributed=False, note=note, exit_code=exit_code), 0
    searched = output[skip_for_errors:]
    errors = [redact_line(e)[:ERROR_CHARS] for e in error_lines([line for _, line in searched])]
    # The signature comes from the tool's own words: stderr first (make echoes commands on stdout),
    # lines whose error word stands outside quotes first, make's "*** [...] Error 1" last.
    lines = [e for stream in (2, 0, 1) for e in error_lines([x for fd, x in searched if fd == stream], len(searched))]
    # An echoed command that prints an error message comes after make's own line: on two pipes the
    # echoes of neighbouring recipes can be read in this one's window.
    own = ([e for e in lines if make_anchor(e) is None and not quoted_only(e)]
           + [e for e in lines if make_anchor(e) is not None]
           + [e for e in lines if make_anchor(e) is None and quoted_only(e)])
    text = [line for _, line in output]
    room = min(output_kib * 1024, budget)
    kept, cut = _bounded(text, room) if room > 0 else ([], sum(len(x) + 1 for x in text))
    if room < output_kib * 1024 and cut:
        note += (f"; output cut short: a session keeps at most {OUTPUT_BUDGET // 1024} KiB of failure output "
                 "(see the build log)")
    # Redacted once bounded: only what is kept pays for it ("[REDACTED]" may lengthen a line by a few bytes).
    kept = [redact_line(line)[:LINE_CHARS] for line in kept]
    first = redact_line(own[0]) if own else (errors[0] if errors else None)
    return TargetFailure(target=target, note=note, output=kept, output_cut_bytes=cut, errors=errors,
                         signature=signature(first) if first is not None else None,
                         exit_code=exit_code), sum(len(x) + 1 for x in kept)


def find_failures(chunks: list[Chunk], seen: list[Seen], *, output_kib: int = 16,
                  cut_between: tuple[float, float] | None = None) -> tuple[list[TargetFailure], list[Seen]]:
    """The failures of a build and the failed ninja edges that are not targets yet (to report as
    targets).  ``cut_between``: the times around the part of the console the log cut."""
    lines = timed_lines(chunks)
    con = Console(lines)
    known = {s.target for s in seen}
    failures: list[TargetFailure] = []
    new_targets: list[Seen] = []
    budget = OUTPUT_BUDGET
    done: set[str] = set()
    found: list[tuple[float, str, str, list[tuple[int, str]] | None, int, int | None]] = []
    for target, t, block, code in ninja_blocks(lines):
        if target in done:
            continue
        done.add(target)
        # The first line is the edge's command (its output follows): not searched for error lines.
        found.append((t, target, "ninja's FAILED block: the edge's command and output", [(1, x) for x in block], 1,
                      code))
        if target not in known:
            new_targets.append(Seen(target, t, t, "failed", code))
    for f in seen:
        if f.status != "failed" or f.target in done:
            continue
        done.add(f.target)
        out, note = make_output(f, seen, con)
        if out is not None and cut_between is not None and f.start - GRACE_S < cut_between[1] \
                and f.end + GRACE_S > cut_between[0]:
            note += "; part of it fell in the part of the log that was cut (BUILDER_TELEMETRY_LOG_LIMIT)"
        found.append((f.end, f.target, note, out, 0, f.exit_code))
    found.sort(key=lambda x: x[0])
    for _t, target, note, out, skip, code in found[:MAX_FAILURES]:
        failure, used = _failure(target, note, out, output_kib, budget, skip, code)
        budget -= used
        failures.append(failure)
    return failures, new_targets
