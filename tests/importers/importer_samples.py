"""Sample paths and tiny *independent* readers the importer tests compare against.

The readers here deliberately share no code with ``shared/importers``: each is
the most literal reading of the format, so a test compares two implementations.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "data"
NINJA = DATA / "ninja"
BEP = DATA / "bep"
TRACE = DATA / "trace"

# When ninja was started for each sample (captured with the logs, see tests/data/IMPORTER_SAMPLES.md).
WALL_START = {
    "zlib-clang.ninja_log": ["2026-11-28T02:32:24.265091+00:00"],
    "zstd-release.ninja_log": ["2026-11-28T02:25:43.698635+00:00"],
    "zstd-release-then-incremental.ninja_log": ["2026-11-28T02:25:43.698635+00:00",
                                                "2026-11-28T02:26:18.522716+00:00"],
}


def wall_starts(name: str) -> list[float]:
    return [dt.datetime.fromisoformat(s).timestamp() for s in WALL_START[name]]


def ninja_builds(path: Path) -> list[list[list[str]]]:
    """Builds (lists of tab-split lines) of a log whose builds are separated by end times going back."""
    builds: list[list[list[str]]] = []
    last_end = None
    for line in path.read_text().splitlines()[1:]:
        f = line.split("\t")
        if last_end is None or int(f[1]) < last_end:
            builds.append([])
        builds[-1].append(f)
        last_end = int(f[1])
    return builds


def ninja_edges(build: list[list[str]]) -> list[dict[str, Any]]:
    """Consecutive lines sharing start, end and hash are one edge."""
    edges: list[dict[str, Any]] = []
    for start, end, _mtime, output, h in build:
        if edges and (edges[-1]["start"], edges[-1]["end"], edges[-1]["hash"]) == (int(start), int(end), h):
            edges[-1]["outputs"].append(output)
        else:
            edges.append({"start": int(start), "end": int(end), "hash": h, "outputs": [output]})
    return edges


def bep_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bep_kind(ev: dict[str, Any]) -> str:
    return next(iter(ev["id"]))


def trace_events(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    doc = json.loads(raw)
    return doc["traceEvents"] if isinstance(doc, dict) else doc


def trace_doc(path: Path) -> Any:
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)


def be_durations(events: list[dict[str, Any]]) -> list[float]:
    """Durations of B/E pairs, matched with one stack per (pid, tid)."""
    stacks: dict[tuple[Any, Any], list[float]] = {}
    out = []
    for ev in events:
        key = (ev.get("pid"), ev.get("tid"))
        if ev["ph"] == "B":
            stacks.setdefault(key, []).append(ev["ts"])
        elif ev["ph"] == "E":
            out.append(ev["ts"] - stacks[key].pop())
    return out
