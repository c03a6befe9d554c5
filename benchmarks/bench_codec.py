"""Stored-session encode+decode: msgspec MessagePack (typed) against stdlib json, same sessions.

The json baseline is given every advantage: it encodes plain dicts/lists prepared outside the
timing and decodes to dicts without validating or building objects, while ours decodes into
validated, typed BuildSession structs.  Two baselines: the session as a JSON document with named
fields (what a JSON history file holds; the headline figure), and JSON of exactly our layout
(targets as arrays), which isolates the codec from the layout.

    python -m benchmarks.bench_codec [--sessions 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import msgspec

from benchmarks.reference import reference_session
from buildtel.shared.codec import decode_session, encode


def best_of(repeat: int, *fns, rounds: int = 3) -> list[float]:
    """Best time of each of ``fns``: ``rounds`` rounds, each running every fn ``repeat`` times in a
    row (warm, as timeit does) before the next fn, so that a load change on a shared machine hits
    them alike.  Interleaving single runs instead (A, B, A, B…) measures each one cold, right
    after the other has churned ~100 MB of memory: that doubles our decode time and the json
    baseline's much less, so it measures the cache more than the codec."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            for _ in range(repeat):
                t = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t)
    return best


def named(o: object) -> object:
    """The session as a JSON document would hold it: every struct a map of its field names."""
    if isinstance(o, msgspec.Struct):
        return {f: named(getattr(o, f)) for f in o.__struct_fields__}
    if isinstance(o, list):
        return [named(x) for x in o]
    if isinstance(o, dict):
        return {k: named(v) for k, v in o.items()}
    return o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    sessions = [reference_session(i) for i in range(args.sessions)]
    dicts = [named(s) for s in sessions]
    same = [msgspec.to_builtins(s) for s in sessions]
    packed = [encode(s) for s in sessions]
    texts = [json.dumps(d) for d in dicts]
    same_texts = [json.dumps(d) for d in same]
    assert all(decode_session(p) == s for p, s in zip(packed, sessions, strict=True))

    load = os.getloadavg()[0]
    ours, base, base_same = best_of(args.repeat, lambda: [decode_session(encode(s)) for s in sessions],
                                    lambda: [json.loads(json.dumps(d)) for d in dicts],
                                    lambda: [json.loads(json.dumps(d)) for d in same])
    size_ours = sum(map(len, packed))
    size_json = sum(len(t.encode()) for t in texts)
    size_same = sum(len(t.encode()) for t in same_texts)
    n = len(sessions)
    print(f"sessions: {n} × 200 targets, 40 env vars; 1-min load average {load:.2f}; best of 3 rounds × {args.repeat}")
    print(f"msgspec msgpack encode+decode: {ours / n * 1e6:8.1f} µs/session")
    print(f"stdlib json     encode+decode: {base / n * 1e6:8.1f} µs/session (named fields)")
    print(f"stdlib json     encode+decode: {base_same / n * 1e6:8.1f} µs/session (our array layout)")
    print(f"speed-up: {base / ours:.1f}× (named), {base_same / ours:.1f}× (same layout)")
    print(f"size: {size_ours / n / 1024:.1f} KiB vs {size_json / n / 1024:.1f} KiB named "
          f"({size_ours / size_json:.2f}×), {size_same / n / 1024:.1f} KiB same layout ({size_ours / size_same:.2f}×)")
    print(json.dumps({"speedup_vs_json": round(base / ours, 2), "size_ratio_vs_json": round(size_ours / size_json, 3),
                      "speedup_vs_json_same_layout": round(base_same / ours, 2),
                      "size_ratio_vs_json_same_layout": round(size_ours / size_same, 3)}))


if __name__ == "__main__":
    main()
