"""Worker lanes for targets seen live: overlapping targets never share a lane.

Neither make nor ninja says which job slot ran a command, so lanes are assigned
here: each target takes the lowest lane none of whose known intervals overlaps
its own.  make reports starts in (nearly) time order and ninja reports whole
intervals in *end* order, so a lane keeps every interval it was given (sorted by
start) rather than just a "busy until": an edge that started early but is
reported late must not land on a lane another edge used meanwhile.  Intervals
can be open (end unknown yet, make's running targets) and closed later.  The
lane count is the peak parallelism or, with ninja's out-of-order reports,
occasionally a little more — never an overlap.
"""

from __future__ import annotations

import bisect
import math


class LaneAllocator:
    def __init__(self, prefix: str = "lane-") -> None:
        self.prefix = prefix
        self._starts: list[list[float]] = []  # per lane, sorted interval starts
        self._ends: list[list[float]] = []  # per lane, the matching ends (inf while open)

    @property
    def lanes(self) -> int:
        return len(self._starts)

    def assign(self, start: float, end: float | None = None) -> int:
        """The lowest lane free over [start, end) (end None: open until :meth:`close`)."""
        stop = math.inf if end is None else max(end, start)
        for lane, (starts, ends) in enumerate(zip(self._starts, self._ends, strict=True)):
            i = bisect.bisect_right(starts, start)
            # The interval starting at or before us must have ended; the next one must start after us.
            if i > 0 and ends[i - 1] > start:
                continue
            if i < len(starts) and starts[i] < stop:
                continue
            starts.insert(i, start)
            ends.insert(i, stop)
            return lane
        self._starts.append([start])
        self._ends.append([stop])
        return len(self._starts) - 1

    def close(self, lane: int, start: float, end: float) -> None:
        """Give the open interval of ``lane`` that began at ``start`` its end."""
        starts, ends = self._starts[lane], self._ends[lane]
        i = bisect.bisect_left(starts, start)
        while i < len(starts) and starts[i] == start:
            if ends[i] == math.inf:
                ends[i] = max(end, start)
                return
            i += 1

    def reopen(self, lane: int, start: float) -> bool:
        """Make the closed interval of ``lane`` that began at ``start`` open again (a make
        recipe's next line started); False when a later interval of the lane is in the way."""
        starts, ends = self._starts[lane], self._ends[lane]
        i = bisect.bisect_left(starts, start)
        if i >= len(starts) or starts[i] != start:
            return False
        if i + 1 < len(starts):
            return False
        ends[i] = math.inf
        return True

    def release(self, lane: int, start: float) -> None:
        """Forget the interval of ``lane`` that began at ``start``."""
        starts, ends = self._starts[lane], self._ends[lane]
        i = bisect.bisect_left(starts, start)
        if i < len(starts) and starts[i] == start:
            del starts[i], ends[i]

    def name(self, lane: int) -> str:
        return f"{self.prefix}{lane}"
