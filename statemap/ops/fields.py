"""Field kinds: how each kind of op field is checked at spec-load time, and written in JSON Schema.

One table, :data:`KINDS`, holds both sides of every kind, so the parser and the generated
schema (:mod:`statemap.schema`) cannot drift: a new kind is one :class:`Kind` entry.

Integer fields (``dim``, ``sizes``, ``start``, ``count``, ...) take an integer, an expression
over vars and captures, or ``{dim: D, of: KEY}`` (:func:`int_value`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from .. import dtypes
from ..axes import parse_axes
from ..dtypes import NAMES as DTYPE_NAMES
from ..dtypes import dtype as lookup_dtype
from ..errors import SpecError
from ..guards import parse_assume, parse_when
from ..template import Expr, Template, expr_names, expr_str, parse_expr, parse_pattern, parse_shape_entry, parse_template


@dataclass(frozen=True)
class Field:
    """One field of an op: its kind (a key of :data:`KINDS`), whether it is required, its default."""

    kind: str
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    doc: str = ""

    def check(self, name: str, value: Any, where: str) -> Any:
        """The checked, parsed value; raises SpecError naming the field."""
        kind = KINDS[self.kind]
        return kind.check(self, value, where if kind.names_itself else f"{where}field {name!r}: ")

    def schema(self) -> dict[str, Any]:
        """The field's JSON Schema, without its doc line."""
        return KINDS[self.kind].schema(self)


# -- integer values --------------------------------------------------------------------------


@dataclass(frozen=True)
class DimOf:
    """``{dim: D, of: KEY}``: the length of dim ``D`` of the tensor named ``KEY`` at that point of the rules."""

    dim: Expr
    of: Template


IntValue = Union[Expr, DimOf]  # noqa: UP007 - an integer, an expression over vars and captures, or DimOf


def int_value(v: Any, where: str = "") -> IntValue:
    """An integer field as written in YAML -> its parsed form: ``3``, ``"n_heads * head_dim"`` or
    ``{dim: 0, of: "lm_head.weight"}`` (``dim`` itself may be an expression).

    Example::

        >>> int_value("n_heads * 2")
        ('*', 'n_heads', 2)
    """
    if isinstance(v, bool):
        raise SpecError(f"{where}expected an integer, an expression or {{dim: D, of: KEY}}, got {v!r}")
    if isinstance(v, int):
        return v
    try:
        if isinstance(v, str):
            return parse_expr(v)
        if isinstance(v, dict) and set(v) == {"dim", "of"} and isinstance(v["of"], str):
            d = int_value(v["dim"])
            if isinstance(d, DimOf):
                raise SpecError("'dim' of {dim, of} is an integer or an expression")
            return DimOf(d, parse_template(v["of"]))
    except SpecError as e:
        raise SpecError(f"{where}{e}") from None
    raise SpecError(f"{where}expected an integer, an expression such as 'n_heads * head_dim', or {{dim: 0, of: KEY}}, got {v!r}")


def int_names(v: IntValue) -> set[str]:
    """The vars and captures an integer field refers to."""
    if isinstance(v, DimOf):
        return expr_names(v.dim) | v.of.names
    return expr_names(v)


def int_yaml(v: IntValue) -> Any:
    """The YAML form of a parsed integer field (for derived specs): parses back to the same value."""
    if isinstance(v, DimOf):
        return {"dim": int_yaml(v.dim), "of": v.of.text}
    if isinstance(v, tuple):
        return expr_str(v)
    return v


# -- kinds -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    check: Callable[[Field, Any, str], Any]  # (field, YAML value, message prefix) -> parsed value
    schema: Callable[[Field], dict[str, Any]]
    names_itself: bool = False  # its messages name the field already (when:, assume:)


def as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, list) else [v]


