"""Detector thresholds against the harness figures: what a faster alert costs.

Runs ``../shared/regress/harness.py``'s offline scoring and streaming replay (stride 5, tolerance
±3, 8 series per family) for the shipped ``Params`` and for each variant given, on one or more
seeds, and prints per run offline P/R/F1 and false alarms per 1000 builds, streaming F1, false
alerts per 1000 builds, latency median and p90, how many alerts came more than 10 builds late,
then each variant's p90 and F1 against the shipped ones of the same seed, and one JSON line.

    python -m benchmarks.regress_tradeoff [--seeds 20240601,424242,31337,7] [--variant h_level=4.0 ...]

Quality figures, not speed: docs/performance.md "Regression detector on the harness" quotes them.
CPU heavy (~15 s per seed and variant on one core): run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from buildtel.services.analyzer.cpcore import DEFAULT, Params
from buildtel.services.analyzer.regression import find_changes

HARNESS = Path(__file__).resolve().parents[1].parent / "shared" / "regress" / "harness.py"


def _harness() -> Any:
    if not HARNESS.is_file():
        raise SystemExit(f"the regression harness is missing at {HARNESS} (../shared/regress/ beside the repository)")
    spec = importlib.util.spec_from_file_location("regress_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["regress_harness"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _variant(text: str) -> tuple[str, Params]:
    changes: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in {f.name for f in dataclasses.fields(Params)}:
            raise SystemExit(f"unknown Params field {key!r}")
        changes[key] = float(value)
    return text, dataclasses.replace(DEFAULT, **changes)  # type: ignore[arg-type]


def run(h: Any, params: Params, seed: int) -> dict[str, Any]:
    def detect(values: list[float]) -> list[int]:
        return sorted({c.index for c in find_changes(values, params=params) if 0 < c.index < len(values)})

    res = h.evaluate(detect, h.make_cases(seed, 8), 3, False, False, 1, False, 5)
    a = h.aggregate(res)
    lats = [x for r in res if r.stream for x in r.stream["latencies"]]
    return {"f1": a["f1"], "precision": a["precision"], "recall": a["recall"], "fa_per_1k": a["fa_per_1k"],
            "s_f1": a["s_f1"], "s_fa_per_1k": a["s_fa_per_1k"], "lat_median": a["s_lat_median"],
            "lat_p90": a["s_lat_p90"], "late": sum(1 for x in lats if x > 10), "alerts": len(lats)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="20240601,424242,31337,7")
    ap.add_argument("--variant", action="append", default=[],
                    help="comma-separated Params changes, e.g. h_level=4.0 (repeatable)")
    args = ap.parse_args()
    h = _harness()
    variants = [("shipped", DEFAULT), *(_variant(v) for v in args.variant)]
    out: dict[str, dict[str, Any]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, params in variants:
            r = out.setdefault(name, {})[str(seed)] = run(h, params, seed)
            print(f"{name:<24} seed {seed:>8}: offline P/R/F1 {r['precision']:.3f}/{r['recall']:.3f}/{r['f1']:.3f} "
                  f"FA/1k {r['fa_per_1k']:.2f} | streaming F1 {r['s_f1']:.3f} false alerts/1k "
                  f"{r['s_fa_per_1k']:.2f} latency median {r['lat_median']:g} p90 {r['lat_p90']:g} "
                  f"(>10: {r['late']}/{r['alerts']})", flush=True)
            base = out["shipped"][str(seed)]
            if name != "shipped":
                print(f"{'':<24} vs shipped: p90 x{r['lat_p90'] / base['lat_p90']:.2f}, F1 "
                      f"{r['f1'] - base['f1']:+.3f}, false alerts/1k x{r['s_fa_per_1k'] / base['s_fa_per_1k']:.2f}",
                      flush=True)
    print(json.dumps({"bench": "regress_tradeoff", "runs": out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
