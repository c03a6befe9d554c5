"""Structs as keyed JSON objects, and the msgspec types that describe that JSON.

Our wire structs are compact on purpose (``TargetMetrics`` is ``array_like``, ``BuildSession``
omits defaults).  Scripts and the HTTP API want every field by name: :func:`keyed` turns a
struct into plain data (objects named by field, every field present, tagged structs with their
tag), and :func:`keyed_type` derives, from the same struct class, a struct type whose JSON
Schema describes exactly that output.  The web API's OpenAPI document is generated from those
derived types, so a field added to a wire struct appears in the API and its schema at once.
"""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Any

import msgspec

__all__ = ["keyed", "keyed_type"]


def keyed(obj: Any) -> Any:
    """``obj`` as plain data: structs as objects with every field (by its encoded name)."""
    if isinstance(obj, msgspec.Struct):
        cfg = obj.__struct_config__
        out: dict[str, Any] = {}
        if cfg.tag is not None:
            out[cfg.tag_field or "type"] = cfg.tag
        for attr, name in zip(obj.__struct_fields__, obj.__struct_encode_fields__, strict=True):
            out[name] = keyed(getattr(obj, attr))
        return out
    if isinstance(obj, dict):
        return {k: keyed(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [keyed(v) for v in obj]
    return obj


def _keyed_annotation(tp: Any) -> Any:
    """``tp`` with every struct class in it replaced by its :func:`keyed_type`."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return keyed_type(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is None or not args:
        return tp
    new = tuple(_keyed_annotation(a) for a in args)
    if origin is typing.Annotated:
        return typing.Annotated[new[0], *tp.__metadata__]
    if origin in (typing.Union, types.UnionType):
        return typing.Union[new]  # noqa: UP007 - built from a tuple at run time
    if origin is typing.Literal:
        return tp
    return origin[new if len(new) > 1 else new[0]]  # list[X], dict[K, V], tuple[X, ...]


@cache
def keyed_type(cls: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """A struct type with ``cls``'s fields, encoded as :func:`keyed` writes it: an object (never
    an array), with the same tag; nested struct types are derived the same way.  Same name, so
    the schema's component names are the wire types' names."""
    cfg = cls.__struct_config__
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: list[Any] = []
    for info in msgspec.structs.fields(cls):
        tp = _keyed_annotation(hints[info.name])
        if info.default is not msgspec.NODEFAULT:
            spec = msgspec.field(name=info.encode_name, default=info.default)
        elif info.default_factory is not msgspec.NODEFAULT:
            spec = msgspec.field(name=info.encode_name, default_factory=info.default_factory)
        else:
            spec = msgspec.field(name=info.encode_name)
        fields.append((info.name, tp, spec))
    tag: Any = cfg.tag if cfg.tag is not None else None
    return msgspec.defstruct(cls.__name__, fields, kw_only=True, tag=tag, tag_field=cfg.tag_field,
                             module=__name__)
