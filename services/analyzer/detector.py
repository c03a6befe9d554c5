"""A thin adapter over the change-point detector in ``services/analyzer/regression.py``.

That module is owned by the detector's author; everything the alerting code
needs from it goes through here, so an API change there is absorbed in one
place.  We use ``StreamingDetector`` (``update(value, cached=None)``,
``to_bytes()``/``from_bytes()``) and read from the ``ChangePoint`` it returns
(``index``, ``before_median``/``after_median``, ``change_pct``, ``confidence``,
``direction`` "regression"/"improvement", ``kind``, ``channel``) tolerantly, so a
renamed or missing field degrades to our own estimate instead of failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily at run time (see Detector.new): only its type is needed here
    from buildtel.services.analyzer.regression import StreamingDetector


@dataclass(frozen=True, slots=True)
class Change:
    """A confirmed change, normalised: ``index`` is the 0-based position in the series of the
    first value of the new regime; ``direction`` +1 slower, -1 faster."""

    index: int
    direction: int
    before: float | None = None  # medians as the detector estimated them, when it says
    after: float | None = None
    confidence: float | None = None  # 0..1
    p_value: float | None = None
    kind: str = "level"  # "level", or "mix" when the share of cache misses moved
    change_pct: float | None = None
    channel: str = "all"  # builds it was seen in: "all", or only cache "hit"s / "miss"es


def _get(obj: Any, *names: str) -> Any:
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return None


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def normalise(cp: Any) -> Change:
    index = int(_get(cp, "index", "idx", "position", "at", "start"))
    before = _num(_get(cp, "before_median", "before", "median_before", "old", "baseline"))
    after = _num(_get(cp, "after_median", "after", "median_after", "new", "current"))
    raw_dir = _get(cp, "direction", "sign")
    if isinstance(raw_dir, str):
        direction = -1 if raw_dir.lower() in ("down", "faster", "improvement", "-1", "decrease") else 1
    elif raw_dir is not None:
        direction = 1 if float(raw_dir) > 0 else -1
    elif before is not None and after is not None:
        direction = 1 if after >= before else -1
    else:
        direction = 1
    p = _num(_get(cp, "p_value", "pvalue", "p"))
    conf = _num(_get(cp, "confidence", "probability", "certainty"))
    if conf is None and p is not None:
        conf = 1.0 - p
    kind = _get(cp, "kind", "type") or "level"
    return Change(index=index, direction=direction, before=before, after=after,
                  confidence=None if conf is None else min(max(conf, 0.0), 1.0), p_value=p, kind=str(kind),
                  change_pct=_num(_get(cp, "change_pct", "pct", "percent")),
                  channel=str(_get(cp, "channel") or "all"))


class Detector:
    """One series' detector: feed values, get normalised changes, persist as bytes."""

    __slots__ = ("inner",)

    def __init__(self, inner: StreamingDetector) -> None:
        self.inner = inner

    @classmethod
    def new(cls) -> Detector:
        from buildtel.services.analyzer import regression

        return cls(regression.StreamingDetector())

    @classmethod
    def load(cls, data: bytes) -> Detector:
        from buildtel.services.analyzer import regression

        return cls(regression.StreamingDetector.from_bytes(data))

    def update(self, value: float, cached: bool | None = None) -> Change | None:
        cp = self.inner.update(value, cached=cached)
        return None if cp is None else normalise(cp)

    def dump(self) -> bytes:
        return self.inner.to_bytes()
