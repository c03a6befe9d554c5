"""What a Bazel Build Event Protocol stream says beyond its targets, read the same way by
``buildtel import bep`` (:mod:`.bep`) and the live BES endpoint (:mod:`.bep_stream`):

* **failed actions' output** (``actionCompleted``): Bazel names the action's stdout and stderr as
  ``File`` messages — inline ``contents``, or a ``file://`` URI on the machine Bazel runs on.  A
  URI is read only when it lies (symlinks resolved) under the Bazel output base this invocation
  named (``workspace`` → ``localExecRoot`` = ``<output base>/execroot/<workspace>``, and the
  directory holds Bazel's ``DO_NOT_BUILD_HERE`` marker): a path a message names anywhere else is
  never opened.  Only the last ``output_kib`` KiB of each file are read; the lines are bounded
  and redacted as ``buildtel run``'s failures (``shared/capture/failures.py``) and kept as a
  :class:`TargetFailure`, the record ``buildtel show ID --failures`` shows;
* **test cases** (``testResult``): one :class:`TestCase` per attempt (suite: the package, name:
  the test's name, `` (shard N)`` when the test is sharded), so a test that failed and then
  passed in one build is flaky for ``buildtel tests --flaky``;
* **end-of-build figures**: ``buildMetrics`` (actions executed, action cache hits and misses,
  remote cache hits) and ``buildToolLogs``' ``critical path`` entry, as session labels.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import urllib.parse
from pathlib import Path
from typing import Any

from buildtel.shared.capture.failures import MAX_FAILURES, OUTPUT_BUDGET
from buildtel.shared.capture.failures import _failure as bounded_failure
from buildtel.shared.importers import proto_json as pj
from buildtel.shared.protocol import TargetFailure, TestCase
from buildtel.shared.redaction import redact_text

OUTPUT_KIB = 16  # the default of BUILDER_TELEMETRY_FAILURE_OUTPUT_KIB
CRITICAL_PATH_CHARS = 1000  # of the critical path's action lines kept as a label
TEST_OUTCOME = {"PASSED": "passed", "FLAKY": "passed", "FAILED": "failed", "TIMEOUT": "error",
                "REMOTE_FAILURE": "error", "INCOMPLETE": "error"}  # anything else did not run: skipped
_CRITICAL = re.compile(r"Critical Path: ([0-9.]+)s")
MESSAGE_CHARS = 1000  # of a test case's message, as shared/junit.py keeps them


def clean_message(text: str) -> str:
    """Redacted and bounded as shared/junit.py's messages (not imported: junit imports importers)."""
    text = redact_text(text.strip()[:4 * MESSAGE_CHARS])
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS - 1] + "…"


def output_base(workspace_info: dict[str, Any]) -> Path | None:
    """The Bazel output base an invocation's ``workspaceInfo`` names, when it is one on this
    machine (resolved; it holds Bazel's ``DO_NOT_BUILD_HERE`` marker); else None."""
    root = Path(str(workspace_info.get("localExecRoot", "") or ""))
    if not root.is_absolute() or root.parent.name != "execroot":
        return None
    try:
        base = root.parent.parent.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return base if (base / "DO_NOT_BUILD_HERE").is_file() else None


def _tail(file: dict[str, Any], base: Path | None, limit: int) -> tuple[bytes, int, str]:
    """(the last ``limit`` bytes of a BEP ``File``, bytes before them, why it was not read or "")."""
    name = str(file.get("name", "") or "output")
    if "contents" in file:
        try:
            data = base64.b64decode(str(file["contents"]), validate=True)
        except (binascii.Error, ValueError):
            return b"", 0, f"{name}: inline contents are not base64"
        return data[-limit:], max(0, len(data) - limit), ""
    uri = str(file.get("uri", ""))
    if not uri:
        return b"", 0, ""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return b"", 0, f"{name} is at {parsed.scheme or 'an unknown'}:// (not read)"
    if base is None:
        return b"", 0, f"{name} not read: no Bazel output base of this invocation on this machine"
    try:
        path = Path(urllib.parse.unquote(parsed.path)).resolve(strict=True)
    except (OSError, RuntimeError):
        return b"", 0, f"{name} not found on this machine"
    if not path.is_relative_to(base):  # symlinks resolved: never a path outside the output base
        return b"", 0, f"{name} is outside the invocation's output base (not read)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return b"", 0, f"{name} not readable ({exc.strerror})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return b"", 0, f"{name} is not a regular file (not read)"
        skipped = max(0, info.st_size - limit)
        os.lseek(fd, skipped, os.SEEK_SET)
        return os.read(fd, limit), skipped, ""
    finally:
        os.close(fd)


