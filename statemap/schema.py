"""A JSON Schema (draft 2020-12) for spec files, generated from the op registry.

Editors that speak JSON Schema (VS Code with the YAML extension, PyCharm, ...) use it for
completion, hover text and squiggles. It is *generated* from :data:`statemap.ops.REGISTRY` (each op
gives its own fragments, each field kind its own schema: :mod:`statemap.ops.fields`),
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

from .ops import COMMON, REGISTRY
from .spec import _HEADER_FIELDS, SPEC_VERSION

DRAFT = "https://json-schema.org/draft/2020-12/schema"


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
    for op in REGISTRY.values():
        defs.update(op.schema())
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
