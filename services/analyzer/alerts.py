"""Regression alerts: which series a session feeds, per-series state, and the ``Alert`` record.

Like is compared with like.  A session feeds:

* ``build|<branch>``: its wall time, when it succeeded (failed builds stop early) and is
  complete: a session that lost events (``BuildSession.completeness``: a refused batch, a
  sequence gap, an abandoned build) is not a whole build, so it never feeds this series;
* ``target|<branch>|<name>``: each target that succeeded, with its cache flag:
  served from a cache (``local_hit``/``remote_hit``) or executed (``miss``,
  ``uncacheable``).  The detector keeps hits and misses in separate streams (a hit
  and a real run differ by orders of magnitude) and tests the miss share on its
  own, so a change of one kind is never mistaken for a change of the mix.

Each series has a :class:`SeriesState`: the detector's bytes plus a short ring of
the latest points (session id, commit, value), enough to name the first session
after a change, the last one before it (the suspect commit range) and the
medians either side.  A build judged host-slowed (``hostload.py``: most of its targets slowed
down together) feeds its points divided by its build-wide factor, and its machine's
``host|<machine>`` series raises one ``host`` event per slowdown.  :func:`fold` is pure: state
bytes in, state bytes and at most one alert out, so the service can run it under a
compare-and-set.
"""

from __future__ import annotations

import hashlib
import statistics
from typing import Literal

import msgspec

from buildtel.services.analyzer.analytics import branch_of, commit_of
from buildtel.services.analyzer.detector import Change, Detector
from buildtel.services.analyzer.explain import Explanation, lines
from buildtel.services.analyzer.hostload import (
    HISTORY_RUNS,
    HOST_CLEAR_BUILDS,
    MIN_JUDGED,
    NORMAL,
    History,
    HostState,
    Judgement,
    baseline,
    evidence,
    host_of,
    host_state_decoder,
)
from buildtel.shared.protocol import CACHE_HITS, BuildSession, is_complete

RING = 128  # points kept per series to name the sessions around a change (and fallback medians)
MEDIAN_WINDOW = 20  # points each side of a change that its medians use at most
# A point whose session came this many stream messages after a newer point of its series was
# folded is "late" (a redelivery after a replica died): it is recorded, not fed to the detector,
# because a burst of stale values arriving after a change reads as a second change back.
LATE_WINDOW = 64
# A change smaller than this (in seconds, between the medians) is real but not worth anyone's
# attention: cache hits and tiny actions move by tens of milliseconds from run to run.
MIN_ABS_CHANGE_S = 0.25

Kind = Literal["build", "target", "host"]


class Point(msgspec.Struct, frozen=True, kw_only=True):
    series: str
    kind: Kind
    value: float
    branch: str | None
    target: str | None = None
    cached: bool | None = None  # None: no cache flag (whole builds)
    cpu: float | None = None  # the target's CPU time, when captured
    host: str | None = None  # the machine (host points)
    span: float = 0.0  # build points: first target start to last target end (0: no targets)


class Entry(msgspec.Struct, array_like=True):
    i: int  # position in the series
    sid: str
    commit: str | None
    start: float
    value: float
    c: int = 0  # cache flag: 0 none, 1 hit, 2 miss
    f: float = 1.0  # build-wide load factor of its build (hostload.py); 1: not host-slowed
    cpu: float = -1.0  # CPU time of the target; -1: not captured
    nv: float = -1.0  # the load-normalised value fed to the detector; -1: ``value`` itself
    o: float = -1.0  # build points: wall time outside the targets' span (start-up, tail); -1: unknown
    s: int = 0  # 1: recorded, not fed to the detector (a target in the load band of a host-slowed build)

    @property
    def fed(self) -> float:
        """The value fed to the detector (the measured one for a point not fed)."""
        return self.nv if self.nv >= 0 else self.value


class SeriesState(msgspec.Struct, kw_only=True):
    n: int = 0  # points folded
    det: bytes = b""  # StreamingDetector.to_bytes()
    ring: list[Entry] = []
    last_sid: str = ""  # the last session folded (diagnostics; idempotency uses per-session markers)
    alerts: int = 0
    seq: int = 0  # highest stream sequence fed to the detector
    late: int = 0  # points recorded but not fed (see LATE_WINDOW)
    immaterial: int = 0  # changes detected but smaller than MIN_ABS_CHANGE_S: not alerted
    skipped: int = 0  # points recorded, not fed: in the load band of a host-slowed build (hostload.py)


class Alert(msgspec.Struct, kw_only=True):
    """One detected change of one series, published once on ``<ns>.alerts.<kind>.<branch>.<target>``."""

    id: str  # deterministic: hash of the detecting session and the series (the Nats-Msg-Id)
    kind: Kind
    direction: Literal["regression", "improvement"]
    series: str
    branch: str | None
    target: str | None  # None for a whole-build alert
    cache: Literal["hit", "miss"] | None  # the builds the change was seen in; None: all of them
    before_median_s: float
    after_median_s: float
    change_pct: float  # (after / before - 1) * 100
    confidence: float  # 0..1 (1 - p-value when the detector gives one)
    p_value: float | None
    first_session_id: str  # first session of the new regime
    first_session_start: float
    last_good_session_id: str | None  # last session before the change
    last_good_commit: str | None
    first_bad_commit: str | None
    commit_range: str | None  # "<last good>..<first bad>", as git log takes it
    detected_session_id: str  # the session whose arrival confirmed the change
    detected_at: float  # Unix s
    points_before: int  # points of the series kept before / after the change (at most RING in all)
    points_after: int
    change_kind: str = "level"
    # Later fields (schema evolution: new fields with defaults only).
    host: str | None = None  # the machine of the first bad build (the subject of a host event)
    explanation: Explanation | None = None  # why: culprits, critical-path shift, what else changed


_state_dec = msgspec.msgpack.Decoder(SeriesState)


class _RingOnly(msgspec.Struct):
    """A series state's ring alone (msgspec skips the detector's bytes)."""

    ring: list[Entry] = []


_ring_dec = msgspec.msgpack.Decoder(_RingOnly)
_enc = msgspec.msgpack.Encoder()
alert_decoder = msgspec.msgpack.Decoder(Alert)


def series_points(session: BuildSession) -> list[Point]:
    branch = branch_of(session)
    b = branch or "_"
    out: list[Point] = []
    # An incomplete build's targets that did arrive are whole measurements and feed their series;
    # its wall time stands for a build we did not fully see, so it does not (docs/analytics.md).
    if session.outcome == "success" and session.duration_s > 0 and is_complete(session):
        ran = [t for t in session.targets if t.duration_s > 0]
        span = max(t.end for t in ran) - min(t.start for t in ran) if ran else 0.0
        out.append(Point(series=f"build|{b}", kind="build", value=session.duration_s, branch=branch,
                         span=min(max(span, 0.0), session.duration_s)))
    seen: set[str] = set()
    for t in session.targets:
        if t.status != "success" or t.duration_s <= 0 or t.name in seen:
            continue
        seen.add(t.name)
        out.append(Point(series=f"target|{b}|{t.name}", kind="target", value=t.duration_s, branch=branch,
                         target=t.name, cached=t.cache in CACHE_HITS, cpu=t.cpu_s))
    host = host_of(session)
    # A build with too few executed targets cannot say anything about its machine.
    if host is not None and sum(1 for p in out if p.cached is False) >= MIN_JUDGED:
        out.append(Point(series=f"host|{host}", kind="host", value=session.duration_s, branch=branch, host=host))
    return out


def history(states: dict[str, bytes | None], points: dict[str, Point], session_id: str,
            decoded: dict[str, tuple[bytes, SeriesState]] | None = None) -> dict[str, History]:
    """Target name -> its earlier executed runs (load-normalised), from the series states read for
    ``session_id`` (its own point, already folded on a redelivery, is left out).  ``decoded``, when
    given, receives each state decoded, for :func:`fold` to reuse rather than decode it again."""
    out: dict[str, History] = {}
    for name, data in states.items():
        p = points.get(name)
        if p is None or p.kind != "target" or p.target is None or not data:
            continue
        try:
            st = _state_dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # fold() starts such a series afresh
        if decoded is not None:
            decoded[name] = (data, st)
        ring = st.ring
        runs: list[tuple[float, float | None, bool]] = []
        for e in reversed(ring):  # newest first, only as many as a baseline can use
            if e.c == 2 and e.sid != session_id:
                runs.append((e.fed, e.cpu if e.cpu >= 0 else None, e.f == 1.0))
                if len(runs) >= HISTORY_RUNS:
                    break
        runs.reverse()
        out[p.target] = History(runs=runs)
    return out


def alert_id(session_id: str, series: str) -> str:
    return hashlib.sha256(f"{session_id}\x00{series}".encode()).hexdigest()[:32]


