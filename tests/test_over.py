"""merge / split over a capture (experts, tensor-parallel ranks, replicas): values against torch,
the derived inverses both ways, `mode: same` verified before writing, lint, and bad inputs."""

from __future__ import annotations

import pytest
import torch

import statemap
from statemap.errors import AssumptionError, PlanError, SpecError
from statemap.invert import invert
from statemap.lint import lint
from statemap.spec import load_spec

g = torch.Generator().manual_seed(0)


def spec_of(rules: list, vars: dict | None = None) -> statemap.Spec:
    return load_spec({"name": "t", "version": 1, "vars": vars or {}, "rules": rules})


def run(spec, sd: dict) -> dict:
    out, _ = statemap.map_state_dict(spec, sd)
    return out


def experts(n_layers: int, n_experts: int) -> dict:
    return {
        f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight": torch.randn(6, 4, generator=g)
        for i in range(n_layers)
        for e in range(n_experts)
    }


STACK = {
    "merge": {
        "from": "model.layers.{i}.block_sparse_moe.experts.{e:int}.w1.weight",
        "over": "e",
        "mode": "stack",
        "dim": 0,
        "to": "model.layers.{i}.mlp.experts.gate_proj",
    }
}


@pytest.mark.parametrize("n_experts", [1, 3, 12])
def test_stack_experts_any_count_and_back(n_experts):
    sd = experts(2, n_experts)
    spec = spec_of([STACK])
    out = run(spec, sd)
    assert sorted(out) == ["model.layers.0.mlp.experts.gate_proj", "model.layers.1.mlp.experts.gate_proj"]
    for i in range(2):
        want = torch.stack([sd[f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"] for e in range(n_experts)])
        assert torch.equal(out[f"model.layers.{i}.mlp.experts.gate_proj"], want)
    inv = invert(spec)
    assert inv.lossless, inv.lost
    assert inv.data["rules"][0]["split"]["over"] == "e"
    back = run(inv.spec, out)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_index_order_is_numeric_not_text():
    sd = {f"e.{e}.w": torch.full((2,), float(e)) for e in range(12)}
    out = run(spec_of([{"merge": {"from": "e.{e:int}.w", "over": "e", "mode": "stack", "to": "w"}}]), sd)
    assert torch.equal(out["w"][:, 0], torch.arange(12.0))


def test_concat_ranks_with_count_and_back():
    sd = {f"{r:02d}/layers.{i}.wq": torch.randn(4, 6, generator=g) for r in range(2) for i in range(2)}
    spec = spec_of(
        [{"merge": {"from": "{rank:int}/layers.{i}.wq", "over": "rank", "dim": 0, "to": "q.{i}", "count": "n_ranks"}}],
        {"n_ranks": 2},
    )
    out = run(spec, sd)
    assert torch.equal(out["q.1"], torch.cat([sd["00/layers.1.wq"], sd["01/layers.1.wq"]]))
    back = run(invert(spec).spec, out)
    # the reverse writes the index as a plain integer ("0/..."), the value it stands for
    assert torch.equal(back["1/layers.1.wq"], sd["01/layers.1.wq"]) and torch.equal(back["0/layers.0.wq"], sd["00/layers.0.wq"])


def test_concat_without_count_is_reported_lost_by_invert():
    spec = spec_of([{"merge": {"from": "{r:int}/w", "over": "r", "to": "w"}}])
    inv = invert(spec)
    assert not inv.lossless and "give `count:`" in inv.lost[0]


def test_same_merges_equal_replicas_and_refuses_different_ones():
    norm = torch.randn(5, generator=g)
    sd = {"0/norm": norm.clone(), "1/norm": norm.clone(), "2/norm": norm.clone()}
    spec = spec_of([{"merge": {"from": "{r:int}/norm", "over": "r", "mode": "same", "to": "norm", "count": 3}}])
    out, report = statemap.map_state_dict(spec, sd)
    assert list(out) == ["norm"] and torch.equal(out["norm"], norm)
    sd["2/norm"][3] += 0.25
    with pytest.raises(
        AssumptionError,
        match=r"replicas '0/norm' and '2/norm' differ \(max abs diff 0\.25; 1 of 5 elements differ, first at index \[3\]\)",
    ):
        statemap.map_state_dict(spec, sd)


def test_same_split_writes_a_tie_group_and_inverts_to_same_merge():
    spec = spec_of([{"split": {"from": "norm", "over": "r", "mode": "same", "count": 2, "to": "{r}/norm"}}])
    w = torch.randn(3, generator=g)
    out = run(spec, {"norm": w})
    assert sorted(out) == ["0/norm", "1/norm"] and all(torch.equal(v, w) for v in out.values())
    from statemap.meta import TensorMeta
    from statemap.plan import make_plan

    assert make_plan(spec, [TensorMeta("norm", (3,), "float32")]).ties == (("0/norm", "1/norm"),)
    inv = invert(spec)
    assert inv.data["rules"][0]["merge"]["mode"] == "same"
    assert torch.equal(run(inv.spec, out)["norm"], w)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_split_stack_and_concat_against_torch(dim):
    x = torch.randn(4, 6, generator=g)
    out = run(spec_of([{"split": {"from": "x", "over": "e", "mode": "stack", "dim": dim, "to": "x.{e}"}}]), {"x": x})
    want = torch.unbind(x, dim)
    assert len(out) == len(want) and all(torch.equal(out[f"x.{e}"], w) for e, w in enumerate(want))
    out = run(spec_of([{"split": {"from": "x", "over": "e", "dim": dim, "count": 2, "to": "x.{e}"}}]), {"x": x})
    want = torch.chunk(x, 2, dim)
    assert all(torch.equal(out[f"x.{e}"], w) for e, w in enumerate(want))
    assert not torch.equal(out["x.0"], out["x.1"])  # the comparison can fail


def test_split_over_inverts_to_merge_over():
    spec = spec_of([{"split": {"from": "l.{i}.gate", "over": "e", "mode": "stack", "to": "l.{i}.e.{e}.w"}}])
    sd = {"l.0.gate": torch.randn(3, 2, 2, generator=g)}
    inv = invert(spec)
    assert inv.lossless and inv.data["rules"][0]["merge"]["from"] == "l.{i}.e.{e:int}.w"
    assert torch.equal(run(inv.spec, run(spec, sd))["l.0.gate"], sd["l.0.gate"])


def test_lint_knows_over():
    spec = spec_of(
        [
            STACK,
            {"split": {"from": "x", "over": "r", "count": 2, "to": "{r}/x"}},
            {"merge": {"from": "{r:int}/n", "over": "r", "mode": "same", "to": "n", "count": 0}},
        ]
    )
    findings = lint(spec)
    codes = [(f.code, f.message) for f in findings]
    assert not any("does not use" in m for _, m in codes), codes  # {e} is joined, not dropped
    assert any(c == "SM108" and "count 0" in m for c, m in codes), codes


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"merge": {"from": "{r:int}/w", "over": "q", "to": "w"}}, r"'over: q' is not a capture of '\{r:int\}/w'"),
        (
            {"merge": {"from": "{r:int}/w", "over": "r", "to": "w.{r}"}},
            r"'to' 'w.\{r\}' uses \{r\}, but the pieces over r become one key",
        ),
        ({"merge": {"from": ["{r:int}/w", "{r}/v"], "over": "r", "to": "w"}}, r"with 'over', 'from' is one pattern"),
        ({"merge": {"from": ["a", "b"], "mode": "same", "to": "w"}}, r"'mode: same' and 'count' go with 'over"),
        ({"merge": {"from": "{r}/w", "over": "r r", "to": "w"}}, r"expected a capture name"),
        ({"merge": {"from": "{r}/w", "over": "r", "mode": "sum", "to": "w"}}, r"'sum' is not one of concat, stack, same"),
        ({"split": {"from": "w", "over": "r", "to": "w"}}, r"'to' 'w' must use \{r\}"),
        ({"split": {"from": "w", "over": "r", "to": ["{r}/a", "{r}/b"], "count": 2}}, r"'to' is one template using \{r\}"),
        ({"split": {"from": "w", "over": "r", "to": "{r}/w"}}, r"split over r with mode concat needs 'count'"),
        ({"split": {"from": "w", "over": "r", "mode": "same", "to": "{r}/w"}}, r"mode same needs 'count'"),
        ({"split": {"from": "{r}/w", "over": "r", "to": "{r}/w", "count": 2}}, r"already a capture"),
        ({"split": {"from": "w", "over": "r", "to": "{r}/w", "count": 2, "sizes": [1, 1]}}, r"'sizes' does not go with 'over'"),
        ({"split": {"from": "w", "to": ["a", "b"], "mode": "stack"}}, r"'mode' and 'count' go with 'over"),
    ],
)
def test_bad_specs(rule, message):
    with pytest.raises(SpecError, match=message):
        spec_of([rule])


