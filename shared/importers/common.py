"""What every importer shares: the error type, warnings, results and the session builder.

Importers are pure functions from the bytes of a build tool's output to
:class:`~buildtel.shared.protocol.BuildSession` objects; they never touch the bus, so a
file is parsed completely (or rejected with :class:`ImportFormatError`) before
the CLI publishes anything.  Session ids are derived from content, never
random, so importing the same file twice yields the same ids and JetStream's
``Nats-Msg-Id`` de-duplication (and storage keyed by id) make re-imports
idempotent.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import heapq
import signal
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from buildtel.shared.codec import encoder
from buildtel.shared.failrecord import from_error
from buildtel.shared.protocol import BuildSession, TargetFailure, TargetMetrics
from buildtel.shared.redaction import redact_argv
from buildtel.shared.totals import summarize_targets

GZIP_MAGIC = b"\x1f\x8b"
# Decompressed inputs above this are refused: a build log or trace this large is not a
# plausible import and a gzip bomb must not exhaust memory.
MAX_DECOMPRESSED_BYTES = 512 * 1024 * 1024


class ImportFormatError(ValueError):
    """The input is not the format it claims to be; ``line`` is 1-based.

    Importers raise only this for bad input (never ``KeyError``/``TypeError``…), so
    callers can report one clear line and know nothing was published.
    """

    def __init__(self, message: str, line: int = 1) -> None:
        self.line = max(1, int(line))
        self.reason = message
        super().__init__(f"line {self.line}: {message}")


@dataclass(frozen=True, slots=True)
class ParseWarning:
    """Something the importer tolerated (skipped or guessed) and wants the user to know."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ImportResult:
    """Sessions parsed from one input, what was tolerated, and format-specific figures."""

    format: str
    sessions: list[BuildSession]
    warnings: list[ParseWarning] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def content_id(*parts: bytes | str) -> str:
    """A deterministic 128-bit id (32 lowercase hex) from the given parts.

    Parts are length-prefixed so ``("ab", "c")`` and ``("a", "bc")`` differ.
    """
    h = hashlib.sha256()
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)
    return h.hexdigest()[:32]


def maybe_gunzip(data: bytes) -> bytes:
    """Decompress gzip input (detected by its magic bytes, not the file name)."""
    if not data.startswith(GZIP_MAGIC):
        return data
    out = bytearray()
    rest = data
    try:
        # Loop because a gzip file may hold several concatenated members.
        while rest.startswith(GZIP_MAGIC):
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += d.decompress(rest, MAX_DECOMPRESSED_BYTES + 1 - len(out))
            if len(out) > MAX_DECOMPRESSED_BYTES or d.unconsumed_tail:
                raise ImportFormatError(f"gzip data expands beyond {MAX_DECOMPRESSED_BYTES} bytes")
            if not d.eof:
                raise ImportFormatError("truncated gzip data")
            rest = d.unused_data
    except zlib.error as exc:
        raise ImportFormatError(f"corrupt gzip data: {exc}") from None
    if rest.strip(b"\0"):
        raise ImportFormatError("trailing garbage after gzip data")
    return bytes(out)


def decode_utf8(data: bytes, what: str) -> str:
    """Strict UTF-8 (a BOM is dropped); the error names the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ImportFormatError(f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x})", line) from None


def parse_time(value: str) -> float:
    """Unix seconds from an ISO-8601 timestamp (naive means UTC) or a number of seconds."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO-8601 time or Unix seconds: {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_dt.UTC)
    try:
        return dt.timestamp()
    except (OverflowError, OSError):
        raise ValueError(f"time out of range: {value!r}") from None


def iso(ts: float) -> str:
    try:
        return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"{ts:.3f}"


def signal_name(code: int) -> str | None:
    """``SIGINT`` for exit code 130 (or -2, Python's way), else None when ``code`` is no signal."""
    num = -code if code < 0 else code - 128 if code > 128 else None
    if num is None:
        return None
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


# Exit statuses of a build command ended by SIGHUP, SIGINT or SIGTERM (the shell's 128+N, or
# Python's -N): a user, a hung-up terminal or a supervisor stopped it — a cancel.  Any other
# non-zero code is a failure: ninja >= 1.13 exits with a failed edge's own code, so 137 is an
# edge SIGKILLed (out of memory), not a cancel.  One rule for every importer and `buildtel run`.
STOPPED_CODES = frozenset({129, 130, 143, -1, -2, -15})


