"""statemap.lint: each bad spec gets its finding; the catalog and the docs' fixed examples lint clean."""

from __future__ import annotations

import re

import pytest
import yaml

from statemap import catalog, load_spec
from statemap.lint import CODES, Finding, exit_code, lint, lint_file, witness
from statemap.lint import pattern_nfa as _pnfa
from statemap.load import open_checkpoint
from statemap.template import parse_pattern

HEAD = "name: t\nversion: 1\nvars: {d: 16}\nrules:\n"

# (rules, code, severity, regex the finding's one-line form must match). Rule lines count from 5.
BAD_SPECS = [
    # SM101: the catch-all runs first and takes the encoder's in_proj_weight
    (
        "  - rename: 'encoder.{rest:path} -> model.encoder.{rest}'\n"
        "  - split: {from: '{stack}.layers.{i}.{attn}.in_proj_weight', to: ['{stack}.{i}.{attn}.q', '{stack}.{i}.{attn}.k']}\n",
        "SM101",
        "warning",
        r"spec\.yaml:6: SM101 warning: rule #2 .*'encoder\.layers\.x\.x\.in_proj_weight'.*rule #1 \(rename encoder\.\{rest:path\}\) at .*spec\.yaml:5",
    ),
    (
        "  - rename: '{a}.layers.{i}.weight -> A.{a}.{i}'\n  - rename: 'encoder.layers.{i}.{b} -> B.{i}.{b}'\n",
        "SM101",
        "warning",
        r"spec\.yaml:6: .*such as 'encoder\.layers\.x\.weight'",
    ),
    # SM102: not idempotent
    (
        "  - rename: '{x}_head.weight -> lm_{x}_head.weight'\n",
        "SM102",
        "warning",
        r"spec\.yaml:5: .*output 'lm_x_head\.weight' matches its own source .* -> 'lm_lm_x_head\.weight'",
    ),
    ("  - rename: '{x:path} -> model.{x}'\n", "SM102", "warning", r"'model\.x' matches its own source '\{x:path\}'"),
    # SM103: substring cascades
    (
        "  - rename: '{pre:path}v_proj.weight -> {pre}value.weight'\n",
        "SM103",
        "warning",
        r"\{pre:path\} .* runs into 'v_proj\.weight' with no '\.' between.*'a\.qkv_proj\.weight'",
    ),
    ("  - rename: 'h{i}.attn.weight -> blocks.{i}.attn.weight'\n", "SM103", "warning", r"\{i\} .* glued to 'h' mid-word"),
    ("  - rename: 'a.{x}{y}.w -> b.{x}.{y}.w'\n", "SM103", "warning", r"captures \{x\}\{y\} .* touch"),
    ("  - rename: 'a.{x}_proj.w -> b.{x}.w'\n", "SM103", "info", r"captures part of a segment"),
    # SM104: two writers
    ("  - rename: a.weight -> x.weight\n  - rename: b.weight -> x.weight\n", "SM104", "error", r"spec\.yaml:6: .*'x\.weight'"),
    (
        "  - rename: '{s}.fc1.{p} -> {s}.ffn.{p}'\n  - rename: '{s}.fc2.{p} -> {s}.ffn.{p}'\n",
        "SM104",
        "warning",
        r"spec\.yaml:6: .*target '\{s\}\.ffn\.\{p\}' can write 'x\.ffn\.x', which rule #1",
    ),
    (
        "  - rename: {from: 'norm.{p}', to: 'ln.{p}', optional: true}\n  - rename: 'enc.norm.{p} -> ln.{p}'\n",
        "SM104",
        "info",
        r"alternatives",
    ),
    ("  - split: {from: w, to: [a, a]}\n", "SM104", "error", r"lists target 'a' twice"),
    ("  - rename: '{a}.{b}.weight -> {a}.weight'\n", "SM104", "warning", r"does not use \{b\}"),
    # SM105: shadowed
    (
        "  - rename: '{k}.weight -> {k}.kernel'\n  - rename: lm_head.weight -> out.weight\n",
        "SM105",
        "error",
        r"spec\.yaml:6: SM105 error: rule #2 .*can never match.*rule #1 \(rename \{k\}\.weight\)",
    ),
    ("  - drop: '{k:path}.bias'\n  - rename: {from: fc.bias, to: b, optional: true}\n", "SM105", "warning", r"never match"),
    (
        "  - rename: 'a.{k} -> b.{k}'\n  - rename: 'b.{k} -> c.{k}'\n  - rename: 'a.x -> z'\n",
        "SM105",
        "error",
        r"spec\.yaml:7: .*rule #3 .*consumed earlier by rule #1 ",
    ),
    ("  - rename: 're:(?P<k>enc\\..+) -> model.{k}'\n  - rename: 'enc.{x} -> y.{x}'\n", "SM105", "error", r"re:\(\?P<k>"),
    # SM108: static sizes and dims
    ("  - split: {from: w, to: [a, b], sizes: [d, d, d]}\n", "SM108", "error", r"3 sizes for 2 targets"),
    ("  - split: {from: w, to: [a, b, c], sizes: [-1, 2, -1]}\n", "SM108", "error", r"more than one -1"),
    ("  - permute: {from: w, dims: [0, 0, 1]}\n", "SM108", "error", r"not a permutation"),
    ("  - slice: {from: w, start: 5, stop: 2}\n", "SM108", "error", r"start 5 is after stop 2"),
    ("  - reshape: {from: w, shape: [-1, 2, -1]}\n", "SM108", "error", r"more than one -1"),
    ("  - transpose: {from: w, dims: [1, 1]}\n", "SM108", "warning", r"no-op"),
]

