"""Completeness of a session when it completes: what it should hold, what it holds, what is lost.

Pure logic over the session's Redis state (``fold.py`` documents the fields): the
meta hash counts folded events (``n:<agent>``), refused ones (``lost:<agent>`` with
per-cause ``x:``/``xr:``/``xf:``/``xl:`` fields written by the ``apply`` script),
undecodable batches (``ub``/``ubr``) and the highest seq per agent; the seen bitmaps
say which seq numbers arrived at all.  From these :func:`completeness` writes the
record stored with the session (``buildtel.shared.protocol.Completeness``), and a session
is complete only when nothing is known to be missing.  Rules in
``docs/protocol.md`` ("Completeness").
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from buildtel.shared.protocol import BuildFinished, Completeness, LostEvents, SeqRange

MAX_LISTED = 100  # missing seq ranges listed per session (missing_total counts them all)
_HOLES = re.compile(rb"[^\xff]+")  # bytes of a seen bitmap with at least one seq not received


def missing_ranges(bitmap: bytes, upto: int) -> list[tuple[int, int]]:
    """Inclusive (first, last) runs of seq numbers below ``upto`` whose bit is not set.

    Redis bitmaps number bits from the most significant bit of byte 0; bits past the end of
    the string are 0 (never received).  Only bytes that are not 0xff are looked at bit by bit."""
    out: list[tuple[int, int]] = []
    start = prev = -2

    def add(first: int, last: int) -> None:
        nonlocal start, prev
        if first == prev + 1:
            prev = last
            return
        if start >= 0:
            out.append((start, prev))
        start, prev = first, last

    limit = min(len(bitmap) * 8, upto)
    for m in _HOLES.finditer(bitmap):
        if m.start() * 8 >= limit:
            break
        for byte_i in range(m.start(), m.end()):
            base = byte_i * 8
            if base >= limit:
                break
            b = bitmap[byte_i]
            if b == 0 and base + 8 <= limit:
                add(base, base + 7)
                continue
            for bit in range(min(8, limit - base)):
                if not b & (0x80 >> bit):
                    add(base + bit, base + bit)
    if upto > limit:
        add(limit, upto - 1)
    if start >= 0:
        out.append((start, prev))
    return out


def _int(meta: Mapping[bytes, bytes], field: str, default: int = 0) -> int:
    raw = meta.get(field.encode())
    return int(raw) if raw is not None else default


def lost_events(meta: Mapping[bytes, bytes]) -> list[LostEvents]:
    """The refused events recorded for a session, one record per agent and cause."""
    out: list[LostEvents] = []
    for k, v in meta.items():
        key = k.decode()
        if not key.startswith("x:"):
            continue
        f = key[2:]
        agent, _, code = f.partition("|")
        out.append(LostEvents(agent_id=agent, events=int(v), code=code,
                              reason=meta.get(f"xr:{f}".encode(), b"").decode(errors="replace"),
                              first_seq=_int(meta, f"xf:{f}", -1), last_seq=_int(meta, f"xl:{f}", -1)))
    batches = _int(meta, "ub")
    if batches:
        out.append(LostEvents(agent_id="", events=0, code="undecodable",
                              reason=f"{batches} batch(es) could not be read at all (events and agent unknown): "
                                     + meta.get(b"ubr", b"").decode(errors="replace")))
    out.sort(key=lambda r: (r.agent_id, r.code))
    return out


def _span(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first}-{last}"


def completeness(meta: Mapping[bytes, bytes], seen: Mapping[str, bytes], finished: BuildFinished | None,
                 *, gap_wait_s: float) -> Completeness:
    """The completeness record of a session from its hot state (``seen``: agent -> bitmap)."""
    agents: set[str] = set(seen)
    for k in meta:
        key = k.decode()
        if key.startswith(("n:", "lost:", "max:")):
            agents.add(key.partition(":")[2])
    declared = (finished.expected_events or {}) if finished is not None else {}
    agents |= set(declared)
    expected: dict[str, int] = {}
    received: dict[str, int] = {}
    for a in sorted(agents):
        high = _int(meta, f"max:{a}", -1)
        n = high + 1
        if a in declared:
            n = max(n, declared[a])
        if finished is not None and a == finished.agent_id:
            n = max(n, finished.seq + 1)
        expected[a] = n
        received[a] = _int(meta, f"n:{a}")
    missing: list[SeqRange] = []
    total = 0
    reasons: list[str] = []
    for a in sorted(agents):
        runs = missing_ranges(seen.get(a, b""), expected[a])
        gone = sum(last - first + 1 for first, last in runs)
        if not gone:
            continue
        total += gone
        missing += [SeqRange(agent_id=a, first=f, last=last) for f, last in runs]
        shown = ", ".join(_span(f, last) for f, last in runs[:5]) + (", ..." if len(runs) > 5 else "")
        reasons.append(f"agent {a}: {gone} event(s) never arrived ({shown})"
                       + (f"; completed {gap_wait_s:g} s after the last event" if finished is not None else ""))
    lost = lost_events(meta)
    for r in lost:
        if r.code == "undecodable" and not r.agent_id:
            reasons.append(r.reason)
            continue
        first, last = r.first_seq, r.last_seq
        where = f" ({_span(first, last)})" if first is not None and last is not None and first >= 0 else ""
        reasons.append(f"agent {r.agent_id}: {r.events} event(s) refused{where}, {r.code}: {r.reason}")
    if finished is None:
        reasons.insert(0, "abandoned: no build_finished arrived before the inactivity timeout "
                          "(the agent vanished or was killed), so later events are unknown")
    return Completeness(complete=not reasons, expected=expected, received=received, missing=missing[:MAX_LISTED],
                        missing_total=total, lost=lost, reasons=reasons)
