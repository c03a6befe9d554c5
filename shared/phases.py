"""Breakdown phases: named costs inside a target's time that are not slices of it.

A target's phases are normally consecutive slices of its time (``Frontend``, ``Backend``; the
tracer lays them back to back, flame graphs stack them under the target).  Imported clang
``-ftime-trace`` compiles also carry what the front end spent per included file and per
template (``shared/importers/clang_trace.py``): ``header:<path>`` and ``template:<name>``
phases, each kind summing to its own total and overlapping ``Frontend``.  Whoever lays phases
out in time or stacks them must skip these (:func:`breakdown`); ``buildtel show ID --headers``
/ ``--templates`` adds them up across a session's compiles (:func:`rank`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

HEADER = "header:"
TEMPLATE = "template:"
OTHER = "(other)"  # the remainder beyond a compile's top N, so a kind's phases add up to its total
BREAKDOWN_PREFIXES = (HEADER, TEMPLATE)


def breakdown(name: str) -> bool:
    """Whether a phase named ``name`` is a breakdown cost rather than a slice of the target's time."""
    return name.startswith(BREAKDOWN_PREFIXES)


@dataclass(slots=True)
class Cost:
    """One header or template across targets: total self time and the targets that paid it."""

    name: str
    total_s: float = 0.0
    targets: int = 0


def rank(targets: Iterable[object], prefix: str) -> tuple[list[Cost], float]:
    """Costs of the phases named ``prefix…`` summed over ``targets`` (costliest first), and their
    total; ``(other)`` stays one row (each compile's remainder beyond its top N)."""
    costs: dict[str, Cost] = {}
    total = 0.0
    for t in targets:
        for p in getattr(t, "phases", ()):
            if not p.name.startswith(prefix):
                continue
            c = costs.setdefault(p.name[len(prefix):], Cost(p.name[len(prefix):]))
            c.total_s += p.duration_s
            c.targets += 1
            total += p.duration_s
    return sorted(costs.values(), key=lambda c: (-c.total_s, c.name)), total