def decode_state(data: bytes | None) -> SeriesState:
    return _state_dec.decode(data) if data else SeriesState()


def _load(data: bytes | None, decoded: SeriesState | None = None) -> tuple[SeriesState, Detector]:
    """The series state and its detector; unreadable state (a format change in a new release)
    starts the series afresh rather than failing every session of it forever."""
    try:
        st = decoded if decoded is not None else decode_state(data)
        return st, (Detector.load(st.det) if st.det else Detector.new())
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return SeriesState(), Detector.new()


def fold(state_bytes: bytes | None, point: Point, session: BuildSession, *, now: float,
         seq: int | None = None, judgement: Judgement = NORMAL,
         decoded: SeriesState | None = None) -> tuple[bytes, Alert | None, bool]:
    """Feed one point; return the new state, the alert its change confirmed (if any) and whether
    the point was late (``seq``: the session's stream sequence; None skips the lateness test).
    ``judgement``: what the build's targets said of its machine (hostload.judge); ``decoded``:
    ``state_bytes`` already decoded (by :func:`history`; it is changed in place)."""
    if point.kind == "host":
        return fold_host(state_bytes, point, session, now=now, judgement=judgement)
    st, det = _load(state_bytes, decoded)
    if seq is not None and st.seq and seq < st.seq - LATE_WINDOW:
        st.late += 1
        return _enc.encode(st), None, True
    i = st.n
    flag = 0 if point.cached is None else (1 if point.cached else 2)
    factor, fed = judgement.factor, point.value
    overhead = point.value - point.span if point.kind == "build" else -1.0
    base = judgement.bases.get(point.target or "")
    skip = point.kind == "target" and judgement.in_band(point.value, base)
    if factor != 1.0 and not skip:
        fed = (_normalise_build(st, point, session, judgement) if point.kind == "build"
               else judgement.normalise(point.value, base))
    # A point not fed keeps the position of the next fed one (ring positions are the detector's).
    st.ring.append(Entry(i=i, sid=session.id, commit=commit_of(session), start=session.start, value=point.value,
                         c=flag, f=factor, cpu=point.cpu if point.cpu is not None else -1.0,
                         nv=fed if factor != 1.0 and not skip else -1.0, o=overhead, s=int(skip)))
    if len(st.ring) > RING:
        del st.ring[: len(st.ring) - RING]
    st.last_sid = session.id
    st.seq = max(st.seq, seq or 0)
    if skip:
        st.skipped += 1
        return _enc.encode(st), None, False
    change = det.update(fed, cached=point.cached)
    st.n = i + 1
    st.last_sid = session.id
    st.seq = max(st.seq, seq or 0)
    st.det = det.dump()
    alert = None
    if change is not None:
        alert = make_alert(st, change, point, session, now=now)
        if abs(alert.after_median_s - alert.before_median_s) < MIN_ABS_CHANGE_S:
            alert = None
            st.immaterial += 1
        else:
            st.alerts += 1
    return _enc.encode(st), alert, False


def _normalise_build(st: SeriesState, point: Point, session: BuildSession, j: Judgement) -> float:
    """A host-slowed build's wall time without the load: its targets' span scaled by the share of
    their time that is not load (each target normalised as its own series is), plus the time
    outside the targets (start-up, probes, tail) at its usual value in builds judged normal —
    that part cannot be judged while the machine is busy (docs/analytics.md "Host slowdowns")."""
    raw = norm = 0.0
    for t in session.targets:
        if t.status == "success" and t.duration_s > 0:
            raw += t.duration_s
            norm += j.normalise(t.duration_s, j.bases.get(t.name))
    outside = point.value - point.span
    usual = baseline([e.o for e in st.ring if e.f == 1.0 and e.o >= 0])
    outside = min(outside, usual if usual is not None else outside / j.factor)
    return outside + point.span * (norm / raw if raw > 0 else 1.0 / j.factor)