# Specs that must lint with no finding above info: order and chains the linter must accept.
GOOD_SPECS = [
    # specific first, catch-all last (fairseq style)
    "  - rename: 'encoder.layers.{i}.layer_norms.0.{p} -> model.encoder.layers.{i}.self_attn_layer_norm.{p}'\n"
    "  - rename: 'encoder.{rest:path} -> model.encoder.{rest}'\n",
    # a rename then a transform of what it wrote (a chain, not a shadow)
    "  - rename: 'a.{k} -> b.{k}'\n  - transpose: 'b.{k}'\n  - cast: {from: '{x:path}', dtype: float16}\n",
    # keep leaves keys in place: the later rename still sees them
    "  - keep: 'x.{p}'\n  - rename: 'x.{p} -> y.{p}'\n",
    # merge, and a tie listing its source among the targets
    "  - merge: {from: ['q.{i}', 'k.{i}'], to: 'qk.{i}'}\n  - tie: {from: e.w, to: [e.w, head.w]}\n",
    # a write after the first writer's key was renamed away
    "  - rename: a -> x\n  - rename: x -> y\n  - rename: b -> x\n",
]


def _lint_text(tmp_path, rules: str) -> list[Finding]:
    path = tmp_path / "spec.yaml"
    path.write_text(HEAD + rules)
    return lint(load_spec(path))


@pytest.mark.parametrize("rules, code, severity, match", BAD_SPECS, ids=[f"{c}-{i}" for i, (_, c, _, _) in enumerate(BAD_SPECS)])
def test_bad_spec(tmp_path, rules, code, severity, match):
    findings = _lint_text(tmp_path, rules)
    hits = [f for f in findings if f.code == code and f.severity == severity and re.search(match, str(f))]
    assert hits, f"no {code} {severity} matching {match!r} in:\n" + "\n".join(map(str, findings))


@pytest.mark.parametrize("rules", GOOD_SPECS, ids=[f"good-{i}" for i in range(len(GOOD_SPECS))])
def test_good_spec(tmp_path, rules):
    findings = [f for f in _lint_text(tmp_path, rules) if f.severity != "info"]
    assert not findings, "\n".join(map(str, findings))


def test_catalog_lints_clean():
    problems = []
    for name in catalog.names():
        problems += [f"{name}: {f}" for f in lint(load_spec(name)) if f.severity in ("error", "warning")]
    assert not problems, "\n".join(problems)


def _examples(root) -> list[tuple[str, str, str]]:
    """(code, bad yaml, fixed yaml) from docs/lint.md's '## SM1xx' sections."""
    text = (root / "docs" / "lint.md").read_text()
    out = []
    for m in re.finditer(r"^## (SM\d{3}).*?(?=^## |\Z)", text, re.S | re.M):
        blocks = re.findall(r"```yaml\n(.*?)```", m.group(0), re.S)
        assert len(blocks) == 2, f"{m.group(1)}: want one bad and one fixed example"
        out.append((m.group(1), blocks[0], blocks[1]))
    return out


def test_docs_examples(root, deltalm_metas):
    examples = _examples(root)
    assert {c for c, _, _ in examples} == set(CODES)
    for code, bad, fixed in examples:
        against = deltalm_metas if code in ("SM106", "SM107") else None
        spec = {"name": "doc", "version": 1, "vars": {"d": 16}, "rules": yaml.safe_load(bad)}
        got = lint(load_spec(spec), against)
        assert any(f.code == code and f.severity in ("error", "warning") for f in got), (code, [str(f) for f in got])
        spec["rules"] = yaml.safe_load(fixed)
        got = [f for f in lint(load_spec(spec), against) if f.severity != "info"]
        assert not got, (code, [str(f) for f in got])


@pytest.fixture(scope="module")
def deltalm_metas():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = load_spec("deltalm-fairseq-to-hf")
    with open_checkpoint(str(root / "examples" / "deltalm-tiny.pt"), spec.unwrap, spec.strip_prefix) as ck:
        return list(ck.metas.values())


def test_against_checkpoint(root, deltalm_metas):
    assert lint_file("deltalm-fairseq-to-hf", str(root / "examples" / "deltalm-tiny.pt")) == []
    text = (root / "mappings" / "deltalm-fairseq-to-hf.yaml").read_text()
    extra = (
        "  - rename: {from: 'encoder.nothing.{x}', to: 'foo.{x}', optional: true}\n"
        "  - rename: 'decoder.nothing.{x} -> bar.{x}'\n"
        "  - drop:"
    )
    spec = load_spec(text.replace("  - drop:", extra, 1))
    got = lint(spec, deltalm_metas)
    assert [(f.code, f.severity, f.rule.split(" (")[0]) for f in got] == [
        ("SM106", "info", "rule #1"),
        ("SM106", "error", "rule #2"),
    ], got
    assert "matches nothing on this checkpoint" in got[1].message
    # a split that can't divide: the PlanError becomes a finding at that rule, not a crash
    bad = load_spec(text.replace("  - drop:", "  - split: {from: encoder.embed_positions.weight, to: [a, b, c]}\n  - drop:", 1))
    got = lint(bad, deltalm_metas)
    assert got[0].code == "SM107" and got[0].severity == "error" and got[0].rule.startswith("rule #1 (split")
    assert re.search(r"can't split dim 0 of length 34 into 3 equal chunks", got[0].message)
    assert exit_code(got) == 2
    # a strict spec with keys left over
    strict = load_spec(HEAD.replace("rules:", "strict: true\nrules:") + "  - drop: encoder.version\n")
    got = lint(strict, deltalm_metas)
    assert [f.code for f in got] == ["SM107"] and "not accounted for" in got[0].message


def test_finding_format_and_exit_code():
    f = Finding("SM105", "error", "x.yaml:7", "rule #2 (rename a)", "can never match", "move it")
    assert str(f) == "x.yaml:7: SM105 error: rule #2 (rename a): can never match (move it)"
    assert exit_code([]) == 0
    assert exit_code([replace_sev(f, "info")]) == 0
    assert exit_code([replace_sev(f, "warning"), replace_sev(f, "info")]) == 1
    assert exit_code([f, replace_sev(f, "warning")]) == 2


def replace_sev(f: Finding, sev: str) -> Finding:
    from dataclasses import replace

    return replace(f, severity=sev)


@pytest.mark.parametrize(
    "a, b, want",
    [
        ("encoder.{rest:path}", "{s}.layers.{i}.in_proj_weight", "encoder.layers.x.in_proj_weight"),
        ("{x}.weight", "lm_head.{p}", "lm_head.weight"),
        ("layers.{i:int}.w", "layers.x.w", None),
        ("re:h\\.\\d+\\.(attn|mlp)\\.w", "h.{i}.mlp.{p}", "h.0.mlp.w"),
    ],
)
def test_witness(a, b, want):
    pa, pb = parse_pattern(a), parse_pattern(b)
    w = witness([_pnfa(pa), _pnfa(pb)])
    assert w == want
    if w is not None:
        assert pa.match(w) is not None and pb.match(w) is not None


def test_cli_lint(tmp_path, capsys):
    import json

    from statemap.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nversion: 1\nrules:\n  - rename: '{x}_head.weight -> lm_{x}_head.weight'\n")
    assert main(["lint", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.yaml:4: SM102 warning" in out
    assert main(["lint", "deltalm-fairseq-to-hf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exit"] == 0
