"""Every bad spec gets one clear error naming file:line, the rule, and what is wrong."""

from __future__ import annotations

import pytest

import statemap
from statemap import PlanError, SpecError, TensorMeta, load_spec, make_plan

HEAD = "name: t\nversion: 1\n"

# (spec text, regex the message must match). Line numbers count from 1 in the file.
BAD_SPECS = [
    (HEAD + "rules:\n  - renam: a -> b\n", r"spec\.yaml:4: rule #1: unknown op 'renam'; did you mean 'rename'\?"),
    (
        HEAD + "rules:\n  - rename: {from: a, too: b}\n",
        r"spec\.yaml:4: rule #1 \(rename\): unknown field of 'rename' 'too'; did you mean 'to'\?",
    ),
    (HEAD + "rulez: []\n", r"spec\.yaml:3: unknown spec field 'rulez'; did you mean 'rules'\?"),
    ("name: t\nrules: []\n", r"spec\.yaml:1: spec has no 'version' field"),
    ("name: t\nversion: 2\nrules: []\n", r"spec\.yaml:2: spec format version 2 is not supported"),
    (HEAD + "rules:\n  - rename: 'a.{i -> b'\n", r"spec\.yaml:4: .*unclosed '\{'"),
    (HEAD + "rules:\n  - rename: 'a.{i+1} -> b'\n", r"spec\.yaml:4: .*arithmetic belongs in the target"),
    (HEAD + "rules:\n  - rename: 'a.{i} -> b.{j}'\n", r"spec\.yaml:4: .*target 'b\.\{j\}' uses \['j'\], not captured"),
    (HEAD + "rules:\n  - rename: 'a.{i} -> b.{i+*2}'\n", r"spec\.yaml:4: .*unexpected '\*' in expression 'i\+\*2'"),
    (HEAD + "rules:\n  - rename: 'a.{i} -> b.{i:int}'\n", r"typed field \{i:int\} in target"),
    (HEAD + "rules:\n  - rename: [a -> b\n", r"spec\.yaml:\d+: invalid YAML"),
    (HEAD + "rules:\n  - cast: {from: a, dtype: float33}\n", r"spec\.yaml:4: .*unknown dtype 'float33'"),
    (HEAD + "rules:\n  - rename: a b\n", r"spec\.yaml:4: .*needs the form 'SOURCE -> TARGET'"),
    (HEAD + "rules:\n  - split: {from: a, dim: 0}\n", r"spec\.yaml:4: .*missing required field 'to'"),
    (HEAD + "rules:\n  - split: {from: a, to: [b], dim: 0}\n", r"split into fewer than 2 targets"),
    (HEAD + "rules:\n  - split: {from: a, to: [b, c], dim: x}\n", r"field 'dim' uses 'x': not a var nor a capture"),
    (
        HEAD + "rules:\n  - merge: {from: ['q.{i}', 'k.{j}'], to: 'qk.{i}'}\n",
        r"source 'k\.\{j\}' uses \['j'\], which the first source",
    ),
    (HEAD + "rules:\n  - rename: a -> b\n    optional: maybe\n", r"field 'optional': expected true or false"),
    (HEAD + "rules:\n  - rename: a -> b\n    drop: c\n", r"spec\.yaml:4: rule #1: one op per rule, found \['rename', 'drop'\]"),
    (HEAD + "rules:\n  - {}\n", r"spec\.yaml:4: rule #1: a rule is a mapping"),
    (HEAD + "rules: {a: b}\n", r"spec\.yaml:3: 'rules' must be a list"),
    (HEAD + "vars: {1x: 2}\nrules: []\n", r"var name '1x' is not an identifier"),
    (HEAD + "strict: yes please\nrules: []\n", r"'strict' must be true or false"),
    (
        HEAD + "rules:\n  - rename: a -> b\n  - rename: c -> d\n  - renamee: e -> f\n",
        r"spec\.yaml:6: rule #3: unknown op 'renamee'",
    ),
    ("name: t\nversion: 1\nversion: 1\nrules: []\n", r"spec\.yaml:3: duplicate field 'version'"),
    (HEAD + "rules:\n  - rename: 're:a(b -> c'\n", r"invalid regex"),
    (HEAD + "rules:\n  - inject: {to: x, shape: 3}\n", r"expected a list such as \[1, vocab\]"),
    (HEAD + "rules:\n  - transpose: {from: x, dims: [a, b]}\n", r"expected a list of integers such as \[1, 0\]"),
    (HEAD + "tied: share\nrules: []\n", r"'tied' must be 'clone'"),
    ("", r"spec is empty"),
    (HEAD + "rules:\n  - split: {from: a.{i}.w, to: [b, c]}\n", r"invalid YAML.*hint: quote patterns that contain braces"),
    ("- a\n- b\n", r"a spec is a mapping"),
]

ALIAS_BOMB = (
    HEAD
    + "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh"))
    + "rules: []\n"
)


