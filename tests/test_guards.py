"""`when:` conditions and verified `assume:` facts: a rule never acts on an unchecked assumption."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import statemap
from statemap import PlanError, SpecError, TensorMeta, load_spec, make_plan
from statemap.cli import main
from statemap.errors import AssumptionError

HEAD = "name: t\nversion: 1\n"

# A spec that handles a tied or an untied LM head, and drops a bias only if it really equals another.
HEADS = (
    HEAD
    + """strict: true
rules:
  - drop: {from: head.weight, when: {tied_to: emb.weight}}
  - transpose: {from: head.weight, to: head.kernel, optional: true}
  - drop: {from: head.bias, assume: {equal: out.bias}}
  - keep: [out.bias, emb.weight]
"""
)


def _sd(tied: bool = True, bias_equal: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 4, generator=g)
    out_bias = torch.randn(6, generator=g)
    return {
        "emb.weight": emb,
        "head.weight": emb if tied else torch.randn(6, 4, generator=g),
        "head.bias": out_bias.clone() if bias_equal else out_bias + 1e-3,
        "out.bias": out_bias,
    }


def test_tied_head_is_dropped_only_when_the_source_says_it_is_one_tensor():
    sd = _sd(tied=True)
    out, report = statemap.map_state_dict(HEADS, sd)
    assert sorted(out) == ["emb.weight", "out.bias"]
    assert "head.weight" in report.dropped and "head.bias" in report.dropped
    assert report.assumptions == ["head.bias == out.bias (<string>:7): bytes compared"]
    assert torch.equal(out["emb.weight"], sd["emb.weight"])


def test_untied_head_is_kept_with_its_own_values():
    sd = _sd(tied=False)
    out, report = statemap.map_state_dict(HEADS, sd)
    assert sorted(out) == ["emb.weight", "head.kernel", "out.bias"]
    assert torch.equal(out["head.kernel"], sd["head.weight"].T)
    assert not torch.equal(out["head.kernel"], sd["emb.weight"].T)
    assert report.conditions_not_met == ["<string>:5: rule #1 (drop head.weight)"]


def test_equal_values_in_separate_storage_are_not_called_tied():
    """Equal bytes are not proof of a tie (a file written by another tool): the head is kept, never lost."""
    sd = _sd(tied=True)
    sd["head.weight"] = sd["emb.weight"].clone()
    out, _ = statemap.map_state_dict(HEADS, sd)
    assert torch.equal(out["head.kernel"], sd["emb.weight"].T)


def test_views_into_one_buffer_are_not_ties():
    sd = _sd()
    buf = torch.randn(12, 4)
    sd["emb.weight"], sd["head.weight"] = buf[:6], buf[6:]
    out, _ = statemap.map_state_dict(HEADS, sd)
    assert torch.equal(out["head.kernel"], buf[6:].T)


def test_a_false_assumption_fails_naming_both_keys_and_writes_nothing(tmp_path):
    sd = _sd(tied=False, bias_equal=False)
    with pytest.raises(
        AssumptionError,
        match=r"rule #3 \(drop head\.bias\): assumes 'head\.bias' equals 'out\.bias', but they differ \(max abs diff 0\.001",
    ):
        statemap.map_state_dict(HEADS, sd)
    src = tmp_path / "in.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, src)
    spec = tmp_path / "s.yaml"
    spec.write_text(HEADS)
    out = tmp_path / "out.safetensors"
    assert main(["apply", str(spec), str(src), str(out)]) == 2
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "s.yaml"]
    # dry-run reads no tensor: the fact is listed as still to verify
    report = statemap.convert(str(spec), src, dry_run=True)
    assert report.assumptions == [f"head.bias == out.bias ({spec}:7): verified by comparing bytes when applying"]


def test_tie_recorded_in_a_torch_file_is_proven_from_metadata(tmp_path):
    src = tmp_path / "in.pt"
    torch.save(_sd(tied=True), src)
    report = statemap.convert(HEADS, src, tmp_path / "out.safetensors")
    assert sorted(m.name for m in report.produced) == ["emb.weight", "out.bias"]
    assert ["emb.weight", "head.weight"] in [sorted(g) for g in report.source_ties]


def test_assume_value_checks_every_element():
    spec = HEAD + "rules:\n  - drop: {from: 'b.{i}', assume: {value: 0}}\n"
    out, report = statemap.map_state_dict(spec, {"b.0": torch.zeros(3), "b.1": torch.zeros(2, 2), "w": torch.ones(1)})
    assert list(out) == ["w"] and len(report.assumptions) == 2
    bad = torch.zeros(4)
    bad[2] = 0.5
    with pytest.raises(
        AssumptionError,
        match=r"assumes every element of 'b\.1' is 0, but max abs deviation from 0 is 0\.5; 1 of 4 elements differ, first at index \[2\]",
    ):
        statemap.map_state_dict(spec, {"b.0": torch.zeros(3), "b.1": bad})


def test_assume_compares_bfloat16_as_numbers():
    spec = HEAD + "rules:\n  - drop: {from: a, assume: {equal: b}}\n"
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    with pytest.raises(AssumptionError, match=r"max abs diff 1\b"):
        statemap.map_state_dict(spec, {"a": a, "b": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)})
    out, _ = statemap.map_state_dict(spec, {"a": a, "b": a.clone()})
    assert list(out) == ["b"]


def test_when_dtype_reinterprets_only_matching_keys():
    """Paddle saves bfloat16 parameters as uint16 arrays: view them back, leave float32 alone."""
    spec = HEAD + "rules:\n  - view: {from: '{k:path}', dtype: bfloat16, when: {dtype: uint16}}\n"
    w = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    sd = {"a.w": w.view(torch.uint16).numpy(), "b.w": np.array([3.0], dtype=np.float32)}
    out, _ = statemap.map_state_dict(spec, sd)
    assert out["b.w"].dtype == np.float32
    assert np.array_equal(np.asarray(out["a.w"]).view(np.uint16), w.view(torch.uint16).numpy())  # same bits, now bfloat16
    plan = make_plan(load_spec(spec), [TensorMeta("a.w", (2,), "uint16"), TensorMeta("b.w", (1,), "float32")])
    assert {o.name: o.meta.dtype for o in plan.outputs} == {"a.w": "bfloat16", "b.w": "float32"}


def test_when_present_absent_and_var_conditions():
    spec = (
        HEAD
        + "vars: {n_heads: 4, n_kv_heads: 4}\n"
        + "rules:\n"
        + "  - copy: {from: emb, to: [emb, head], when: {absent: head}}\n"
        + "  - rename: {from: 'k.{i}', to: 'kv.{i}', when: {if: 'n_kv_heads != n_heads and n_heads > 0'}}\n"
        + "  - inject: {to: gqa, shape: [1], value: 1, when: {if: n_kv_heads < n_heads}}\n"
    )
    metas = [TensorMeta("emb", (3, 2), "float32"), TensorMeta("k.0", (2,), "float32")]
    plan = make_plan(load_spec(spec), metas)
    assert [o.name for o in plan.outputs] == ["emb", "head", "k.0"]
    assert [r.index for r in plan.not_met] == [2, 3]
    plan = make_plan(load_spec(spec, {"n_kv_heads": 2}), [*metas, TensorMeta("head", (3, 2), "float32")])
    assert [o.name for o in plan.outputs] == ["emb", "kv.0", "head", "gqa"]
    assert [r.index for r in plan.not_met] == [1]


def test_a_conditional_rule_still_fails_when_its_pattern_matches_nothing():
    spec = HEAD + "rules:\n  - drop: {from: nothere, when: {absent: x}}\n"
    with pytest.raises(PlanError, match=r"rule #1 \(drop nothere\): matched no key"):
        make_plan(load_spec(spec), [TensorMeta("a", (1,), "float32")])


def test_assume_shape_mismatch_fails_at_plan_time():
    spec = HEAD + "rules:\n  - drop: {from: a, assume: {equal: b}}\n"
    with pytest.raises(PlanError, match=r"assumes 'a' equals 'b', but 'a' is \[2\] float32 and 'b' is \[3\] float32"):
        make_plan(load_spec(spec), [TensorMeta("a", (2,), "float32"), TensorMeta("b", (3,), "float32")])
    with pytest.raises(PlanError, match=r"assumes 'a' equals 'c', which does not exist"):
        make_plan(load_spec(spec.replace("equal: b", "equal: c")), [TensorMeta("a", (2,), "float32")])


def test_assume_shape_is_checked_from_metadata_with_wildcards_vars_and_dims_of_other_keys():
    spec = load_spec(
        HEAD + "vars: {d: 4}\nrules:\n"
        "  - transpose: {from: 'h.{i}.w', assume: {shape: [{dim: 1, of: emb}, ~]}, note: use the other spec}\n"
        "  - keep: {from: 'h.{i}.b', assume: {shape: ['3 * d']}}\n"
        "  - keep: emb\n"
    )
    good = [TensorMeta("emb", (10, 4), "float32"), TensorMeta("h.0.w", (4, 12), "float32"), TensorMeta("h.0.b", (12,), "float32")]
    assert {o.name: o.meta.shape for o in make_plan(spec, good).outputs} == {"h.0.w": (12, 4), "h.0.b": (12,), "emb": (10, 4)}
    cases = [
        (
            1,
            (12, 4),
            r":5: rule #1 \(transpose h\.\{i\}\.w\): assumes 'h\.0\.w' has shape \[4, \*\] "
            r"\(\[\{dim: 1, of: emb\}, \*\]\), but it is \[12, 4\] \(note: use the other spec\)$",
        ),
        (1, (4, 12, 1), r"has shape \[4, \*\] .*but it is \[4, 12, 1\]"),  # the rank counts too
        (2, (13,), r":6: .*assumes 'h\.0\.b' has shape \[12\] \(\[\(3\*d\)\]\), but it is \[13\]$"),
    ]
    for at, shape, match in cases:
        bad = list(good)
        bad[at] = TensorMeta(bad[at].name, shape, "float32")
        with pytest.raises(PlanError, match=match):
            make_plan(spec, bad)
    missing = load_spec(HEAD + "rules:\n  - keep: {from: a, assume: {shape: [{dim: 0, of: nothere}]}}\n")
    with pytest.raises(PlanError, match=r"refers to 'nothere', which does not exist at this point"):
        make_plan(missing, [TensorMeta("a", (2,), "float32")])


def test_the_reverse_of_a_transpose_or_permute_checks_the_shape_in_its_own_dim_order():
    from statemap.invert import invert

    spec = load_spec(
        HEAD + "rules:\n"
        "  - transpose: {from: w, assume: {shape: [{dim: 0, of: e}, '2 * 3']}}\n"
        "  - permute: {from: c, dims: [2, 0, 1], assume: {shape: [1, ~, 3]}}\n"
        "  - transpose: {from: t, dims: [0, -1], assume: {shape: [4, 5, 6], value: 0}}\n"
        "  - keep: e\n"
    )
    rules = {next(iter(r.values()))["from"]: next(iter(r.values())) for r in invert(spec).data["rules"]}
    assert rules["w"]["assume"] == {"shape": ["(2*3)", {"dim": 0, "of": "e"}]}
    assert rules["c"]["assume"] == {"shape": [3, 1, None]}
    assert rules["t"]["assume"] == {"shape": [6, 5, 4]}  # `value` is about the forward input: not carried


BAD = [
    ("  - drop: {from: a, when: {abesnt: b}}\n", r"unknown condition 'abesnt'; did you mean 'absent'\?"),
    ("  - drop: {from: a, when: []}\n", r"field 'when': expected a mapping"),
    ("  - drop: {from: a, when: {dtype: float33}}\n", r"unknown dtype in 'float33'"),
    ("  - drop: {from: 'a.{i}', when: {absent: 'b.{j}'}}\n", r"'when'/'assume' use \['j'\], not captured"),
    ("  - drop: {from: a, when: {if: 'n >> 2'}}\n", r"unexpected '>' in expression"),
    ("  - drop: {from: a, when: {if: 'x ='}}\n", r"unexpected '=' in expression"),
    ("  - drop: {from: a, assume: {same: b}}\n", r"unknown assumption 'same'"),
    ("  - drop: {from: a, assume: {value: .nan}}\n", r"'value' must be a finite number"),
    ("  - drop: {from: a, assume: {shape: []}}\n", r"'shape' takes a list with one entry per dim"),
    ("  - drop: {from: a, assume: {shape: 3}}\n", r"'shape' takes a list with one entry per dim"),
    ("  - drop: {from: a, assume: {shape: [true]}}\n", r"shape entry True is a boolean"),
    ("  - drop: {from: a, assume: {shape: [[2]]}}\n", r"shape entry \[2\] must be an integer, .*null \(any length\)"),
    ("  - drop: {from: a, assume: {shape: ['d +']}}\n", r"field 'assume': .*expression"),
    ("  - drop: {from: a, assume: {shape: [{dim: 0, of: 'b.{j}'}]}}\n", r"'when'/'assume' use \['j'\], not captured"),
    ("  - drop: {from: a, assume: {shape: [n_embd]}}\n", r"'when'/'assume' use \['n_embd'\], not captured"),
    ("  - inject: {to: a, shape: [1], value: 0, assume: {value: 0}}\n", r"'assume' states a fact about matched tensors"),
    ("  - inject: {to: a, shape: [1], value: 0, when: {dtype: uint16}}\n", r"need a matched key"),
    ("  - drop: {from: a, inverse: [{keep: a}, 3]}\n", r"expected a rule mapping .* or a list of them"),
]


@pytest.mark.parametrize("rule,match", BAD, ids=[m for _, m in BAD])
def test_bad_guards_are_spec_errors_with_file_and_line(tmp_path, rule, match):
    p = tmp_path / "spec.yaml"
    p.write_text(HEAD + "rules:\n" + rule)
    with pytest.raises(SpecError, match=r"spec\.yaml:4: .*" + match):
        load_spec(p)


def test_unknown_var_in_condition_is_a_plan_error_naming_the_rule():
    spec = HEAD + "rules:\n  - drop: {from: a, when: {if: 'n_layers > 2'}}\n"
    with pytest.raises(SpecError, match=r"'when'/'assume' use \['n_layers'\]"):
        load_spec(spec)


# -- reverse --------------------------------------------------------------------------------


def test_reverse_of_a_verified_drop_restores_the_copy():
    sd = _sd(tied=True)
    fwd, _ = statemap.map_state_dict(HEADS, sd)
    back, _ = statemap.map_state_dict(load_spec(HEADS).inverse(), fwd)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    untied = _sd(tied=False)
    fwd, _ = statemap.map_state_dict(HEADS, untied)
    back, _ = statemap.map_state_dict(load_spec(HEADS).inverse(), fwd)
    assert all(torch.equal(back[k], untied[k]) for k in untied)


def test_inverse_accepts_a_list_of_rules():
    spec = load_spec(
        HEAD
        + "rules:\n  - merge: {from: ['a.{i}', 'b.{i}'], to: 'ab.{i}', dim: 0, mode: stack,\n"
        + "             inverse: [{split: {from: 'ab.{i}', to: ['a.{i}', 'b.{i}'], dim: 0}},\n"
        + "                       {reshape: {from: 'a.{i}', shape: [3]}}, {reshape: {from: 'b.{i}', shape: [3]}}]}\n"
    )
    sd = {"a.0": torch.arange(3.0), "b.0": torch.arange(3.0) + 10}
    fwd, _ = statemap.map_state_dict(spec, sd)
    assert fwd["ab.0"].shape == (2, 3)
    back, _ = statemap.map_state_dict(spec.inverse(), fwd)
    assert torch.equal(back["a.0"], sd["a.0"]) and torch.equal(back["b.0"], sd["b.0"])


def test_apply_reverse_refuses_an_incomplete_reverse_unless_the_loss_is_accepted(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(HEAD + "rules:\n  - drop: opt.state\n  - rename: 'a -> b'\n")
    src = tmp_path / "in.safetensors"
    save_file({"b": torch.ones(2)}, src)
    out = tmp_path / "out.safetensors"
    assert main(["apply", str(spec), str(src), str(out), "--reverse"]) == 2
    err = capsys.readouterr().err
    assert "cannot restore 1 rule(s)" in err and "rule #1 (drop opt.state)" in err and "--accept-loss" in err
    assert not out.exists()
    assert main(["apply", str(spec), str(src), str(out), "--reverse", "--accept-loss", "nothing.like.it"]) == 2
    assert "names no loss" in capsys.readouterr().err
    assert main(["apply", str(spec), str(src), str(out), "--reverse", "--accept-loss", "opt.state"]) == 0
    assert statemap.load_state_dict(out).keys() == {"a"}
    inv = tmp_path / "inv.yaml"
    assert main(["invert", str(spec), "-o", str(inv)]) == 2 and not inv.exists()
    assert main(["invert", str(spec), "-o", str(inv), "--accept-loss", "all"]) == 0 and inv.exists()


def test_dropped_and_passed_through_tables_show_shape_and_dtype(tmp_path, capsys, root):
    """A drop is never a bare name: the report's tables give each key's shape and dtype (no empty columns)."""
    out = tmp_path / "o.safetensors"
    assert main(["apply", "deltalm-fairseq-to-hf", str(root / "examples/deltalm-tiny.pt"), str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith(("encoder.version", "decoder.version"))]
    assert len(rows) == 2 and all("[1]" in r and "float32" in r for r in rows), text
    spec = tmp_path / "s.yaml"
    spec.write_text(HEAD + "rules:\n  - drop: a\n")
    src = tmp_path / "in.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, src)
    assert main(["apply", str(spec), str(src), str(tmp_path / "o2.safetensors")]) == 0
    text = capsys.readouterr().out
    assert any(line.startswith("b ") and "[4]" in line and "bfloat16" in line for line in text.splitlines()), text
    assert any(line.startswith("a ") and "[2, 3]" in line and "float32" in line for line in text.splitlines()), text


def test_reverse_of_a_copy_verifies_the_copies_are_still_equal():
    """The reverse drops the extra names of a copy / tie only after checking them: a copy that
    diverged after the conversion (an untied head fine-tuned on its own) fails instead of vanishing."""
    spec = load_spec(HEAD + "rules:\n  - tie: {from: 'e.{i}', to: ['a.{i}', 'b.{i}']}\n")
    e = torch.randn(3)
    back, _ = statemap.map_state_dict(spec.inverse(), statemap.map_state_dict(spec, {"e.0": e})[0])
    assert list(back) == ["e.0"] and torch.equal(back["e.0"], e)
    with pytest.raises(AssumptionError, match=r"drop b\.\{i\}\): assumes 'b\.0' equals 'a\.0', but they differ"):
        statemap.map_state_dict(spec.inverse(), {"a.0": e, "b.0": e + 1})
