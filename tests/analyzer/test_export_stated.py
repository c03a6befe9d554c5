"""`buildtel export --format json` states every field of the report, defaults included."""

from __future__ import annotations

import json

import msgspec

from buildtel.services.analyzer.analytics import ReportFilter, TelemetryAnalyzer
from buildtel.services.analyzer.export import report_from_json, to_json
from buildtel.services.analyzer.synthetic import Scenario, generate


def _missing_keys(obj: object, doc: object, path: str = "$") -> list[str]:
    """Fields of ``obj`` (recursively) with no key in ``doc``."""
    if isinstance(obj, msgspec.Struct):
        assert isinstance(doc, dict), path
        out = [f"{path}.{n}" for n in obj.__struct_encode_fields__ if n not in doc]
        for attr, n in zip(obj.__struct_fields__, obj.__struct_encode_fields__, strict=True):
            if n in doc:
                out += _missing_keys(getattr(obj, attr), doc[n], f"{path}.{n}")
        return out
    if isinstance(obj, (list, tuple)):
        return [m for i, (o, d) in enumerate(zip(obj, doc, strict=True)) for m in _missing_keys(o, d, f"{path}[{i}]")]
    return []


def test_every_field_is_in_the_json_export_even_at_its_default() -> None:
    sessions = generate(Scenario(sessions=20, targets=8, seed=7))
    report = TelemetryAnalyzer().report(sessions, filters=ReportFilter(last=20), include_sessions=True)
    doc = json.loads(to_json(report))
    # ReportFilter leaves unset filters out on the wire; the export names them, null.
    assert doc["filters"]["last"] == 20
    assert all(doc["filters"][k] is None for k in ("since", "until", "branch", "outcome", "name", "target"))
    assert set(doc["filters"]) == set(ReportFilter.__struct_encode_fields__)
    assert _missing_keys(report, doc) == []
    assert report_from_json(to_json(report)) == report