@pytest.mark.parametrize("text, message", BAD_SPECS, ids=[f"bad-spec-{i}" for i in range(len(BAD_SPECS))])
def test_bad_spec(tmp_path, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_alias_bomb_is_refused(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(SpecError, match="alias bomb"):
        load_spec(path)


def test_unknown_var_override():
    spec = load_spec(HEAD + "vars: {vocab: 3}\nrules: []\n")
    with pytest.raises(SpecError, match=r"has no var 'vocb' \(vars: vocab\)"):
        spec.with_vars({"vocb": 5})
    assert spec.with_vars({"vocab": "7"}).var_dict["vocab"] == 7


def test_unknown_catalog_name_suggests():
    with pytest.raises(SpecError, match="did you mean 'deltalm-fairseq-to-hf'"):
        load_spec("deltalm-fairseq-to-h")


# -- plan-time errors: the spec is fine, it does not fit the checkpoint ------------------------

M = [
    TensorMeta("a.0.w", (10, 4), "float32"),
    TensorMeta("a.1.w", (10, 4), "float32"),
    TensorMeta("b", (4, 4), "float16"),
    TensorMeta("v", (5,), "float32"),
]

BAD_PLANS = [
    ("- rename: x.{i}.w -> y.{i}.w", r"spec\.yaml:4: rule #1 \(rename x\.\{i\}\.w\): matched no key"),
    ("- rename: a.{i}.w -> b", r"writes 'b' twice \(from 'a\.0\.w' and 'a\.1\.w'\)"),
    ("- rename: a.0.w -> b", r"writes 'b', which already exists \(a source key no rule has consumed yet\)"),
    ("- rename: a.0.w -> c\n  - rename: a.1.w -> c", r"rule #2 .*writes 'c', which already exists \(written by rule #1"),
    (
        "- split: {from: 'a.{i}.w', to: ['p.{i}', 'q.{i}', 'r.{i}']}",
        r"can't split dim 0 of length 10 into 3 equal chunks \(10 % 3 = 1\); give explicit 'sizes' at 'a\.0\.w'",
    ),
    (
        "- split: {from: 'a.{i}.w', to: ['p.{i}', 'q.{i}'], sizes: [3, 4]}",
        r"sizes 3 \+ 4 = 7 do not add up to dim 0 of length 10",
    ),
    ("- split: {from: 'a.{i}.w', to: ['p.{i}', 'q.{i}'], dim: 2}", r"has 2 dims; dim 2 is out of range"),
    ("- merge: {from: [a.0.w, b], to: c}", r"can't merge dtypes \['float32', 'float16'\]; cast first"),
    ("- merge: {from: [a.0.w, v], to: c}", r"can't concat shapes \[\[10, 4\], \[5\]\] along dim 0"),
    ("- merge: {from: [a.0.w, b], to: c, mode: stack}", r"can't merge dtypes"),
    ("- merge: {from: ['a.{i}.w', 'z.{i}'], to: 'c.{i}'}", r"matched 'a\.0\.w' but 'z\.0' is not present"),
    ("- reshape: {from: a.0.w, shape: [3, -1]}", r"can't reshape \[10, 4\] \(40 elements\) into \[3, -1\]: 40 % 3 != 0"),
    ("- reshape: {from: a.0.w, shape: [4, 4]}", r"can't reshape \[10, 4\] \(40 elements\) into \[4, 4\] \(16 elements\)"),
    ("- transpose: v", r"shape \[5\] is not a matrix"),
    ("- permute: {from: a.0.w, dims: [0, 0]}", r"dims \[0, 0\] is not a permutation of the 2 dims"),
    ("- slice: {from: v, stop: 6}", r"slice \[0:6\] does not fit dim 0 of length 5"),
    ("- pad: {from: v, size: 3}", r"pad size 3 is smaller than dim 0 of length 5; use slice to shrink"),
    ("- inject: {to: z, shape: [1, {dim: 0, of: nope}]}", r"shape refers to 'nope', which does not exist at this point"),
    ("- inject: {to: z, shape: [1, {dim: 3, of: v}]}", r"'v' has shape \[5\]; it has no dim 3"),
    ("- inject: {to: b, shape: [1]}", r"writes 'b', which already exists"),
    ("- rename: b -> c.{n}", r"unknown name 'n'|not captured"),
    ("- rename: 'a.{x}.w -> c.{x+1}'\n  - rename: 'b -> bb'", None),  # fine: digits are integers
    ("- rename: '{x}.{i}.w -> c.{x+1}.{i}'", r"'x' = 'a' is not an integer, so it cannot be used in arithmetic"),
    ("- reshape: {from: v, shape: [n, -1]}", r"unknown name 'n'|uses"),
]


@pytest.mark.parametrize("rules, message", BAD_PLANS, ids=[f"bad-plan-{i}" for i in range(len(BAD_PLANS))])
def test_bad_plan(tmp_path, rules, message):
    path = tmp_path / "spec.yaml"
    path.write_text(HEAD + "rules:\n  " + rules + "\n")
    if message is None:
        make_plan(load_spec(path), M)
        return
    with pytest.raises((PlanError, SpecError), match=message):
        make_plan(load_spec(path), M)


def test_strict_lists_unaccounted_keys_folded(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(HEAD + "strict: true\nrules:\n  - rename: b -> c\n")
    with pytest.raises(
        PlanError, match=r"strict spec 't': 3 source key\(s\) not accounted for by any rule: a\.\{0-1\}\.w x2; v\. Add rules"
    ):
        make_plan(load_spec(path), M)


def test_optional_rule_reports_instead_of_failing():
    spec = load_spec(HEAD + "rules:\n  - rename: {from: nope, to: x, optional: true}\n  - keep: '{k:path}'\n")
    plan = make_plan(spec, M)
    assert [r.index for r in plan.unmatched] == [1]
    assert plan.passthrough == ()


def test_errors_share_one_root():
    for cls in (SpecError, PlanError, statemap.CheckpointError, statemap.UnsafeCheckpointError, statemap.OutputError):
        assert issubclass(cls, statemap.StatemapError)


def test_unknown_yaml_tag_on_a_key_is_a_spec_error(tmp_path):
    """Found by tests/test_fuzz.py: a tag on a mapping key escaped as a raw yaml error."""
    path = tmp_path / "spec.yaml"
    path.write_text("name: t\nversion: 1\nrules:\n  - inject: {to: z, shape: [1],!value: 0}\n")
    with pytest.raises(SpecError, match=r"spec\.yaml:4: invalid YAML: could not determine a constructor for the tag '!value:'"):
        load_spec(path)
