"""docs/protocol.md's field tables and docs/schemas/ are what the Structs say, and real messages fit them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Annotated

import msgspec
import pytest
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource

from buildtel.shared import protocol
from buildtel.shared.protocol import _doc
from tests.util import synthetic_build

ROOT = Path(__file__).resolve().parents[2]


def _generator():  # a script, loaded as a module
    spec = importlib.util.spec_from_file_location("gen_protocol", ROOT / "docs" / "gen_protocol.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_protocol"] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _generator()


def test_committed_page_and_schemas_match_the_structs() -> None:
    stale = gen.stale()
    assert not stale, f"{', '.join(stale)} differ from shared/protocol.py: run python docs/gen_protocol.py to update"


def test_every_field_says_what_it_means() -> None:
    missing = gen.undocumented()
    assert not missing, (f"fields without a meaning: {', '.join(missing)}: annotate them with "
                         "Annotated[..., _doc(meaning, unit)] in shared/protocol.py, "
                         "then run python docs/gen_protocol.py")


def test_a_new_field_gets_a_row_with_type_unit_and_default() -> None:
    class Probe(msgspec.Struct, kw_only=True, omit_defaults=True):
        """A struct with a field added later."""

        wait_s: Annotated[float | None, _doc("time waited", "s")] = None
        name: Annotated[str, _doc("who")]

    _, defs = msgspec.json.schema_components([Probe], ref_template="{name}.json")
    table = gen.struct_table("Probe", Probe, defs["Probe"])
    assert "| `wait_s` | float \\| null | optional | `null` | s | time waited |" in table
    assert "| `name` | str | required | — |  | who |" in table


def test_units_are_beside_the_names() -> None:
    page = (ROOT / "docs" / "protocol.md").read_text()
    assert "| `duration_s` | float | required | — | s | wall time the target took |" in page
    assert "| `ts` | float | required | — | Unix s | when the agent observed the event |" in page
    assert "| 3 | `duration_s` | float | required | — | s |" in page  # TargetMetrics, an array: by position


def _validator(name: str) -> Draft202012Validator:
    docs = {p.name: json.loads(p.read_text()) for p in (ROOT / "docs" / "schemas").glob("*.json")}
    registry = Registry().with_resources((n, Resource.from_contents(d)) for n, d in docs.items())
    return Draft202012Validator(docs[f"{name}.json"], registry=registry)


def _wire_as_json(obj: msgspec.Struct) -> object:
    """What the bus carries (MessagePack, defaults omitted) read back as plain JSON-like data."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(obj))


def test_real_batches_and_sessions_fit_their_json_schemas() -> None:
    from buildtel.services.collector import fold
    from buildtel.shared.codec import encode

    sid, per_agent, _ = synthetic_build(agents=("a", "b"), targets=30, seed=4)
    batch = protocol.EventBatch(session_id=sid, agent_id="a", events=per_agent["a"])
    _validator("EventBatch").validate(_wire_as_json(batch))
    health = protocol.HealthCheckpoint(session_id=sid, agent_id="a", seq=3, ts=1.7e9, eta_s=12.5,
                                       status="degraded", reasons=["memory 91% > 90%"])
    _validator("HealthCheckpoint").validate(_wire_as_json(health))

    events = [e for evs in per_agent.values() for e in evs]
    frag = [encode(e) for e in events if isinstance(e, (protocol.TargetFinished, protocol.TargetStarted))]
    meta = {b"started": encode(events[0]), b"finished": encode(per_agent["a"][-1]),
            b"events": str(len(events)).encode()}
    session = fold.build_session(sid, meta, [b"\xdd" + len(frag).to_bytes(4, "big") + b"".join(frag)], now=0.0)
    _validator("BuildSession").validate(_wire_as_json(session))


def test_the_schemas_refuse_what_a_decoder_refuses() -> None:
    ev = _wire_as_json(protocol.TargetFinished(session_id="ab" * 16, agent_id="a", seq=1, ts=1.7e9,
                                               target="//x", start=1.7e9, duration_s=1.5))
    assert isinstance(ev, dict)
    _validator("TargetFinished").validate(ev)
    no_duration = {k: v for k, v in ev.items() if k != "duration_s"}
    with pytest.raises(ValidationError, match="duration_s"):
        _validator("TargetFinished").validate(no_duration)
    with pytest.raises(msgspec.ValidationError, match="duration_s"):
        msgspec.msgpack.decode(msgspec.msgpack.encode(no_duration), type=protocol.Event)
    with pytest.raises(ValidationError):
        _validator("Event").validate({**ev, "cache": "maybe"})
