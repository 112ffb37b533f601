"""A JSON Schema (draft 2020-12) for spec files, generated from the op registry.

Editors that speak JSON Schema (VS Code with the YAML extension, PyCharm, ...) use it for
completion, hover text and squiggles. It is *generated* from :data:`statemap.ops.REGISTRY`,
:data:`statemap.ops.COMMON` and the header fields of :mod:`statemap.spec`, so it cannot drift
from the parser: ``tests/test_schema.py`` checks the committed ``statemap/spec.schema.json``
against :func:`build_schema`. Regenerate it with::

    python -m statemap.schema > statemap/spec.schema.json

The schema accepts what the parser accepts, with two deliberate differences: it cannot
check template captures and arithmetic (``load_spec`` / ``statemap check`` do), and it lists
dtype spellings exactly (the parser also accepts aliases in any letter case, ``FP16``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

from . import dtypes
from .errors import SpecError
from .ops import COMMON, REGISTRY, Field, Op
from .spec import _HEADER_FIELDS, SPEC_VERSION

DRAFT = "https://json-schema.org/draft/2020-12/schema"

# How each Field.kind is written in YAML. A new kind in ops.py without an entry here fails
# build_schema (and so the tests): the schema cannot silently fall behind the parser.
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
_TEMPLATES_DOC = "target template(s): text with {capture}, {var} or {i+1} fields"


def _kind_schema(f: Field) -> dict[str, Any]:
    k = f.kind
    if k == "pattern":
        return {
            "type": "string",
            "description": "source pattern: {x} one segment, {x:int} digits, {x:path} several segments, re:REGEX",
        }
    if k == "patterns":
        return {
            "description": "one or more source patterns",
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
        }
    if k == "sources":
        return {
            "description": "source keys: the first is a pattern (it binds the captures), the others are templates filled from them",
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
        }
    if k == "template":
        return {"type": "string", "description": "target template: text with {capture}, {var} or {i+1} fields"}
    if k == "templates":
        return {
            "description": _TEMPLATES_DOC,
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
        }
    if k == "expr":
        return json.loads(json.dumps(_INT))
    if k == "exprs":
        return {
            "type": "array",
            "items": json.loads(json.dumps(_INT)),
            "minItems": 1,
            "description": "a list of integers or expressions",
        }
    if k == "name":
        return {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "description": "a capture name"}
    if k == "axes_pattern":
        return {
            "type": "string",
            "pattern": "->",
            "description": "einops notation: LEFT -> RIGHT, e.g. (h d two) c -> (h two d) c",
        }
    if k == "axis_sizes":
        return {
            "type": "object",
            "description": "axis name: length",
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
            "additionalProperties": json.loads(json.dumps(_INT)),
        }
    if k == "shape":
        return {
            "type": "array",
            "description": "a shape: each dim an integer, an expression over vars, or {dim: N, of: KEY}",
            "items": {
                "anyOf": [
                    dict(_EXPR),
                    json.loads(json.dumps(_DIM_OF)),
                ]
            },
        }
    if k == "axis":
        return {
            "description": "a dim (negative counts from the end): an integer, an expression over vars, or {dim: N, of: KEY}",
            "anyOf": [{"type": ["integer", "string"]}, json.loads(json.dumps(_DIM_OF))],
        }
    if k == "axes":
        return {"type": "array", "items": {"type": "integer"}, "description": "a list of dims such as [1, 0]"}
    if k == "dtype":
        return {
            "type": "string",
            "enum": _dtype_spellings(),
            "description": "an element type, as torch names it (float32, bfloat16, ...)",
        }
    if k == "number":
        return {
            "description": "a number (inf, -inf and nan are accepted)",
            "anyOf": [{"type": "number"}, {"type": "string", "pattern": "^(-?[Ii][Nn][Ff]|[Nn][Aa][Nn])$"}],
        }
    if k == "choice":
        return {"enum": list(f.choices)}
    if k == "bool":
        return {"type": "boolean"}
    if k == "text":
        return {"type": "string"}
    if k == "rule":
        return {"anyOf": [{"$ref": "#/$defs/rule"}, {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/rule"}}]}
    if k == "when":
        key = {"type": "string", "minLength": 1}
        dt = {"type": "string", "enum": _dtype_spellings()}
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
    if k == "assume":
        return {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {"equal": {"type": "string", "minLength": 1}, "value": {"type": "number"}},
        }
    raise ValueError(f"statemap.schema: no JSON Schema for field kind {k!r}; add it to _kind_schema")


def _dtype_spellings() -> list[str]:
    """Every spelling dtypes.dtype() accepts, except letter-case variants of the aliases."""
    names = list(dtypes.NAMES)
    out = names + [f"torch.{n}" for n in names] + list(dtypes._BY_ST) + list(dtypes._ALIASES)
    return list(dict.fromkeys(out))


def _field_schema(name: str, f: Field, alias_of: str | None = None) -> dict[str, Any]:
    s = _kind_schema(f)
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


# -- ops -----------------------------------------------------------------------------------


def _accepts(op: Op, value: Any) -> list[dict[str, Any]] | None:
    try:
        return op.expand(value, "")
    except SpecError:
        return None


def _complete(op: Op, raw: list[dict[str, Any]] | None) -> bool:
    """True when ``raw`` (an expansion) gives every required field of ``op``."""
    if raw is None or len(raw) != 1:
        return False
    keys = {op.aliases.get(k, k) for k in raw[0]}
    return all(k in keys for k, f in op.fields.items() if f.required)


def _string_form(op: Op) -> dict[str, Any] | None:
    """The string shorthand of an op, found by asking its ``expand`` (so it cannot drift)."""
    if _complete(op, _accepts(op, "a")):
        return {"type": "string", "description": f"shorthand for {{from: PATTERN}}: {op.summary}"}
    if _complete(op, _accepts(op, "a -> b")):
        return {"type": "string", "pattern": "->", "description": f"shorthand 'SOURCE -> TARGET': {op.summary}"}
    return None


def _mapping_form(op: Op) -> dict[str, Any]:
    props: dict[str, Any] = {name: _field_schema(name, f) for name, f in op.fields.items()}
    for alias, target in op.aliases.items():
        if target in op.fields and alias not in op.fields:
            props[alias] = _field_schema(alias, op.fields[target], alias_of=target)
    for name, f in COMMON.items():
        props[name] = _field_schema(name, f)
    s: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    required: list[str] = []
    groups: list[list[dict[str, Any]]] = []
    exclusive: dict[str, Any] = {}
    for name, f in op.fields.items():
        aliases = sorted(a for a, t in op.aliases.items() if t == name and a not in op.fields)
        if f.required and not aliases:
            required.append(name)
        elif f.required:  # one of the spellings must be there
            groups.append([{"required": [n]} for n in (name, *aliases)])
        for a in aliases:  # ...and not two of them ("field given twice")
            exclusive[a] = {"not": {"required": [name]}}
    if required:
        s["required"] = required
    if len(groups) == 1:
        s["anyOf"] = groups[0]
    elif groups:
        s["allOf"] = [{"anyOf": g} for g in groups]
    if exclusive:
        s["dependentSchemas"] = exclusive
    return s


def _op_value(op: Op) -> dict[str, Any]:
    """What may follow ``OP:`` in a rule: the mapping, and the shorthands its ``expand`` takes."""
    forms: list[dict[str, Any]] = [{"$ref": f"#/$defs/op_{op.name}"}]
    string = _string_form(op)
    if string:
        forms.append(string)
    two = _accepts(op, [{"from": "a"}, {"from": "b"}])
    if two == [{"from": "a"}, {"from": "b"}]:  # a list is a list of rules
        items: dict[str, Any] = {"$ref": f"#/$defs/op_{op.name}"}
        if string and (_accepts(op, ["a"]) or _accepts(op, ["a -> b"])):
            items = {"anyOf": [items, string]}
        forms.append({"type": "array", "description": f"a list of '{op.name}' rules", "items": items})
    value: dict[str, Any] = {"description": f"{op.summary}\n\nExample: {op.example}"}
    example = yaml.safe_load(op.example)
    if isinstance(example, dict) and op.name in example:
        value["examples"] = [example[op.name]]
    if len(forms) == 1:
        value.update(forms[0])
    else:
        value["anyOf"] = forms
    return value


def _rule_branch(op: Op) -> dict[str, Any]:
    props: dict[str, Any] = {op.name: {"$ref": f"#/$defs/{op.name}"}}
    for name, f in COMMON.items():
        props[name] = _field_schema(name, f)
    return {
        "title": op.name,
        "description": op.summary,
        "type": "object",
        "properties": props,
        "required": [op.name],
        "additionalProperties": False,
    }


# -- header --------------------------------------------------------------------------------

_STR_OR_LIST = [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]

_HEADER: dict[str, dict[str, Any]] = {
    "name": {"type": "string", "minLength": 1, "description": "spec name (catalog specs: the file name)"},
    "version": {"const": SPEC_VERSION, "description": f"spec format version; this statemap reads {SPEC_VERSION}"},
    "description": {"type": "string", "description": "free text, shown by `statemap list`"},
    "source": {"type": "string", "description": "the source layout, free text shown by `statemap list`"},
    "target": {"type": "string", "description": "the target layout, free text shown by `statemap list`"},
    "verified": {"type": "string", "description": "how this mapping was proven, shown by `statemap list`"},
    "vars": {
        "type": ["object", "null"],
        "description": "name: default pairs usable in templates, shapes and sizes (--set name=value overrides); "
        "a string naming other vars is an integer expression over them (dim // n_heads); "
        "{config: KEY, default: ...} reads the var from the config",
        "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "additionalProperties": {
            "anyOf": [
                {"type": ["number", "string"]},
                {
                    "type": "object",
                    "properties": {
                        "config": {"type": "string", "minLength": 1, "description": "dotted key into the config (model.dim)"},
                        "default": {"type": ["number", "string"], "description": "used when the config lacks the key"},
                    },
                    "additionalProperties": False,
                    "minProperties": 1,
                },
            ]
        },
    },
    "inputs": {
        "description": "several input files, named by a pattern relative to the input folder "
        "(consolidated.{rank:int}.pth); keys are addressed as '{rank}/' + the key, or as 'key' says",
        "anyOf": [
            {"type": "null"},
            {"type": "string", "minLength": 1},
            {
                "type": "object",
                "properties": {
                    "files": {"type": "string", "minLength": 1, "description": "the file pattern"},
                    "key": {"type": "string", "minLength": 1, "description": "key template over the captures and {key}"},
                },
                "required": ["files"],
                "additionalProperties": False,
            },
        ],
    },
    "config": {
        "description": "where {config: KEY} vars are read: a JSON/YAML file in the input's folder (params.json), "
        "or {checkpoint: KEY} for a dict stored in the checkpoint (args, cfg.model)",
        "anyOf": [
            {"type": "null"},
            {"type": "string", "minLength": 1},
            {
                "type": "object",
                "properties": {"checkpoint": {"type": "string", "minLength": 1}},
                "required": ["checkpoint"],
                "additionalProperties": False,
            },
        ],
    },
    "unwrap": {
        "description": "key path to the state dict inside the file (model, state_dict/model, or a list); "
        "auto (default) looks at common containers; none uses the top level",
        "default": "auto",
        "anyOf": [{"type": "null"}, {"const": False}, *_STR_OR_LIST],
    },
    "strip_prefix": {
        "description": "prefixes removed from every key that has them; auto (default) strips module. / _orig_mod. "
        "when every key has them; none keeps keys as stored",
        "default": "auto",
        "anyOf": [{"type": "null"}, {"const": False}, *_STR_OR_LIST],
    },
    "strict": {
        "type": "boolean",
        "default": False,
        "description": "true: a source key that no rule touched is an error (list it under keep: or drop:)",
    },
    "tied": {
        "enum": ["clone", "dedupe"],
        "default": "clone",
        "description": "how tie targets are written to safetensors: clone writes each, dedupe writes the first",
    },
    "expect": {
        "description": "a reference checkpoint or key listing (path, relative to the spec), or an inline mapping {key: [shape]}",
        "anyOf": [
            {"type": "null"},
            {"type": "string"},
            {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}},
        ],
    },
    "rules": {"type": "array", "items": {"$ref": "#/$defs/rule"}, "description": "the rules, applied in order"},
}


def build_schema() -> dict[str, Any]:
    """The JSON Schema of a spec file, from the op registry and the header fields."""
    if set(_HEADER) != set(_HEADER_FIELDS):
        raise ValueError(
            f"statemap.schema: header fields differ from spec._HEADER_FIELDS: {sorted(set(_HEADER) ^ set(_HEADER_FIELDS))}"
        )
    defs: dict[str, Any] = {
        "rule": {
            "description": "one rule: exactly one op key, plus optional " + ", ".join(COMMON),
            "oneOf": [{"$ref": f"#/$defs/rule_{name}"} for name in REGISTRY],
        }
    }
    defs["rule"]["oneOf"].append({"$ref": "#/$defs/include"})
    defs["include"] = {
        "description": "the rules (and var defaults) of another spec file, relative to this one, or a catalog spec",
        "type": "object",
        "properties": {"include": {"type": "string", "minLength": 1}},
        "required": ["include"],
        "additionalProperties": False,
    }
    for name, op in REGISTRY.items():
        defs[f"rule_{name}"] = _rule_branch(op)
        defs[name] = _op_value(op)
        defs[f"op_{name}"] = _mapping_form(op)
    return {
        "$schema": DRAFT,
        "title": f"statemap spec (version {SPEC_VERSION})",
        "description": "A statemap mapping spec: how to turn one state-dict layout into another. See docs/spec.md.",
        "type": "object",
        "properties": {name: _HEADER[name] for name in _HEADER},
        "required": ["name", "version", "rules"],
        "additionalProperties": False,
        "$defs": defs,
    }


def render() -> str:
    """The schema as committed in ``statemap/spec.schema.json``."""
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