class Failures:
    """The failed actions' output of one invocation, bounded as a session's failures are."""

    def __init__(self, output_kib: int = OUTPUT_KIB) -> None:
        self.output_kib = output_kib
        self.base: Path | None = None
        self.found: list[TargetFailure] = []
        self.dropped = 0  # failed actions past MAX_FAILURES records: counted (label failures_dropped), not kept
        self._budget = OUTPUT_BUDGET

    def on_workspace(self, ev: dict[str, Any]) -> None:
        self.base = output_base(pj.obj(ev.get("workspaceInfo", {})))

    def on_action(self, target: str, action: dict[str, Any], action_target: str = "") -> None:
        """Keep a failed action's stdout then stderr (Bazel keeps them apart) for ``target`` (its
        label); the action's own target (``action_target``) gets a record pointing there."""
        if action.get("success"):
            return
        if len(self.found) >= MAX_FAILURES:
            self.dropped += 1
            return
        if action_target and action_target != target:
            self.found.append(TargetFailure(target=action_target, note=f"its output is kept with {target}"[:1000],
                                            kept_with=target))
        if any(f.target == target for f in self.found):
            return  # one record per target: its first failed action
        limit = self.output_kib * 1024
        lines: list[tuple[int, str]] = []
        notes, cut = [], 0
        for fd, key in ((1, "stdout"), (2, "stderr")):
            file = action.get(key)
            if not isinstance(file, dict):
                continue
            data, skipped, why = _tail(file, self.base, limit)
            cut += skipped
            if why:
                notes.append(why)
            text = data.decode("utf-8", "replace")
            if skipped and "\n" in text:  # the first line read is cut in two: drop it
                text = text.split("\n", 1)[1]
            lines += [(fd, line.rstrip("\r")) for line in text.splitlines()]
        note = "the failed action's stdout then stderr, from Bazel's action output files"
        if notes:
            note += "; " + "; ".join(notes)
        failure, used = bounded_failure(target, note, lines, self.output_kib, self._budget)
        failure.output_cut_bytes += cut
        self._budget -= used
        self.found.append(failure)


def test_case(label: str, run: int, shard: int, attempt: int, sharded: bool, res: dict[str, Any],
              duration_s: float) -> TestCase:
    """One attempt of a test (``testResult``) as a test case of the session."""
    package, _, name = label.rpartition(":")
    if not package:  # a label without a name part: //pkg means //pkg:pkg
        package, name = label, label.rsplit("/", 1)[-1]
    status = str(res.get("status", "NO_STATUS"))
    outcome = TEST_OUTCOME.get(status, "skipped")
    message = "" if outcome == "passed" else clean_message(
        f"{status} (run {run}, attempt {attempt})" + (f": {d}" if (d := pj.get(res, "statusDetails")) else ""))
    return TestCase(suite=package, name=f"{name} (shard {shard})" if sharded else name,
                    duration_s=duration_s, outcome=outcome, message=message,  # type: ignore[arg-type]
                    target=label)  # the test target that ran it: its page lists it (docs/tests.md)


