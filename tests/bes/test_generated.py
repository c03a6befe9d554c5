"""services/bes/gen/ is exactly what deploy/gen_bes_protos.py makes of services/bes/protos/, and a
results link's invocation id (a UUID) names the session it maps to."""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

from buildtel.services.bes.stream import session_id_for
from buildtel.services.web.query import parse_session_id

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_bes_protos", ROOT / "deploy" / "gen_bes_protos.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = {p.name: p.read_text() for p in gen.generate(tmp_path / "gen")}
    committed = {p.name: p.read_text() for p in (ROOT / "services" / "bes" / "gen").glob("*.py")}
    assert fresh == committed, "services/bes/gen/ is stale: run python deploy/gen_bes_protos.py"


def test_invocation_id_in_the_results_link_is_the_session_id() -> None:
    inv = str(uuid.uuid4())
    assert session_id_for(inv) == parse_session_id(inv) == parse_session_id(inv.upper()) == inv.replace("-", "")
    # Not a UUID (another BES client): a stable id derived from it.
    assert session_id_for("build-42", "b") == session_id_for("build-42", "b") != session_id_for("build-43", "b")
    assert len(session_id_for("build-42")) == 32
