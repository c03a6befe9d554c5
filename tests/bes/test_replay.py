"""Recorded real BEP streams (tests/data/bep/) replayed over gRPC in Bazel's framing give the
session ``buildtel import bep`` gives for the same file: the whole session (tests/bes/compare.py),
but the labels naming the path (docs/bazel.md)."""

from __future__ import annotations

import uuid

from buildtel.services.bes.service import BesService
from buildtel.services.bes.stream import session_id_for
from buildtel.shared.protocol import is_complete
from buildtel.shared.subjects import Subjects
from tests.bes.client import DATA, as_imported, read_bep_json, replay
from tests.bes.compare import same_as_import, target_view
from tests.util import completed_sessions

KAHLYS = DATA / "kahlys-battools_bazel7.1.2_test_build_events.json"
QAISJP = DATA / "qaisjp-aborted-payload_bazel3.4.1_test_bep.json"


_target_view = target_view
_same_as_import = same_as_import


async def test_bazel_7_test_stream_gives_the_imported_session(bes: BesService, nc) -> None:
    events = read_bep_json(KAHLYS)
    invocation = events[0].started.uuid
    result = await replay(bes.url.removeprefix("grpc://"), events, invocation)
    assert result.acks == list(range(1, len(events) + 2))  # every event and the stream end, in order
    [live] = await completed_sessions(nc.jetstream(), Subjects(bes.settings.namespace), 1)
    imported = as_imported(KAHLYS.read_bytes())
    _same_as_import(live, imported)
    assert live.id == session_id_for(invocation) == invocation.replace("-", "")
    assert is_complete(live) and live.outcome == "success"
    # Bazel's critical path and action cache figures (buildToolLogs, buildMetrics) are on the session.
    assert live.labels["critical_path_s"] == "0.20"
    assert live.labels["critical_path"] == "0.20s action 'Testing //go/cmd/geninter:geninter_test (run 2 of 2)'"
    assert (live.cache_hits, live.cache_misses, live.labels["actions_executed"]) == (0, 7, "7")
    # Every attempt is a test case: geninter_test failed its first run and passed its second.
    assert [(c.suite, c.name, c.outcome) for c in live.tests if c.name == "geninter_test"] == \
        [("//go/cmd/geninter", "geninter_test", "failed"), ("//go/cmd/geninter", "geninter_test", "passed")]
    assert len(live.tests) == 6
    # The flaky test: two runs, one failed, as the importer counts them.
    assert [t.status for t in live.targets if t.name.startswith("//go/pkg/alfred:alfred_test (test run")] == \
        [t.status for t in imported.targets if t.name.startswith("//go/pkg/alfred:alfred_test (test run")]


async def test_bazel_3_stream_with_an_aborted_last_event_gives_the_imported_session(bes: BesService, nc) -> None:
    # Bazel 3.4.1: buildFinished (success), then an aborted targetConfigured as the lastMessage.  (The
    # streams without buildFinished — cut short, or interrupted — are in test_mapping.py.)
    events = read_bep_json(QAISJP)
    await replay(bes.url.removeprefix("grpc://"), events, events[0].started.uuid)
    [live] = await completed_sessions(nc.jetstream(), Subjects(bes.settings.namespace), 1, timeout=30)
    _same_as_import(live, as_imported(QAISJP.read_bytes()))
    assert live.outcome == "success" and is_complete(live)


async def test_broken_stream_is_stored_incomplete_never_success(bes: BesService, nc) -> None:
    events = read_bep_json(KAHLYS)
    invocation = str(uuid.uuid4())
    events[0].started.uuid = invocation
    first_target = next(i for i, e in enumerate(events, start=1) if e.id.HasField("target_completed"))
    result = await replay(bes.url.removeprefix("grpc://"), events, invocation, stop_after=first_target)
    assert result.acks == list(range(1, first_target + 1))
    [live] = await completed_sessions(nc.jetstream(), Subjects(bes.settings.namespace), 1, timeout=30)
    assert live.id == invocation.replace("-", "")
    assert live.outcome == "abandoned" and not is_complete(live) and live.exit_code is None
    assert live.name == "bazel test //go/..." and len(live.targets) == 1


async def test_a_small_window_still_acknowledges_every_event_in_order(bes_settings, collector, nc) -> None:
    # Two requests per queue: the reader stops reading the call while acknowledgements are due.
    svc = BesService(bes_settings, bes_settings.nats_url or "", bes_settings.redis_url or "", port=0, window=2)
    await svc.start()
    try:
        events = read_bep_json(KAHLYS)
        result = await replay(svc.url.removeprefix("grpc://"), events, events[0].started.uuid)
        assert result.acks == list(range(1, len(events) + 2))
        [live] = await completed_sessions(nc.jetstream(), Subjects(bes_settings.namespace), 1)
        _same_as_import(live, as_imported(KAHLYS.read_bytes()))
    finally:
        await svc.stop()


async def test_workspace_status_after_the_first_targets_still_names_host_and_user(bes: BesService, nc) -> None:
    # On a loaded machine Bazel runs the workspace status command late: targets come before it.
    events = read_bep_json(KAHLYS)
    status = next(i for i, e in enumerate(events) if e.id.HasField("workspace_status"))
    first_target = next(i for i, e in enumerate(events) if e.id.HasField("target_completed"))
    assert status < first_target
    events.insert(first_target + 3, events.pop(status))
    invocation = str(uuid.uuid4())
    events[0].started.uuid = invocation
    result = await replay(bes.url.removeprefix("grpc://"), events, invocation)
    assert result.acks == list(range(1, len(events) + 2))
    [live] = await completed_sessions(nc.jetstream(), Subjects(bes.settings.namespace), 1)
    imported = as_imported(KAHLYS.read_bytes())
    assert live.environment is not None and imported.environment is not None
    assert (live.environment.hostname, live.environment.user) == (imported.environment.hostname,
                                                                  imported.environment.user) != ("", "")
    assert live.name == imported.name and _target_view(live) == _target_view(imported)