def make_alert(st: SeriesState, change: Change, point: Point, session: BuildSession, *, now: float) -> Alert:
    ring = st.ring
    k = min(max(change.index, ring[0].i), ring[-1].i)  # a change older than the ring: name what we have
    # The first bad build is the first *fed* point of the new level; points not fed (host-slowed
    # builds in the load band) between it and the last good one widen the range, not name it.
    fed = [e for e in ring if not e.s]
    before = [e for e in fed if e.i < k]
    after = [e for e in fed if e.i >= k] or fed[-1:]
    # Fallback medians (the detector did not give one) over the builds of the change's channel.
    want = {"hit": (1,), "miss": (2,)}.get(change.channel, (0, 1, 2))
    b_vals = [e.fed for e in before if e.c in want][-MEDIAN_WINDOW:]
    a_vals = [e.fed for e in after if e.c in want][:MEDIAN_WINDOW]
    b_med = change.before if change.before is not None and change.before > 0 else (
        statistics.median(b_vals) if b_vals else None)
    a_med = change.after if change.after is not None and change.after > 0 else (
        statistics.median(a_vals) if a_vals else None)
    # A confirmed change is always reported, even when one side has no sample left to name.
    a_med = a_med if a_med is not None else point.value
    b_med = b_med if b_med is not None else 0.0
    # The detector's percentage (means for a mix change, where medians may not move) wins.
    pct = change.change_pct if change.change_pct is not None else (
        (a_med / b_med - 1.0) * 100.0 if b_med > 0 else 0.0)
    slower = change.direction > 0 if change.direction else a_med > b_med
    first, last = after[0], (before[-1] if before else None)
    conf = change.confidence if change.confidence is not None else (
        1.0 - change.p_value if change.p_value is not None else 0.0)
    return Alert(
        id=alert_id(session.id, point.series), kind=point.kind, direction="regression" if slower else "improvement",
        series=point.series, branch=point.branch, target=point.target,
        cache=change.channel if change.channel in ("hit", "miss") else None, before_median_s=b_med,  # type: ignore[arg-type]
        after_median_s=a_med, change_pct=pct, confidence=conf, p_value=change.p_value, first_session_id=first.sid,
        first_session_start=first.start, last_good_session_id=last.sid if last else None,
        last_good_commit=last.commit if last else None, first_bad_commit=first.commit,
        commit_range=f"{last.commit}..{first.commit}" if last and last.commit and first.commit else None,
        detected_session_id=session.id, detected_at=now, points_before=len(before), points_after=len(after),
        change_kind=change.kind, host=host_of(session))


def fold_host(state_bytes: bytes | None, point: Point, session: BuildSession, *, now: float,
              judgement: Judgement) -> tuple[bytes, Alert | None, bool]:
    """A host's series: one ``host`` event when a slowdown starts, none while it lasts."""
    try:
        st = host_state_decoder.decode(state_bytes) if state_bytes else HostState()
    except (msgspec.DecodeError, msgspec.ValidationError):
        st = HostState()
    alert = None
    if judgement.judged:
        st.builds += 1
    if judgement.slowed:
        st.slowed += 1
        st.normal_run = 0
        if not st.slow:
            st.slow = True
            st.events += 1
            j = judgement
            alert = Alert(
                id=alert_id(session.id, point.series), kind="host", direction="regression", series=point.series,
                branch=point.branch, target=None, cache=None, before_median_s=j.baseline_sum_s,
                after_median_s=j.value_sum_s, change_pct=(j.median_ratio - 1.0) * 100.0,
                confidence=j.slower_share, p_value=None, first_session_id=session.id,
                first_session_start=session.start, last_good_session_id=st.last_good_sid,
                last_good_commit=st.last_good_commit, first_bad_commit=commit_of(session),
                commit_range=f"{st.last_good_commit}..{commit_of(session)}"
                if st.last_good_commit and commit_of(session) else None,
                detected_session_id=session.id, detected_at=now, points_before=0, points_after=1,
                change_kind="host", host=point.host)
            alert.explanation = Explanation(summary="", code_change=None, host_slowdown=evidence(session, j))
    elif judgement.judged:
        st.normal_run += 1
        if st.normal_run >= HOST_CLEAR_BUILDS:  # a lull of fewer builds is the same slowdown going on
            st.slow = False
        st.last_good_sid, st.last_good_commit, st.last_good_start = session.id, commit_of(session), session.start
    return _enc.encode(st), alert, False


def ring_of(data: bytes) -> list[Entry]:
    """The ring of a stored series state (its points with their sessions and load factors)."""
    return _ring_dec.decode(data).ring


def explanation_lines(a: Alert) -> list[str]:
    """The alert's explanation for people (``buildtel alerts``, chat messages); [] when it has none."""
    return lines(a.explanation) if a.explanation is not None else []


def encode_alert(a: Alert) -> bytes:
    return _enc.encode(a)