def plain(v: Any) -> Any:
    """YAML values with line info -> plain dicts and lists (for storing in frozen rules)."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def _wrap(parse: Callable[[Any], Any]) -> Callable[[Field, Any, str], Any]:
    def check(f: Field, v: Any, w: str) -> Any:
        try:
            return parse(v)
        except SpecError as e:
            raise SpecError(f"{w}{e}") from None

    return check


def _sources(v: Any) -> tuple[Any, ...]:
    items = as_list(v)
    if not items:
        raise SpecError("expected a list of sources")
    return (parse_pattern(items[0]), *(parse_template(x) for x in items[1:]))


def _exprs(f: Field, v: Any, w: str) -> tuple[IntValue, ...]:
    if not isinstance(v, list) or not v:
        raise SpecError(f"{w}expected a list of integers or expressions, got {v!r}")
    return tuple(int_value(x, w) for x in v)


def _sizes_or_equal(f: Field, v: Any, w: str) -> tuple[IntValue, ...] | str:
    if v == "equal":
        return "equal"
    if not isinstance(v, list) or not v:
        raise SpecError(f"{w}expected 'equal' or a list of integers or expressions, got {v!r}")
    return _exprs(f, v, w)


def _shape(f: Field, v: Any, w: str) -> tuple[tuple[Any, ...], ...]:
    if not isinstance(v, list):
        raise SpecError(f"{w}expected a list such as [1, vocab], got {v!r}")
    return tuple(parse_shape_entry(x, w) for x in v)


def _axes(f: Field, v: Any, w: str) -> tuple[int, ...]:
    if not (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise SpecError(f"{w}expected a list of integers such as [1, 0], got {v!r}")
    return tuple(v)


def _dtype(f: Field, v: Any, w: str) -> str:
    try:
        return lookup_dtype(v).name
    except Exception:
        raise SpecError(f"{w}unknown dtype {v!r}; valid: {', '.join(DTYPE_NAMES)}") from None


def _number(f: Field, v: Any, w: str) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, str) and v.lower() in ("inf", "-inf", "nan"):
            return float(v)
        raise SpecError(f"{w}expected a number, got {v!r}")
    return v


def _choice(f: Field, v: Any, w: str) -> Any:
    if v not in f.choices:
        raise SpecError(f"{w}{v!r} is not one of {', '.join(f.choices)}")
    return v


def _bool(f: Field, v: Any, w: str) -> bool:
    if not isinstance(v, bool):
        raise SpecError(f"{w}expected true or false, got {v!r}")
    return v


def _rule(f: Field, v: Any, w: str) -> Any:
    items = v if isinstance(v, list) else [v]
    if not items or not all(isinstance(x, dict) and x for x in items):
        raise SpecError(f"{w}expected a rule mapping such as {{pad: {{from: K, size: N}}}} or a list of them, got {v!r}")
    return plain(v)


def _name(f: Field, v: Any, w: str) -> str:
    if not (isinstance(v, str) and v.isidentifier()):
        raise SpecError(f"{w}expected a capture name such as e, got {v!r}")
    return v


def _axis_sizes(f: Field, v: Any, w: str) -> tuple[tuple[str, IntValue], ...]:
    if not isinstance(v, dict):
        raise SpecError(f"{w}expected a mapping of axis: size such as {{h: n_heads, two: 2}}, got {v!r}")
    return tuple((str(k), int_value(x, f"{w}axis {k!r}: ")) for k, x in v.items())


# -- schema fragments ------------------------------------------------------------------------

_STRINGS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
_EXPR = {"type": ["integer", "string"], "description": "an integer or an expression over vars, e.g. vocab or 2*d"}
_DIM_OF = {
    "type": "object",
    "description": "dim N of another tensor, as named at this point in the rules",
    "properties": {"dim": {"type": ["integer", "string"]}, "of": {"type": "string"}},
    "required": ["dim", "of"],
    "additionalProperties": False,
}
_INT = {
    "description": "an integer, an expression over vars and captures (n_heads * head_dim), or {dim: N, of: KEY}",
    "anyOf": [{"type": ["integer", "string"]}, _DIM_OF],
}
_NAME = "^[A-Za-z_][A-Za-z0-9_]*$"


def _s(fragment: dict[str, Any]) -> Callable[[Field], dict[str, Any]]:
    return lambda f: copy.deepcopy(fragment)


def dtype_spellings() -> list[str]:
    """Every spelling dtypes.dtype() accepts, except letter-case variants of the aliases."""
    names = list(dtypes.NAMES)
    out = names + [f"torch.{n}" for n in names] + list(dtypes._BY_ST) + list(dtypes._ALIASES)
    return list(dict.fromkeys(out))


def _when_schema(f: Field) -> dict[str, Any]:
    key = {"type": "string", "minLength": 1}
    dt = {"type": "string", "enum": dtype_spellings()}
    return {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {
            "present": key,
            "absent": key,
            "tied_to": key,
            "not_tied_to": key,
            "dtype": {"anyOf": [dt, {"type": "array", "items": dt, "minItems": 1}]},
            "if": {"type": ["string", "integer", "boolean"]},
        },
    }


KINDS: dict[str, Kind] = {
    "pattern": Kind(
        _wrap(parse_pattern),
        _s(
            {
                "type": "string",
                "description": "source pattern: {x} one segment, {x:int} digits, {x:path} several segments, re:REGEX",
            }
        ),
    ),
    "patterns": Kind(
        _wrap(lambda v: tuple(parse_pattern(x) for x in as_list(v))),
        _s({"description": "one or more source patterns", **_STRINGS}),
    ),
    "sources": Kind(  # merge: the first is a pattern (binds captures), the rest are templates
        _wrap(_sources),
        _s(
            {
                "description": "source keys: the first is a pattern (it binds the captures), the others are templates filled from them",
                **_STRINGS,
            }
        ),
    ),
    "template": Kind(
        _wrap(parse_template),
        _s({"type": "string", "description": "target template: text with {capture}, {var} or {i+1} fields"}),
    ),
    "templates": Kind(
        _wrap(lambda v: tuple(parse_template(x) for x in as_list(v))),
        _s({"description": "target template(s): text with {capture}, {var} or {i+1} fields", **_STRINGS}),
    ),
    "expr": Kind(lambda f, v, w: int_value(v, w), _s(_INT)),
    "axis": Kind(
        lambda f, v, w: int_value(v, w),
        _s(
            {
                "description": "a dim (negative counts from the end): an integer, an expression over vars, or {dim: N, of: KEY}",
                "anyOf": [{"type": ["integer", "string"]}, _DIM_OF],
            }
        ),
    ),
    "exprs": Kind(
        _exprs, _s({"type": "array", "items": _INT, "minItems": 1, "description": "a list of integers or expressions"})
    ),
    "sizes_or_equal": Kind(
        _sizes_or_equal,
        _s(
            {
                "anyOf": [
                    {"const": "equal", "description": "every part has the same length along dim (checked)"},
                    {"type": "array", "items": _INT, "minItems": 1, "description": "one length per part (checked)"},
                ]
            }
        ),
    ),
    "shape": Kind(
        _shape,
        _s(
            {
                "type": "array",
                "description": "a shape: each dim an integer, an expression over vars, or {dim: N, of: KEY}",
                "items": {"anyOf": [_EXPR, _DIM_OF]},
            }
        ),
    ),
    "axes": Kind(_axes, _s({"type": "array", "items": {"type": "integer"}, "description": "a list of dims such as [1, 0]"})),
    "dtype": Kind(
        _dtype,
        lambda f: {
            "type": "string",
            "enum": dtype_spellings(),
            "description": "an element type, as torch names it (float32, bfloat16, ...)",
        },
    ),
    "number": Kind(
        _number,
        _s(
            {
                "description": "a number (inf, -inf and nan are accepted)",
                "anyOf": [{"type": "number"}, {"type": "string", "pattern": "^(-?[Ii][Nn][Ff]|[Nn][Aa][Nn])$"}],
            }
        ),
    ),
    "choice": Kind(_choice, lambda f: {"enum": list(f.choices)}),
    "bool": Kind(_bool, _s({"type": "boolean"})),
    "text": Kind(lambda f, v, w: str(v), _s({"type": "string"})),
    "name": Kind(_name, _s({"type": "string", "pattern": _NAME, "description": "a capture name"})),
    "axes_pattern": Kind(
        _wrap(parse_axes),
        _s({"type": "string", "pattern": "->", "description": "einops notation: LEFT -> RIGHT, e.g. (h d two) c -> (h two d) c"}),
    ),
    "axis_sizes": Kind(
        _axis_sizes,
        _s(
            {
                "type": "object",
                "description": "axis name: length",
                "propertyNames": {"pattern": _NAME},
                "additionalProperties": _INT,
            }
        ),
    ),
    "rule": Kind(
        _rule,
        _s({"anyOf": [{"$ref": "#/$defs/rule"}, {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/rule"}}]}),
    ),
    "when": Kind(lambda f, v, w: parse_when(v, w), _when_schema, names_itself=True),
    "assume": Kind(
        lambda f, v, w: parse_assume(v, w),
        _s(
            {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "equal": {"type": "string", "minLength": 1},
                    "value": {"type": "number"},
                    "shape": {
                        "type": "array",
                        "minItems": 1,
                        "description": "the matched tensor's shape: each dim as in shape fields, or null for any length",
                        "items": {"anyOf": [_EXPR, _DIM_OF, {"type": "null"}]},
                    },
                },
            }
        ),
        names_itself=True,
    ),
}


def field_schema(name: str, f: Field, alias_of: str | None = None) -> dict[str, Any]:
    """A field's JSON Schema with its description line (doc, kind, required / default)."""
    s = f.schema()
    if alias_of:
        s["description"] = f"alias of '{alias_of}' (give one of them)"
        return s
    parts = [f.doc, s.get("description", "")]
    if f.required:
        parts.append("required")
    elif f.default is not None:
        parts.append(f"default: {json.dumps(f.default)}")
        s["default"] = f.default
    s["description"] = "; ".join(p for p in parts if p)
    return s


__all__ = ["DimOf", "Field", "IntValue", "KINDS", "int_names", "int_value", "int_yaml"]
