"""The storage service's ``failures`` query over a big store (docs/performance.md, docs/failures.md).

A store of ``--sessions`` sessions (default 5,000, 200 targets each; 1 in ``--fail-every`` with 3
failed targets whose records carry output and a class, on 499 commits: nearly every build shares
a commit with a failure, the flaky rule's worst case) is written to a temporary directory, then
timed, best of ``--runs``:

- ``failures.read`` + ``failures.group`` as the endpoint runs them (in this process, no bus):
  decode only the sessions the index says failed, then the target statuses of the others on a
  commit with a failure;
- the baseline in the same run: reading and decoding every session whole (what a query without
  the index's failed counts would do) and taking ``failrecord.records`` of each.

The last line is one JSON object with every figure.

Run: ``.venv/bin/python benchmarks/bench_failures.py [--sessions N] [--runs N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buildtel.services.storage import failures
from buildtel.services.storage.index import Filters
from buildtel.services.storage.store import TelemetryStorage
from buildtel.shared.failrecord import records, unify
from buildtel.shared.protocol import TargetFailure
from tests.storage.conftest import build_session

OUTPUT = ["cc -c src/mod.c -o mod.o", "src/mod.c:12:5: error: expected ';' before '}' token",
          "make: *** [Makefile:9: mod.o] Error 1"]


def _session(i: int, fail_every: int, targets: int) -> Any:
    failed = i % fail_every == 0
    s = build_session(i, targets=targets, outcome="failed" if failed else "success")
    assert s.environment is not None and s.environment.vcs is not None
    vcs = msgspec.structs.replace(s.environment.vcs, commit=f"{i % 499:040x}")
    env = msgspec.structs.replace(s.environment, vcs=vcs)
    tms = [msgspec.structs.replace(t, status="failed" if failed and j < 3 else "success",
                                   exit_code=1 if failed and j < 3 else 0) for j, t in enumerate(s.targets)]
    recs = [TargetFailure(target=t.name, output=OUTPUT, errors=OUTPUT[1:2], signature=f"mod{j}.c:N:N: error: x")
            for j, t in enumerate(tms[:3])] if failed else []
    return unify(msgspec.structs.replace(s, environment=env, targets=tms, failures=recs))


def _best(fn: Any, runs: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=5000)
    ap.add_argument("--targets", type=int, default=200)
    ap.add_argument("--fail-every", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = TelemetryStorage(Path(tmp), fsync=False, max_sessions=args.sessions + 10)
        await store.open()
        try:
            sessions = [_session(i, args.fail_every, args.targets) for i in range(args.sessions)]
            for k in range(0, len(sessions), 200):
                await store.append_many(sessions[k:k + 200])
            summaries, _ = await store.summaries(Filters(), desc=True, limit=args.sessions)
            query_s, (found, passed, read_n) = _best(lambda: failures.read(store, summaries, ()), args.runs)
            group_s, groups = _best(lambda: failures.group(found, passed), args.runs)
            decoder = msgspec.msgpack.Decoder(type(sessions[0]))

            def whole() -> int:
                return sum(len(records(decoder.decode(raw))) for s in summaries
                           if (raw := store.read_summary(s)) is not None)

            base_s, base_n = _best(whole, args.runs)
        finally:
            await store.close()
    assert base_n == len(found), (base_n, len(found))
    total = query_s + group_s
    print(f"store: {args.sessions:,} sessions x {args.targets} targets, {read_n:,} with failures, "
          f"{len(found):,} failures in {len(groups)} groups")
    print(f"failures query (read + group): {total:.3f} s; baseline decoding every session whole: {base_s:.3f} s "
          f"({base_s / total:.1f}x)")
    print(json.dumps({"failures_query_s": round(total, 4), "read_s": round(query_s, 4), "group_s": round(group_s, 4),
                      "baseline_whole_decode_s": round(base_s, 4), "speedup": round(base_s / total, 2),
                      "sessions": args.sessions, "targets": args.targets, "failures": len(found),
                      "groups": len(groups)}))


if __name__ == "__main__":
    asyncio.run(main())