@pytest.mark.parametrize(
    "rule, sd, message",
    [
        (STACK, {k: v for k, v in experts(1, 4).items() if ".2." not in k}, r"merging over e: no index 2 \(found 0, 1, 3\)"),
        (
            {"merge": {"from": "{r:int}/w", "over": "r", "to": "w"}},
            {"0/w": torch.ones(2), "00/w": torch.ones(2), "1/w": torch.ones(2)},
            r"merging over r: index 0 twice \(0/w, 00/w\)",
        ),
        (
            {"merge": {"from": "{r}/w", "over": "r", "to": "w"}},
            {"a/w": torch.ones(2)},
            r"'a/w': capture \{r\} = 'a' is not an index",
        ),
        ({**STACK, "merge": {**STACK["merge"], "count": 3}}, experts(1, 4), r"count is 3, but merging over e found 4"),
        (
            {"merge": {"from": "{r:int}/w", "over": "r", "mode": "stack", "to": "w"}},
            {"0/w": torch.ones(2), "1/w": torch.ones(3)},
            r"can't stack shapes \[\[2\], \[3\]\]",
        ),
        (
            {"merge": {"from": "{r:int}/w", "over": "r", "mode": "same", "to": "w"}},
            {"0/w": torch.ones(2), "1/w": torch.ones(3)},
            r"replicas have different shapes",
        ),
        (
            {"split": {"from": "w", "over": "r", "count": 3, "to": "{r}/w"}},
            {"w": torch.ones(4)},
            r"can't split dim 0 of length 4 into 3 equal chunks",
        ),
        (
            {"split": {"from": "w", "over": "r", "mode": "stack", "count": 3, "to": "{r}/w"}},
            {"w": torch.ones(4, 2)},
            r"count is 3, but dim 0 of \[4, 2\] has length 4",
        ),
        ({"split": {"from": "w", "over": "r", "count": "n", "to": "{r}/w"}}, {"w": torch.ones(4)}, r"unknown name 'n'"),
    ],
)
def test_bad_plans(rule, sd, message):
    with pytest.raises(PlanError, match=message):
        run(spec_of([rule]), sd)


# -- a concat's derived reverse never cuts parts it cannot know (GQA: q is wider than k and v) -----

QKV = ["l.{i}.q", "l.{i}.k", "l.{i}.v"]


def _gqa() -> dict:
    return {
        "l.0.q": torch.randn(8, 4, generator=g),
        "l.0.k": torch.randn(2, 4, generator=g),
        "l.0.v": torch.randn(2, 4, generator=g),
    }


def test_list_merge_without_sizes_has_no_derived_reverse():
    """Before: the reverse cut [12, 4] into 4/4/4 and called itself lossless (q=8, k=v=2 came back wrong)."""
    spec = spec_of([{"merge": {"from": QKV, "to": "l.{i}.qkv"}}])
    inv = invert(spec)
    assert not inv.lossless and "give `sizes:`" in inv.lost[0]


def test_list_merge_with_sizes_is_checked_and_reversed_exactly():
    sd = _gqa()
    spec = spec_of([{"merge": {"from": QKV, "to": "l.{i}.qkv", "sizes": ["h*d", "kv*d", "kv*d"]}}], {"h": 4, "kv": 1, "d": 2})
    out = run(spec, sd)
    assert torch.equal(out["l.0.qkv"], torch.cat([sd["l.0.q"], sd["l.0.k"], sd["l.0.v"]]))
    inv = invert(spec)
    assert inv.lossless
    back = run(inv.spec, out)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(PlanError, match=r"parts have lengths \[8, 2, 2\] along dim 0, but 'sizes' says \[4, 4, 4\]"):
        run(spec_of([{"merge": {"from": QKV, "to": "l.{i}.qkv", "sizes": [4, 4, 4]}}]), sd)


def test_list_merge_sizes_equal_is_checked_and_reverses_to_equal_blocks():
    eq = {f"l.0.{p}": torch.randn(3, 4, generator=g) for p in "qkv"}
    spec = spec_of([{"merge": {"from": QKV, "to": "l.{i}.qkv", "sizes": "equal"}}])
    back = run(invert(spec).spec, run(spec, eq))
    assert all(torch.equal(back[k], eq[k]) for k in eq)
    with pytest.raises(PlanError, match=r"parts have lengths \[8, 2, 2\] along dim 0, but 'sizes: equal'"):
        run(spec, _gqa())


def test_concat_over_with_count_refuses_unequal_pieces():
    sd = {"0/w": torch.randn(3, 2, generator=g), "1/w": torch.randn(2, 2, generator=g)}
    spec = spec_of([{"merge": {"from": "{r:int}/w", "over": "r", "to": "w", "count": 2}}])
    with pytest.raises(PlanError, match=r"pieces over r have lengths \[3, 2\] along dim 0; with 'count' they must be equal"):
        run(spec, sd)
    out = run(spec_of([{"merge": {"from": "{r:int}/w", "over": "r", "to": "w"}}]), sd)  # no count: no reverse, fine
    assert torch.equal(out["w"], torch.cat([sd["0/w"], sd["1/w"]]))


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"merge": {"from": QKV, "to": "x", "sizes": [1, 2]}}, r"2 sizes for 3 sources"),
        ({"merge": {"from": QKV, "to": "x", "sizes": "same"}}, r"expected 'equal' or a list"),
        ({"merge": {"from": QKV, "to": "x", "mode": "stack", "sizes": "equal"}}, r"'sizes' goes with a concat of a list"),
        ({"merge": {"from": "{r:int}/w", "over": "r", "to": "w", "sizes": "equal"}}, r"'sizes' goes with a concat of a list"),
    ],
)
def test_bad_merge_sizes(rule, message):
    with pytest.raises(SpecError, match=message):
        spec_of([rule])
