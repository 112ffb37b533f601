"""The JSON Schema for specs (statemap/spec.schema.json) is generated, committed, and agrees with the parser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from statemap.errors import SpecError
from statemap.ops import REGISTRY
from statemap.schema import build_schema
from statemap.spec import load_spec

SCHEMA_LINE = re.compile(r"^#\s*yaml-language-server:\s*\$schema=(\S+)\s*$", re.M)


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = build_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, data) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


def _spec(rules, **header) -> dict:
    return {"name": "t", "version": 1, **header, "rules": rules}


def test_committed_schema_is_generated(root):
    committed = json.loads((root / "statemap" / "spec.schema.json").read_text())
    assert committed == build_schema(), (
        "statemap/spec.schema.json is stale: python -m statemap.schema > statemap/spec.schema.json"
    )


def test_every_op_has_a_rule_branch():
    schema = build_schema()
    assert [b["$ref"] for b in schema["$defs"]["rule"]["oneOf"]] == [f"#/$defs/rule_{n}" for n in REGISTRY] + ["#/$defs/include"]


def _catalog(root: Path) -> list[Path]:
    specs = sorted((root / "mappings").glob("*.yaml"))
    assert specs, "no catalog specs found"
    return specs


def test_every_catalog_spec_validates(root, validator):
    bad = {p.name: errs for p in _catalog(root) if (errs := _errors(validator, yaml.safe_load(p.read_text())))}
    assert not bad, json.dumps(bad, indent=1)


def test_docs_and_op_examples_validate(root, validator):
    text = (root / "docs" / "spec.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        data = yaml.safe_load(block)
        if not isinstance(data, dict):
            data = _spec(data, vars={"vocab": 1, "d": 1, "heads": 1})
        assert not _errors(validator, data), (block, _errors(validator, data))
    for op in REGISTRY.values():
        data = _spec([yaml.safe_load(op.example)])
        assert not _errors(validator, data), (op.example, _errors(validator, data))


GOOD = [
    _spec([]),
    _spec([{"rename": "a -> b"}, {"rename": ["a.{i} -> b.{i}", {"key": "c", "to": "d"}]}]),
    _spec([{"drop": "a"}, {"drop": ["a", {"from": "b", "optional": True}]}, {"keep": ["{x:path}"]}]),
    _spec([{"transpose": "w"}, {"transpose": ["w", {"from": "v", "dims": [0, 2]}]}, {"cast": {"from": "w", "dtype": "bf16"}}]),
    _spec([{"inject": {"key": "b", "shape": [1, "vocab", {"dim": 0, "of": "w"}], "value": "-inf", "dtype": "int64"}}]),
    _spec([{"merge": {"from": ["q.{i}", "k.{i}"], "to": "qkv.{i}", "mode": "stack"}, "note": "n"}]),
    _spec([{"slice": {"from": "w", "stop": "vocab"}, "inverse": {"pad": {"from": "w", "size": 10}}}]),
    _spec([], unwrap="model/state_dict", strip_prefix=["module."], strict=True, tied="dedupe", expect={"a": [1, 2]}),
    _spec([], unwrap="none", strip_prefix=None, vars={"vocab": 3, "name": "x"}, expect="ref.safetensors"),
    _spec([], inputs="consolidated.{rank:int}.pth", config="params.json"),
    _spec([], inputs={"files": "mp_rank_{tp:int}/model_optim_rng.pt", "key": "{tp}/{key}"}, config={"checkpoint": "cfg.model"}),
    _spec([], vars={"d": {"config": "dim"}, "h": {"config": "n_heads", "default": 2}, "hd": "d // h", "k": {"default": "h"}}),
]


@pytest.mark.parametrize("data", GOOD)
def test_good_specs_pass_schema_and_parser(validator, data):
    assert not _errors(validator, data)
    load_spec(data)


BAD = [
    ("no name", {"version": 1, "rules": []}),
    ("no rules", {"name": "t", "version": 1}),
    ("version 2", {"name": "t", "version": 2, "rules": []}),
    ("empty name", {"name": "", "version": 1, "rules": []}),
    ("unknown header field", _spec([], strictt=True)),
    ("strict is not a bool", _spec([], strict="yes")),
    ("tied enum", _spec([], tied="share")),
    ("var name", _spec([], vars={"not-an-id": 1})),
    ("var value bool", _spec([], vars={"x": True})),
    ("expect shape", _spec([], expect={"a": ["x"]})),
    ("rules not a list", _spec({"rename": "a -> b"})),
    ("rule not a mapping", _spec(["rename: a -> b"])),
    ("no op", _spec([{"optional": True}])),
    ("unknown op", _spec([{"renam": "a -> b"}])),
    ("two ops", _spec([{"rename": "a -> b", "drop": "c"}])),
    ("rename without arrow", _spec([{"rename": "a"}])),
    ("rename list item without arrow", _spec([{"rename": ["a -> b", "c"]}])),
    ("missing required to", _spec([{"rename": {"from": "a"}}])),
    ("from and key", _spec([{"rename": {"from": "a", "key": "a", "to": "b"}}])),
    ("unknown op field", _spec([{"drop": {"from": "a", "to": "b"}}])),
    ("permute string needs dims", _spec([{"permute": "w"}])),
    ("copy string needs to", _spec([{"copy": "w"}])),
    ("inject string", _spec([{"inject": "w"}])),
    ("inject key and to", _spec([{"inject": {"key": "a", "to": "a", "shape": [1]}}])),
    ("split list", _spec([{"split": [{"from": "w", "to": ["a", "b"]}]}])),
    ("dims not ints", _spec([{"permute": {"from": "w", "dims": ["a", 1]}}])),
    ("dim is bool", _spec([{"split": {"from": "w", "to": ["a", "b"], "dim": True}}])),
    ("unknown dtype", _spec([{"cast": {"from": "w", "dtype": "float13"}}])),
    ("merge mode", _spec([{"merge": {"from": ["a", "b"], "to": "c", "mode": "add"}}])),
    ("value not a number", _spec([{"pad": {"from": "w", "size": 3, "value": "zero"}}])),
    ("optional not a bool", _spec([{"drop": "a", "optional": "yes"}])),
    ("inverse not a rule", _spec([{"slice": {"from": "w", "stop": 1}, "inverse": "pad w"}])),
    ("shape entry dict", _spec([{"inject": {"to": "a", "shape": [{"dim": 0}]}}])),
    ("inputs long form without files", _spec([], inputs={"key": "{key}"})),
    ("config checkpoint plus a field", _spec([], config={"checkpoint": "args", "file": "x"})),
    ("var config object with a typo", _spec([], vars={"d": {"config": "dim", "defualt": 1}})),
    ("include with another field", _spec([{"include": "x.yaml", "optional": True}])),
]


@pytest.mark.parametrize("data", [d for _, d in BAD], ids=[i for i, _ in BAD])
def test_bad_specs_fail_schema_and_parser(validator, data):
    assert _errors(validator, data), "the schema accepts it"
    with pytest.raises(SpecError):
        load_spec(data)


def _spec_files(root: Path) -> list[Path]:
    return sorted(p for d in ("mappings", "docs", "examples", "tests") for p in (root / d).rglob("*.y*ml"))


def test_schema_header_lines_point_at_the_schema(root):
    """`# yaml-language-server: $schema=...` lines, where present, resolve to statemap/spec.schema.json."""
    target = (root / "statemap" / "spec.schema.json").resolve()
    wrong = {}
    for p in _spec_files(root):
        for ref in SCHEMA_LINE.findall(p.read_text()):
            if ref.startswith(("http://", "https://")) or (p.parent / ref).resolve() != target:
                wrong[str(p.relative_to(root))] = ref
    assert not wrong, f"expected $schema={{relative path to statemap/spec.schema.json}}: {wrong}"
