"""Generate docs/protocol.md's field tables and docs/schemas/*.json from shared/protocol.py.

    python docs/gen_protocol.py           # rewrite the generated parts
    python docs/gen_protocol.py --check   # exit 1 naming what is stale, write nothing

The msgspec Structs are the one source: each field's type, whether it is required and its default
come from the Struct, its meaning and unit from the ``Annotated[..., _doc(meaning, unit)]`` next to
it (``msgspec.Meta(description=..., extra_json_schema={"unit": ...})``).  The JSON Schemas are
``msgspec.json.schema_components`` output, one file per Struct, referring to each other by file
name.  The tables replace what lies between ``<!-- BEGIN GENERATED: <block> -->`` and
``<!-- END GENERATED: <block> -->`` in docs/protocol.md; the rest of the page is written by hand.
A new field or Struct appears here without any change to this script;
tests/docs/test_protocol_docs.py fails when the committed files differ from what this writes, or
when a field has no meaning.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402 - after the sys.path set-up above, for a run as a script

from buildtel.shared import protocol  # noqa: E402 - same

PAGE = ROOT / "docs" / "protocol.md"
SCHEMAS = ROOT / "docs" / "schemas"
COMMAND = "python docs/gen_protocol.py"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# Each block documents the Structs reachable from its roots that an earlier block did not.
BLOCKS: dict[str, list[type]] = {
    "events": [protocol.EventBatch, *protocol.Event.__args__],  # type: ignore[attr-defined]
    "sessions": [protocol.BuildSession],
}


def _components() -> tuple[dict[str, list[str]], dict[str, Any]]:
    """(Struct names per block, in reading order; every Struct's JSON Schema by name)."""
    _, defs = msgspec.json.schema_components([r for roots in BLOCKS.values() for r in roots],
                                             ref_template="{name}.json")
    order: dict[str, list[str]] = {}
    seen: set[str] = set()
    for block, roots in BLOCKS.items():
        _, mine = msgspec.json.schema_components(roots, ref_template="{name}.json")
        names = [r.__name__ for r in roots] + [n for n in mine if n not in {r.__name__ for r in roots}]
        order[block] = [n for n in names if n not in seen]
        seen.update(names)
    return order, defs


def _anchor(name: str) -> str:
    return f"msg-{name.lower()}"


def _type(node: dict[str, Any]) -> str:
    """A JSON Schema node as a short type, Markdown-ready (``|`` escaped for table cells)."""
    if "$ref" in node:
        name = node["$ref"].removesuffix(".json")
        return f"[{name}](#{_anchor(name)})"
    if "anyOf" in node:
        return " \\| ".join(_type(n) for n in node["anyOf"])
    if "enum" in node:
        return " \\| ".join(f'`"{v}"`' for v in node["enum"])
    kind = node.get("type")
    if kind == "array":
        if "prefixItems" in node:
            return "[" + ", ".join(_type(n) for n in node["prefixItems"]) + "]"
        return f"list[{_type(node.get('items', {}))}]"
    if kind == "object":
        return f"map[str, {_type(node.get('additionalProperties', {}))}]"
    return {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "null"}.get(
        str(kind), "any")


def _default(field: msgspec.inspect.Field) -> str:
    if field.required:
        return "—"
    if field.default is not msgspec.NODEFAULT:
        return f"`{json.dumps(field.default, ensure_ascii=False)}`"
    made = field.default_factory()
    if isinstance(made, msgspec.Struct):
        return f"{type(made).__name__} with its defaults"
    return f"`{json.dumps(made)}`"


def _declared_in(cls: type, name: str) -> int:
    """How far from the root of ``cls``'s class tree ``name`` is declared (base fields sort first)."""
    for depth, base in enumerate(reversed(cls.__mro__)):
        if name in vars(base).get("__annotations__", {}):
            return depth
    return len(cls.__mro__)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def struct_table(name: str, cls: type, schema: dict[str, Any]) -> str:
    """The Markdown section for one Struct: what it is, how it is encoded, a row per field."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    array = info.array_like
    lines = [f'<a id="{_anchor(name)}"></a>', f"#### {name}", ""]
    doc = (schema.get("description") or "").strip()
    if doc:
        lines += [re.sub(r"``([^`]+)``", r"`\1`", " ".join(doc.split())), ""]
    if array:
        lines += [("Encoded as an **array** of its fields in this order (no names); trailing fields that hold "
                   "their default may be absent."), ""]
    elif info.tag is not None:
        lines += [f'Encoded as a map with `"{info.tag_field}": "{info.tag}"` and the fields below'
                  + ("; a field at its default may be absent (read it as the default)."
                     if cls.__struct_config__.omit_defaults
                     else "."), ""]
    elif cls.__struct_config__.omit_defaults:
        lines += ["Encoded as a map; a field at its default may be absent (read it as the default).", ""]
    else:
        lines += ["Encoded as a map with every field.", ""]
    head = ("| # " if array else "") + "| field | type | required | default | unit | meaning |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    props = schema.get("properties") or {}
    items = schema.get("prefixItems") or []
    fields = list(enumerate(info.fields))
    if not array:  # fields every event shares (from a base Struct) first, as the page reads best
        fields.sort(key=lambda p: _declared_in(cls, p[1].name))
    for i, f in fields:
        node = items[i] if array else props[f.encode_name]
        unit = node.get("unit", "")
        meaning = node.get("description", "")
        row = (f"| {i} " if array else "") + (
            f"| `{f.encode_name}` | {_type(node)} | {'required' if f.required else 'optional'} | "
            f"{_default(f)} | {_cell(unit)} | {_cell(meaning)} |")
        lines.append(row)
    lines.append("")
    return "\n".join(lines)


def _struct_classes() -> dict[str, type]:
    return {n: c for n, c in vars(protocol).items()
            if isinstance(c, type) and issubclass(c, msgspec.Struct) and c is not msgspec.Struct}


def blocks() -> dict[str, str]:
    """The generated text of each block of docs/protocol.md."""
    order, defs = _components()
    classes = _struct_classes()
    out = {}
    for block, names in order.items():
        intro = (f"<!-- Generated by `{COMMAND}` from shared/protocol.py: edit the Structs, then run it. -->\n\n"
                 f"JSON Schema of each: `docs/schemas/<name>.json`.\n\n")
        out[block] = intro + "\n".join(struct_table(n, classes[n], defs[n]) for n in names)
    return out


def schemas() -> dict[str, str]:
    """File name -> text of docs/schemas/: one JSON Schema per Struct, plus ``Event`` (the union)."""
    order, defs = _components()
    out = {}
    for name in [n for names in order.values() for n in names]:
        doc = {"$schema": SCHEMA_DIALECT, "$id": f"{name}.json", **defs[name]}
        out[f"{name}.json"] = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    union = defs["EventBatch"]["properties"]["events"]["items"]
    event = {"$schema": SCHEMA_DIALECT, "$id": "Event.json", "title": "Event",
             "description": "One event: the `type` tag says which.", **union}
    out["Event.json"] = json.dumps(event, indent=2, ensure_ascii=False) + "\n"
    return out


def render_page(text: str, generated: dict[str, str]) -> str:
    """``text`` with each block's markers' contents replaced; a missing marker is an error."""
    for block, body in generated.items():
        pat = re.compile(rf"(<!-- BEGIN GENERATED: {block} -->\n).*?(<!-- END GENERATED: {block} -->)", re.DOTALL)
        if not pat.search(text):
            raise SystemExit(f"{PAGE}: no '<!-- BEGIN GENERATED: {block} -->' ... "
                             f"'<!-- END GENERATED: {block} -->' markers to write the {block} tables between")
        text = pat.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def undocumented() -> list[str]:
    """``Struct.field`` of every field without a meaning: the tables would have an empty cell."""
    _, defs = _components()
    classes = _struct_classes()
    missing = []
    for name, schema in defs.items():
        fields = msgspec.inspect.type_info(classes[name]).fields  # type: ignore[attr-defined]
        nodes = schema.get("prefixItems") or [schema["properties"][f.encode_name] for f in fields]
        missing += [f"{name}.{f.name}" for f, n in zip(fields, nodes, strict=True) if not n.get("description")]
    return missing


def stale() -> list[str]:
    """Paths whose committed text differs from what this script writes."""
    bad = []
    if PAGE.read_text() != render_page(PAGE.read_text(), blocks()):
        bad.append(str(PAGE.relative_to(ROOT)))
    want = schemas()
    have = {p.name: p.read_text() for p in SCHEMAS.glob("*.json")} if SCHEMAS.is_dir() else {}
    bad += [f"docs/schemas/{n}" for n in sorted(set(want) | set(have)) if want.get(n) != have.get(n)]
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="name stale files and exit 1; write nothing")
    args = ap.parse_args()
    if args.check:
        bad = stale()
        for p in bad:
            print(f"stale: {p}", file=sys.stderr)
        if bad:
            print(f"run {COMMAND} to update", file=sys.stderr)
        return 1 if bad else 0
    PAGE.write_text(render_page(PAGE.read_text(), blocks()))
    SCHEMAS.mkdir(exist_ok=True)
    want = schemas()
    for old in SCHEMAS.glob("*.json"):
        if old.name not in want:
            old.unlink()
            print(f"removed docs/schemas/{old.name} (no such Struct any more)")
    for name, text in want.items():
        (SCHEMAS / name).write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(BLOCKS)} blocks) and {len(want)} schemas in docs/schemas/")
    for f in undocumented():
        print(f"warning: {f} has no meaning: add _doc(...) to it in shared/protocol.py", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