def outcome_of_exit_code(code: int) -> str:
    """0 → success; SIGHUP, SIGINT or SIGTERM (``STOPPED_CODES``) → cancelled; else failed."""
    if code == 0:
        return "success"
    return "cancelled" if code in STOPPED_CODES else "failed"


def assign_lanes(intervals: Iterable[tuple[float, float]]) -> list[int]:
    """Greedy interval partitioning: a lane number per interval, overlapping ones never share.

    Intervals are half-open ``[start, end)`` so an edge that starts the millisecond its
    predecessor ended reuses the lane.  Processing by start time and always taking the
    lowest free lane uses exactly as many lanes as the peak concurrency, which for a
    ``-jN`` build is at most N.
    """
    items = list(intervals)
    order = sorted(range(len(items)), key=lambda i: (items[i][0], items[i][1], i))
    lanes = [0] * len(items)
    busy: list[tuple[float, int]] = []  # (end, lane) of running intervals
    free: list[int] = []
    next_lane = 0
    for i in order:
        start, end = items[i]
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            lane = heapq.heappop(free)
        else:
            lane, next_lane = next_lane, next_lane + 1
        lanes[i] = lane
        heapq.heappush(busy, (end, lane))
    return lanes


def clean_text(s: str) -> str:
    """The string with lone surrogates (legal in JSON ``\\ud800`` escapes, not in UTF-8) replaced."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def _scrub(v: Any) -> Any:
    if isinstance(v, str):
        return clean_text(v)
    if isinstance(v, dict):
        return {_scrub(k): _scrub(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_scrub(x) for x in v]
    return v


def encodable(session: BuildSession) -> BuildSession:
    """The session, with any text the wire encoding cannot carry replaced.

    Imported names come from JSON, whose escapes can produce lone surrogates that
    msgpack refuses; finding that out when publishing would break all-or-nothing.
    """
    try:
        encoder.encode(session)
        return session
    except UnicodeEncodeError:
        return msgspec.convert(_scrub(msgspec.to_builtins(session)), BuildSession)


def unique_names(targets: list[TargetMetrics]) -> None:
    """Suffix repeated target names with ``#2``, ``#3``… (storage and analyses key on names)."""
    seen: dict[str, int] = {}
    for t in targets:
        n = seen.get(t.name, 0) + 1
        seen[t.name] = n
        if n > 1:
            t.name = f"{t.name} #{n}"


def make_session(
    *,
    session_id: str,
    name: str,
    start: float,
    finish: float,
    targets: list[TargetMetrics],
    events: int,
    outcome: str,  # every importer decides it: "unknown" when its input does not say
    exit_code: int | None = None,
    command: list[str] | None = None,
    labels: dict[str, str] | None = None,
    agent: str,
    cache: tuple[int, int] | None = None,
    duration_s: float | None = None,
    **extra: Any,
) -> BuildSession:
    """Fold imported targets into a BuildSession the way the collector folds live ones.

    Totals and cache figures are computed from the targets unless ``cache`` gives the
    tool's own (hits, misses) — e.g. Bazel's action cache, which counts actions.
    """
    targets = sorted(targets, key=lambda t: (t.start, t.name))
    # One home for a failed target's text: its failure record (shared/failrecord.py), not TargetMetrics.error.
    failures: list[TargetFailure] = list(extra.pop("failures", []))
    have = {f.target for f in failures}
    for i, t in enumerate(targets):
        if t.error:
            if t.name not in have:
                failures.append(from_error(t))
            targets[i] = msgspec.structs.replace(t, error=None)
    if failures:
        extra["failures"] = failures
    totals, hits, misses = summarize_targets(targets, events=events)
    if cache is not None:
        hits, misses = cache
    return encodable(BuildSession(
        id=session_id,
        name=name,
        start=start,
        finish=finish,
        # Given exactly when the tool measured it (ninja's ms), rather than a float difference.
        duration_s=max(0.0, finish - start) if duration_s is None else duration_s,
        outcome=outcome,  # type: ignore[arg-type]
        exit_code=exit_code,
        command=redact_argv(command or []),  # a Bazel command line can carry --remote_header=…=Bearer X
        labels=labels or {},
        agents=[agent],
        targets=targets,
        cache_hits=hits,
        cache_misses=misses,
        cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        totals=totals,
        trace_id=session_id,
        **extra,
    ))
