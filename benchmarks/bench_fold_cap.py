"""The collector's fold of one capped batch (MAX_BATCH_EVENTS events) against a real redis-server.

Times the three steps a batch goes through in the collector: decode + bound checks
(``buildtel.shared.codec.decode_batch_raw`` + ``buildtel.shared.validate.check_batch``), the script payloads
(``fold.ops_payloads``) and the Redis fold (the ``APPLY`` script, one call per
``FOLD_CHUNK_EVENTS``), and the longest single script call (how long Redis is busy at once).
docs/protocol.md records a run and derives the batch cap from it.

    python -m benchmarks.bench_fold_cap [--events 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from buildtel.services.collector import fold, lua
from buildtel.services.collector.service import FOLD_CHUNK_EVENTS
from buildtel.shared.bus import connect_redis
from buildtel.shared.codec import decode_batch_raw, encode
from buildtel.shared.engines import RedisEngine
from buildtel.shared.keys import Keys
from buildtel.shared.protocol import EventBatch
from buildtel.shared.validate import MAX_BATCH_EVENTS, check_batch
from tests.util import synthetic_build


async def run(url: str, events: int, repeat: int) -> None:
    r = connect_redis(url)
    apply = r.register_script(lua.APPLY)
    for i in range(repeat):
        keys = Keys(f"bench{time.time_ns()}")
        sid, per_agent, _ = synthetic_build(targets=events // 2 + 1, seed=i)
        evs = per_agent["agent-a"][:events]
        data = encode(EventBatch(session_id=sid, agent_id="agent-a", events=evs))
        t0 = time.perf_counter()
        batch, raws = decode_batch_raw(data)
        check_batch(batch, time.time())
        t1 = time.perf_counter()
        payloads = fold.ops_payloads(raws, batch.events, FOLD_CHUNK_EVENTS)
        t2 = time.perf_counter()
        longest = 0.0
        for p in payloads:
            s = time.perf_counter()
            await apply(keys=[keys.session_meta(sid), keys.session_fragments(sid), keys.session_seen(sid, "agent-a"),
                              keys.active_of(sid), keys.finishing_of(sid), keys.completed(sid)],
                        args=[repr(time.time()), "agent-a", sid, p, "2"])
            longest = max(longest, time.perf_counter() - s)
        t3 = time.perf_counter()
        print(f"{events} events, {len(data)} bytes: decode+check {1e3 * (t1 - t0):.0f} ms, "
              f"payloads {1e3 * (t2 - t1):.0f} ms, Redis fold {1e3 * (t3 - t2):.0f} ms "
              f"({len(payloads)} calls, longest {1e3 * longest:.1f} ms)")
        async for k in r.scan_iter(match=f"{keys.ns}:*"):
            await r.delete(k)
    await r.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=MAX_BATCH_EVENTS)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, RedisEngine(Path(d)) as eng:
        asyncio.run(run(eng.url, args.events, args.repeat))


if __name__ == "__main__":
    main()