def critical_path(tool_logs: dict[str, Any]) -> dict[str, str]:
    """Labels from ``buildToolLogs``' ``critical path`` entry: its length (``critical_path_s``)
    and its actions, longest first as Bazel lists them (``critical_path``, bounded)."""
    for log in pj.arr(tool_logs.get("log", [])):
        log = pj.obj(log)
        if log.get("name") != "critical path" or "contents" not in log:
            continue
        try:
            text = base64.b64decode(str(log["contents"]), validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return {}
        out: dict[str, str] = {}
        if m := _CRITICAL.search(text):
            out["critical_path_s"] = m.group(1)
        steps = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        if steps:
            out["critical_path"] = clean_message("; ".join(steps))[:CRITICAL_PATH_CHARS]
        return out
    return {}


def metrics_labels(metrics: dict[str, Any]) -> tuple[dict[str, str], tuple[int, int] | None]:
    """Labels from ``buildMetrics`` (actions executed, action cache, remote cache hits) and Bazel's
    action cache (hits, misses) when it says; raises TypeError/ValueError on a malformed payload."""
    labels: dict[str, str] = {}
    cache = None
    summary = pj.obj(pj.get(metrics, "actionSummary", {}))
    if (stats := pj.get(summary, "actionCacheStatistics")) is not None:
        stats = pj.obj(stats)
        cache = (pj.int64(stats.get("hits")) or 0, pj.int64(stats.get("misses")) or 0)
        labels.update(action_cache_hits=str(cache[0]), action_cache_misses=str(cache[1]))
    if (executed := pj.int64(pj.get(summary, "actionsExecuted"))) is not None:
        labels["actions_executed"] = str(executed)
    if (created := pj.int64(pj.get(summary, "actionsCreated"))) is not None:
        labels["actions_created"] = str(created)
    for runner in pj.arr(pj.get(summary, "runnerCount", [])):
        if pj.obj(runner).get("name") == "remote cache hit":
            labels["remote_cache_hits"] = str(pj.int64(runner.get("count")) or 0)
    timing = pj.obj(pj.get(metrics, "timingMetrics", {}))
    for key, label in (("wallTimeInMs", "wall_time_ms"), ("analysisPhaseTimeInMs", "analysis_phase_ms"),
                       ("executionPhaseTimeInMs", "execution_phase_ms")):
        if (ms := pj.int64(pj.get(timing, key))) is not None:  # Bazel's own figures, in its unit
            labels[label] = str(ms)
    return labels, cache


MAX_TEST_SUMMARIES = 100  # tests whose testSummary is kept as a label; further ones are counted
SUMMARY_LIST_CHARS = 1000  # of the tests_flaky label


class TestSummaries:
    """Bazel's verdict per test (``testSummary``), as session labels, bounded: ``test_summary:<label>``
    (overall status, runs, attempts, shards, cached runs, run time, first start and last stop),
    ``tests_flaky`` (the labels Bazel called FLAKY, cut at 1000 characters with "…") and
    ``tests_flaky_count``, ``test_summaries_dropped`` (tests past the cap of 100)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self) -> None:
        self.kept: dict[str, str] = {}
        self.flaky = ""  # the first FLAKY labels, at most SUMMARY_LIST_CHARS
        self.flaky_count = 0
        self.dropped = 0

    def add(self, name: str, summary: dict[str, Any]) -> None:
        status = str(summary.get("overallStatus", "NO_STATUS"))
        if status == "FLAKY":
            self.flaky_count += 1
            if len(self.flaky) <= SUMMARY_LIST_CHARS:
                self.flaky = f"{self.flaky} {name}".lstrip()
        if name not in self.kept and len(self.kept) >= MAX_TEST_SUMMARIES:
            self.dropped += 1
            return
        runs = pj.int64(pj.get(summary, "totalRunCount")) or pj.int64(pj.get(summary, "runCount")) or 0
        parts = [status, f"runs={runs}"]
        for key, word in (("attemptCount", "attempts"), ("shardCount", "shards"), ("totalNumCached", "cached")):
            if (n := pj.int64(pj.get(summary, key))) is not None:
                parts.append(f"{word}={n}")
        run_s = pj.duration(pj.get(summary, "totalRunDuration"))
        if run_s is None and (ms := pj.int64(pj.get(summary, "totalRunDurationMillis"))) is not None:
            run_s = ms / 1000.0
        if run_s is not None:
            parts.append(f"run_s={run_s:.3f}")
        for ts, millis, word in (("firstStartTime", "firstStartTimeMillis", "first_start_ms"),
                                 ("lastStopTime", "lastStopTimeMillis", "last_stop_ms")):
            if (at := pj.epoch_ms(summary, ts, millis)) is not None:
                parts.append(f"{word}={round(at)}")
        self.kept[name] = " ".join(parts)

    def labels(self) -> dict[str, str]:
        out = {f"test_summary:{name}": value for name, value in self.kept.items()}
        if self.flaky_count:
            text = self.flaky
            out["tests_flaky"] = text if len(text) <= SUMMARY_LIST_CHARS else text[:SUMMARY_LIST_CHARS - 1] + "…"
            out["tests_flaky_count"] = str(self.flaky_count)
        if self.dropped:
            out["test_summaries_dropped"] = str(self.dropped)
        return out
