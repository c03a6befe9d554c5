"""The outcomes added after the store's format was fixed (``cancelled``, ``unknown``) and a target's
``error`` text: they round-trip through segments and index files, a reopen from either finds them,
``summaries(outcome=…)`` selects them, and trends count them apart from successes."""

from __future__ import annotations

import time
from pathlib import Path

from buildtel.services.storage import sidecar
from buildtel.services.storage.history import buckets
from buildtel.services.storage.index import Filters
from buildtel.services.storage.store import TelemetryStorage
from buildtel.shared.protocol import OUTCOMES

ERROR = ("cc -c src/bad.c -o obj/bad.o\nsrc/bad.c:1:9: error: expected ';' after top level declarator\n"
         "1 error generated.")


async def _open(d: Path) -> TelemetryStorage:
    store = TelemetryStorage(d, fsync=False, segment_bytes=4096)
    await store.open()
    return store


async def _by_outcome(store: TelemetryStorage) -> dict[str, list[str]]:
    return {o: [s.id for s in (await store.summaries(Filters(outcome=o), desc=False, limit=1000))[0]]
            for o in OUTCOMES}


async def test_new_outcomes_survive_reopen_from_index_files_and_from_segments(tmp_path: Path, make_session) -> None:
    # Trend buckets are epoch-aligned: every build inside one 1000 s bucket, whatever the clock says.
    now = time.time() // 1000 * 1000
    sessions = [make_session(i, finish=now - 500 + i, outcome=OUTCOMES[i % len(OUTCOMES)]) for i in range(25)]
    for s in sessions:
        if s.outcome in ("cancelled", "unknown"):
            s.exit_code = 130 if s.outcome == "cancelled" else None
        if s.outcome == "failed":
            s.targets[0].error = ERROR
    expected = {o: [s.id for s in sessions if s.outcome == o] for o in OUTCOMES}
    assert all(expected.values())
    d = tmp_path / "store"
    store = await _open(d)
    try:
        for i in range(0, len(sessions), 4):
            await store.append_many(sessions[i:i + 4])
        assert await _by_outcome(store) == expected  # the live index
    finally:
        await store.close()
    segments = sorted(d.glob("seg-*.btl"))
    assert len(segments) > 1 and all(sidecar.path_for(p).exists() for p in segments)

    store = await _open(d)  # from the index files
    try:
        assert await _by_outcome(store) == expected
        assert (await store.verify()).ok
        cancelled = await store.get(expected["cancelled"][0])
        assert cancelled is not None and (cancelled.outcome, cancelled.exit_code) == ("cancelled", 130)
        failed = await store.get(expected["failed"][0])
        assert failed is not None and failed.targets[0].error == ERROR and failed.targets[1].error is None
        assert [s.id for s in await store.query(outcome="unknown", limit=100)] == expected["unknown"][::-1]
    finally:
        await store.close()

    for p in segments:  # a store of the previous format: no index files, segments scanned
        sidecar.path_for(p).unlink()
    store = await _open(d)
    try:
        assert await _by_outcome(store) == expected
        summaries = (await store.summaries(Filters(), desc=False, limit=1000))[0]
    finally:
        await store.close()

    trend = buckets(summaries, now - 1000, now, 1000.0)
    (b,) = [x for x in trend if x.builds]
    counts = {o: len(ids) for o, ids in expected.items()}
    assert (b.succeeded, b.failed, b.abandoned, b.cancelled, b.unknown) == tuple(counts[o] for o in OUTCOMES)
    rated = counts["success"] + counts["failed"] + counts["abandoned"]
    assert b.success_rate == counts["success"] / rated  # cancelled and unknown are neither
