"""A typed loader for plain data (YAML, JSON) into nested dataclasses, strict about keys and types.

`from_dict(Cls, data)` rejects an unknown key or a wrong type with an error naming the full dotted key and
what was expected; `to_dict` is its inverse; `apply_override` sets one dotted `key=value` (a YAML scalar);
`json_schema(Cls)` describes the same rules as a JSON Schema (with each field's docstring) for editors.
It knows nothing of umo's settings: `umo.config` holds the schema.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """Plain data (a params file, an override) that does not match the schema."""


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict in place; the value is parsed as a YAML scalar (1e-5, true, null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth])} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def from_dict(cls: type, data: Any, *, source: str = "params", prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types with the key's full name."""
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!s} (known keys of {where}: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(hints[name], value, source, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {prefix}{err}") from None


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}: {value!r} matches none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-6 as a string; YAML 1.2 and people mean a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key}: unsupported annotation {tp!r}")  # a schema bug, not user input


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a dataclass (what the params file would hold)."""
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------------- JSON Schema


def json_schema(cls: type, *, extra: dict[str, type] | None = None, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of dataclass `cls`: the loader's rules (types, choices, no unknown keys),
    each field's default, and its docstring as the description. Nested dataclasses go to `$defs`. extra: more
    top-level keys, each a dataclass section; drop: fields of `cls` that are not keys of the data."""
    defs: dict[str, Any] = {}
    root = _object_schema(cls, defs)
    for name in drop:
        del root["properties"][name]
    for name, section in (extra or {}).items():
        root["properties"][name] = _type_schema(section, defs) | {"default": to_dict(section())}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **root, "$defs": dict(sorted(defs.items()))}


def _plain_default(value: Any) -> Any:
    """A field's default as params.yaml would hold it (dataclasses, also inside lists, as mappings)."""
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, list):
        return [_plain_default(v) for v in value]
    return value


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        prop = _type_schema(hints[f.name], defs)
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is not dataclasses.MISSING:
            prop["default"] = _plain_default(default)
        if f.name in docs:
            prop["description"] = docs[f.name]
        properties[f.name] = prop
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # not the dataclass' generated one
        schema["description"] = inspect.cleandoc(cls.__doc__)
    return schema


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # a placeholder first: a recursive type refers to itself
            defs[tp.__name__] = _object_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin in (Union, types.UnionType):
        return {"anyOf": [_type_schema(option, defs) for option in typing.get_args(tp)]}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list:
        return {"type": "array", "items": _type_schema(typing.get_args(tp)[0], defs)}
    simple = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    if origin is dict or tp is dict:
        return {"type": "object"}
    raise TypeError(f"json_schema: unsupported annotation {tp!r}")  # a schema bug, not user input


def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring}: the string literal right under a field's annotation in the class body."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError):
        return {}
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs

