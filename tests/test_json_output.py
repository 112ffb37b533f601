"""Every CLI command's --json output, validated against a schema of its shape; no colour codes
when stdout is not a terminal or NO_COLOR is set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pytest

from statemap.cli import build_parser, main

TENSOR = {
    "type": "object",
    "required": ["name", "shape", "dtype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "dtype": {"type": "string"},
    },
}
MISMATCH = {"type": "object", "required": ["name", "expected", "got"]}
STRS = {"type": "array", "items": {"type": "string"}}
KINDS = ("same", "renamed", "tied", "swapped", "cast", "reshaped", "transposed", "split", "merged", "permuted", "gathered")
KINDS += ("differs", "constant", "unmatched")

SCHEMAS = {
    "apply": {
        "type": "object",
        "required": [
            "spec",
            "source",
            "output",
            "dry_run",
            "produced",
            "passthrough",
            "dropped",
            "unmatched_rules",
            "tied",
            "source_ties",
            "missing",
            "unexpected",
            "shape_mismatch",
            "dtype_mismatch",
            "files",
            "n_bytes",
            "ok",
            "n_tensors",
            "not_restored",
        ],
        "properties": {
            "produced": {"type": "array", "items": TENSOR},
            "missing": {"type": "array", "items": TENSOR},
            "shape_mismatch": {"type": "array", "items": MISMATCH},
            "passthrough": STRS,
            "dropped": STRS,
            "ok": {"type": "boolean"},
            "n_tensors": {"type": "integer"},
            "files": STRS,
        },
    },
    "diff": {
        "type": "object",
        "required": ["a", "b", "same", "n_common", "only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch", "values"],
        "properties": {
            "same": {"type": "boolean"},
            "only_in_a": {"type": "array", "items": TENSOR},
            "only_in_b": {"type": "array", "items": TENSOR},
            "values": {"type": ["array", "null"], "items": {"type": "object", "required": ["name", "max_abs", "allclose"]}},
            "explain": {
                "type": ["object", "null"],
                "required": ["b", "a_left", "counts"],
                "properties": {
                    "b": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "b",
                                "kind",
                                "a",
                                "detail",
                                "pieces",
                                "cast",
                                "max_abs",
                                "max_rel",
                                "rows_differ",
                                "rule",
                            ],
                            "properties": {
                                "kind": {"enum": [*KINDS]},
                                "a": STRS,
                                "pieces": {
                                    "type": "array",
                                    "items": {"type": "object", "required": ["b", "b_axis", "a", "a_range", "a_axis"]},
                                },
                            },
                        },
                    },
                    "a_left": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["a", "kind", "of", "rule"],
                            "properties": {"kind": {"enum": ["dropped", "duplicate"]}},
                        },
                    },
                    "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                },
            },
        },
    },
    "inspect": {
        "type": "object",
        "required": ["path", "format", "container", "n_tensors", "n_params", "modules", "tensors", "metadata", "extras"],
        "properties": {
            "modules": {
                "type": "array",
                "items": {"type": "object", "required": ["module", "per_instance", "instances", "tensors", "params"]},
            },
            "tensors": {"type": "array", "items": TENSOR},
            "metadata": {"type": "object"},
        },
    },
    "list": {
        "type": "array",
        "minItems": 10,
        "items": {"type": "object", "required": ["name", "description", "source", "target", "verified", "path"]},
    },
    "check": {"type": "object", "required": ["spec", "path", "rules", "ok"], "properties": {"ok": {"const": True}}},
    "invert": {"type": "object", "required": ["spec", "lossless", "usable", "not_restored", "ambiguous", "rules", "output"]},
    "lint": {
        "type": "object",
        "required": ["findings", "exit"],
        "properties": {
            "findings": {"type": "array", "items": {"type": "object", "required": ["code", "severity", "loc", "message"]}}
        },
    },
    "suggest": {"type": "object", "required": ["rules", "unmapped_sources", "unmapped_targets", "output"]},
}


def _argv(command: str, root, tmp_path) -> list[str]:
    ex = str(root / "examples" / "deltalm-tiny.pt")
    vit = str(root / "tests/fixtures/vit/timm/model.safetensors")
    return {
        "apply": ["apply", "deltalm-fairseq-to-hf", ex, str(tmp_path / "o.safetensors")],
        "diff": ["diff", ex, ex, "--values"],
        "inspect": ["inspect", ex],
        "list": ["list"],
        "check": ["check", "deltalm-fairseq-to-hf", "--against", ex],
        "invert": ["invert", "vit-timm-to-hf"],
        "lint": ["lint", "deltalm-fairseq-to-hf"],
        "suggest": ["suggest", vit, vit],
    }[command]


def test_every_command_is_covered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(SCHEMAS)


@pytest.mark.parametrize("command", sorted(SCHEMAS))
def test_json_output_shape(command, root, tmp_path, capsys):
    code = main([*_argv(command, root, tmp_path), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    jsonschema.validate(json.loads(out), SCHEMAS[command])


def test_diff_explain_json_shape(root, tmp_path, capsys):
    ex, out = str(root / "examples" / "deltalm-tiny.pt"), str(tmp_path / "o.safetensors")
    assert main(["apply", "deltalm-fairseq-to-hf", ex, out, "-q", "--tied", "clone"]) == 0  # every name
    for extra in (["--values"], ["--spec", "deltalm-fairseq-to-hf"]):
        code = main(["diff", ex, out, *extra, "--json"])
        doc = json.loads(capsys.readouterr().out)
        jsonschema.validate(doc, SCHEMAS["diff"])
        assert len(doc["explain"]["b"]) == 395 and code == (0 if "--spec" in extra else 1)


@pytest.mark.parametrize("env", [{}, {"NO_COLOR": "1", "FORCE_COLOR": ""}])
def test_no_colour_codes_when_piped_or_no_color(root, env):
    r = subprocess.run(
        [sys.executable, "-m", "statemap", "inspect", str(root / "examples" / "deltalm-tiny.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert r.returncode == 0 and "\x1b[" not in r.stdout and "encoder.layers.{0-11}" in r.stdout
