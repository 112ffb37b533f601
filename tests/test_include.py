"""`- include: FILE` in a spec's rules (issue #13): shared rule blocks, their vars, their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from statemap import load_spec, map_state_dict
from statemap.errors import PlanError, SpecError
from statemap.spec import MAX_INCLUDE_DEPTH

ATTN = """\
vars:
  heads: 2
  prefix: "model."
rules:
  - rename: "layers.{i}.attention.wq.weight -> {prefix}layers.{i}.self_attn.q_proj.weight"
  - rename: "layers.{i}.attention.wk.weight -> {prefix}layers.{i}.self_attn.k_proj.weight"
  - split: {from: "layers.{i}.attention.qkv", to: ["{prefix}q.{i}", "{prefix}k.{i}"], sizes: [heads, -1]}
"""


def _write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.attention.wq.weight": torch.randn(4, 4, generator=g),
        "layers.0.attention.wk.weight": torch.randn(4, 4, generator=g),
        "layers.0.attention.qkv": torch.randn(6, 4, generator=g),
        "norm.weight": torch.randn(4, generator=g),
    }


def test_included_rules_run_in_place_with_their_vars(tmp_path):
    _write(tmp_path, "blocks/attn.yaml", ATTN)
    spec = _write(
        tmp_path,
        "main.yaml",
        "name: m\nversion: 1\nvars:\n  prefix: ''\nrules:\n  - include: blocks/attn.yaml\n  - rename: norm.weight -> model.norm.weight\n",
    )
    s = load_spec(spec)
    assert [r.op for r in s.rules] == ["rename", "rename", "split", "rename"]
    assert [r.index for r in s.rules] == [1, 2, 3, 4]
    assert s.rules[0].loc.file == str(tmp_path / "blocks/attn.yaml") and s.rules[0].loc.line == 5
    assert s.rules[3].loc.file == str(spec) and s.rules[3].loc.line == 7
    # the includer's `prefix: ''` wins over the included default; `heads` comes from the include
    assert s.var_dict == {"prefix": "", "heads": 2}
    sd = _sd()
    out, _ = map_state_dict(s, sd)
    assert set(out) == {"layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight", "q.0", "k.0", "model.norm.weight"}
    assert torch.equal(out["layers.0.self_attn.q_proj.weight"], sd["layers.0.attention.wq.weight"])
    assert torch.equal(out["q.0"], sd["layers.0.attention.qkv"][:2]) and torch.equal(out["k.0"], sd["layers.0.attention.qkv"][2:])
    assert not torch.equal(out["k.0"][:2], sd["layers.0.attention.qkv"][:2])  # negative: the halves differ
    # --set reaches included vars
    out, _ = map_state_dict(load_spec(spec, vars={"heads": 3}), {k: v.numpy() for k, v in sd.items()})
    assert np.array_equal(np.asarray(out["q.0"]), sd["layers.0.attention.qkv"][:3].numpy())


def test_errors_keep_the_included_files_line(tmp_path):
    _write(tmp_path, "bad.yaml", "rules:\n  - rename: a -> b\n  - renam: c -> d\n")
    spec = _write(tmp_path, "main.yaml", "name: m\nversion: 1\nrules:\n  - include: bad.yaml\n")
    with pytest.raises(SpecError, match=r"bad\.yaml:3: rule #2: unknown op 'renam'"):
        load_spec(spec)
    _write(tmp_path, "miss.yaml", "rules:\n  - rename: nothing.here -> b\n")
    spec2 = _write(tmp_path, "main2.yaml", "name: m\nversion: 1\nrules:\n  - include: miss.yaml\n")
    with pytest.raises(PlanError, match=r"miss\.yaml:2: rule #1 \(rename nothing\.here\): matched no key"):
        map_state_dict(load_spec(spec2), _sd())


def test_nested_includes_are_relative_to_their_own_file(tmp_path):
    _write(tmp_path, "a/b/leaf.yaml", "vars:\n  heads: 5\nrules:\n  - drop: norm.weight\n")
    _write(tmp_path, "a/mid.yaml", "vars:\n  heads: 4\nrules:\n  - include: b/leaf.yaml\n")
    spec = _write(tmp_path, "main.yaml", "name: m\nversion: 1\nrules:\n  - include: a/mid.yaml\n  - keep: '{k:path}'\n")
    s = load_spec(spec)
    assert s.var_dict == {"heads": 4}  # the nearer include wins
    assert s.rules[0].op == "drop" and s.rules[0].loc.file == str(tmp_path / "a/b/leaf.yaml")


def test_a_catalog_spec_can_be_included(tmp_path):
    spec = _write(tmp_path, "main.yaml", "name: m\nversion: 1\nrules:\n  - include: gpt2-hf-to-nanogpt\n")
    assert len(load_spec(spec).rules) == len(load_spec("gpt2-hf-to-nanogpt").rules) > 0


def _chain(tmp: Path, n: int) -> Path:
    for k in range(n):
        _write(tmp, f"c{k}.yaml", f"rules:\n  - include: c{k + 1}.yaml\n")
    _write(tmp, f"c{n}.yaml", "rules:\n  - drop: x\n")
    return _write(tmp, "main.yaml", "name: m\nversion: 1\nrules:\n  - include: c0.yaml\n")


@pytest.mark.parametrize(
    "files, main, match",
    [
        (
            {"a.yaml": "rules:\n  - include: b.yaml\n", "b.yaml": "rules:\n  - include: a.yaml\n"},
            "a.yaml",
            r"b\.yaml:2: include cycle: main\.yaml -> a\.yaml -> b\.yaml -> a\.yaml",
        ),
        ({}, "nope.yaml", r"main\.yaml:4: include 'nope\.yaml': no such file in .* nor catalog spec"),
        (
            {"a.yaml": "name: x\nunwarp: model\nrules: []\n"},
            "a.yaml",
            r"a\.yaml:2: unknown spec field 'unwarp'; did you mean 'unwrap'\?",
        ),
        ({"a.yaml": "vars: {a: 1}\n"}, "a.yaml", r"a\.yaml: an included spec is a mapping with 'rules'"),
        ({"a.yaml": "version: 2\nrules: []\n"}, "a.yaml", r"a\.yaml:1: spec format version 2 is not supported"),
        ({"a.yaml": "rules: x\n"}, "a.yaml", r"a\.yaml:1: 'rules' must be a list"),
        ({"a.yaml": "rules: [\n"}, "a.yaml", r"a\.yaml:2: invalid YAML"),
        ({"d/x.yaml": "rules: []\n"}, "d", r"include 'd': .* is not a file"),
        ({"a.yaml": "vars:\n  q: p * 2\nrules: []\n"}, "a.yaml", None),  # q uses p: declared by the includer -> fine
    ],
)
def test_bad_includes(tmp_path, files, main, match):
    for name, text in files.items():
        _write(tmp_path, name, text)
    spec = _write(tmp_path, "main.yaml", f"name: m\nversion: 1\nvars:\n  p: 3\nrules:\n  - include: {main}\n")
    if match is None:
        assert load_spec(spec).var_dict == {"p": 3, "q": 6}
        return
    spec.write_text(f"name: m\nversion: 1\nrules:\n  - include: {main}\n")
    with pytest.raises(SpecError, match=match):
        load_spec(spec)


def test_include_depth_and_entry_shape(tmp_path):
    assert load_spec(_chain(tmp_path, MAX_INCLUDE_DEPTH - 1)).rules[0].op == "drop"
    with pytest.raises(SpecError, match=rf"includes nested more than {MAX_INCLUDE_DEPTH} deep \(main\.yaml -> c0\.yaml -> "):
        load_spec(_chain(tmp_path, MAX_INCLUDE_DEPTH))
    with pytest.raises(SpecError, match=r"an include entry holds only 'include: FILE', found \['include', 'optional'\]"):
        load_spec("name: m\nversion: 1\nrules:\n  - {include: x.yaml, optional: true}\n")
    with pytest.raises(SpecError, match=r"'include' names a spec file"):
        load_spec("name: m\nversion: 1\nrules:\n  - include: [a]\n")


def test_too_many_includes(tmp_path, monkeypatch):
    from statemap import spec as spec_mod

    monkeypatch.setattr(spec_mod, "MAX_INCLUDES", 3)
    _write(tmp_path, "leaf.yaml", "rules:\n  - drop: x\n")
    main = _write(tmp_path, "main.yaml", "name: m\nversion: 1\nrules:\n" + "  - include: leaf.yaml\n" * 4)
    with pytest.raises(SpecError, match=r"main\.yaml:7: include 'leaf\.yaml': more than 3 includes in one spec"):
        load_spec(main)
