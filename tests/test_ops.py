"""Each op's values, checked against torch's own implementation of the same operation."""

from __future__ import annotations

import pytest
import torch

import statemap
from statemap.template import eval_expr, parse_expr, parse_pattern, parse_template


def mapped(rules: list, sd: dict, vars: dict | None = None) -> dict:
    spec = {"name": "t", "version": 1, "rules": rules}
    if vars:
        spec["vars"] = vars
    new, _ = statemap.map_state_dict(spec, sd)
    return new


g = torch.Generator().manual_seed(0)
W = torch.randn(12, 5, generator=g)
T3 = torch.randn(2, 3, 4, generator=g)


@pytest.mark.parametrize(
    "rule, key, expected",
    [
        ({"split": {"from": "w", "to": ["a", "b", "c"]}}, "b", W[4:8]),
        ({"split": {"from": "w", "to": ["a", "b"], "sizes": [2, -1]}}, "b", W[2:]),
        ({"split": {"from": "w", "to": ["a", "b"], "dim": 1, "sizes": [3, 2]}}, "a", W[:, :3]),
        ({"split": {"from": "w", "to": ["a", "b"], "dim": -1, "sizes": ["n", -1]}}, "b", W[:, 1:]),
        ({"transpose": "w"}, "w", W.T),
        ({"transpose": {"from": "t", "dims": [0, 2], "to": "u"}}, "u", T3.transpose(0, 2)),
        ({"permute": {"from": "t", "dims": [2, 0, 1]}}, "t", T3.permute(2, 0, 1)),
        ({"reshape": {"from": "t", "shape": [-1, "2*n"]}}, "t", T3.reshape(-1, 2)),
        ({"reshape": {"from": "t", "shape": [1, {"dim": 0, "of": "w"}, 2]}}, "t", T3.reshape(1, 12, 2)),
        ({"slice": {"from": "w", "start": 1, "stop": "n+6", "step": 2}}, "w", W[1:7:2]),
        ({"slice": {"from": "w", "dim": 1, "stop": 2, "to": "w2"}}, "w2", W[:, :2]),
        ({"pad": {"from": "w", "size": 15, "value": -1.5}}, "w", torch.cat([W, torch.full((3, 5), -1.5)])),
        ({"pad": {"from": "w", "dim": 1, "size": 6}}, "w", torch.cat([W, torch.zeros(12, 1)], 1)),
        ({"cast": {"from": "w", "dtype": "float16"}}, "w", W.half()),
        ({"cast": {"from": "w", "dtype": "bf16"}}, "w", W.bfloat16()),
        ({"cast": {"from": "w", "dtype": "float64"}}, "w", W.double()),
        ({"inject": {"to": "z", "shape": [2, "n"], "value": 3, "dtype": "int64"}}, "z", torch.full((2, 1), 3, dtype=torch.int64)),
        (
            {"inject": {"to": "z", "shape": [1, {"dim": 0, "of": "w"}], "value": 0.5, "dtype": "bfloat16"}},
            "z",
            torch.full((1, 12), 0.5, dtype=torch.bfloat16),
        ),
    ],
)
def test_op_values_match_torch(rule, key, expected):
    new = mapped([rule], {"w": W, "t": T3}, vars={"n": 1})
    assert new[key].dtype == expected.dtype
    assert torch.equal(new[key], expected)


def test_merge_concat_and_stack_match_torch():
    q, k, v = (torch.randn(4, 3, generator=g) for _ in range(3))
    sd = {"h.0.q": q, "h.0.k": k, "h.0.v": v, "h.1.q": q + 1, "h.1.k": k + 1, "h.1.v": v + 1}
    new = mapped([{"merge": {"from": ["h.{i}.q", "h.{i}.k", "h.{i}.v"], "to": "h.{i}.qkv"}}], sd)
    assert torch.equal(new["h.0.qkv"], torch.cat([q, k, v]))
    assert torch.equal(new["h.1.qkv"], torch.cat([q, k, v]) + 1)
    new = mapped([{"merge": {"from": ["h.{i}.q", "h.{i}.k", "h.{i}.v"], "to": "h.{i}.qkv", "mode": "stack", "dim": 1}}], sd)
    assert torch.equal(new["h.1.qkv"], torch.stack([q, k, v], 1) + 1)
    new = mapped([{"merge": {"from": ["h.{i}.q", "h.{i}.k"], "to": "h.{i}.qk", "dim": 1}}, {"drop": "h.{i}.v"}], sd)
    assert torch.equal(new["h.0.qk"], torch.cat([q, k], 1)) and set(new) == {"h.0.qk", "h.1.qk"}


def test_split_then_merge_round_trips_bitwise():
    sd = {"x": torch.randn(9, 2, generator=g).bfloat16()}
    new = mapped([{"split": {"from": "x", "to": ["a", "b", "c"]}}, {"merge": {"from": ["a", "b", "c"], "to": "x"}}], sd)
    assert torch.equal(new["x"].view(torch.int16), sd["x"].view(torch.int16))


def test_bfloat16_cast_rounds_like_torch_including_edge_cases():
    x = torch.tensor([1.0, 1.00390625, 1.01171875, -2.5, 65504.0, 1e-40, float("inf"), float("-inf"), 3.4e38, 0.0, -0.0])
    x = torch.cat([x, torch.randn(10000, generator=g) * 100])
    got = mapped([{"cast": {"from": "x", "dtype": "bfloat16"}}], {"x": x})["x"]
    assert torch.equal(got.view(torch.int16), x.bfloat16().view(torch.int16))
    assert torch.isnan(mapped([{"cast": {"from": "x", "dtype": "bfloat16"}}], {"x": torch.tensor([float("nan")])})["x"]).all()
    back = mapped([{"cast": {"from": "x", "dtype": "float32"}}], {"x": x.bfloat16()})["x"]
    assert torch.equal(back, x.bfloat16().float())


def test_copy_is_independent_and_tie_is_shared():
    sd = {"e": torch.randn(3, 2, generator=g)}
    new = mapped([{"copy": {"from": "e", "to": ["a", "b"]}}], sd)
    assert torch.equal(new["a"], sd["e"]) and new["a"].data_ptr() != new["b"].data_ptr()
    new = mapped([{"tie": {"from": "e", "to": ["a", "b"]}}], sd)
    assert new["a"] is new["b"] and torch.equal(new["a"], sd["e"])


def test_captures_arithmetic_and_pattern_kinds():
    sd = {f"enc.layers.{i}.w": torch.full((1,), float(i)) for i in range(4)}
    sd["enc.extra.bias"] = torch.zeros(1)
    new = mapped(
        [
            {"rename": "enc.layers.{i:int}.w -> dec.layers.{2*i+1}.w"},
            {"rename": "enc.{rest:path} -> x.{rest}"},
        ],
        sd,
    )
    assert {k: v.item() for k, v in new.items() if k.startswith("dec")} == {
        "dec.layers.1.w": 0,
        "dec.layers.3.w": 1,
        "dec.layers.5.w": 2,
        "dec.layers.7.w": 3,
    }
    assert "x.extra.bias" in new
    new = mapped(
        [{"rename": r"re:enc\.layers\.(?P<i>[0-9]+)\.w -> L{i//2}.{i%2}"}], {k: v for k, v in sd.items() if "layers" in k}
    )
    assert {k: v.item() for k, v in new.items()} == {"L0.0": 0, "L0.1": 1, "L1.0": 2, "L1.1": 3}


def test_rules_apply_once_per_key_no_cascade():
    """A suffix rule must not rewrite its own output (lm_head.weight -> lm_lm_head.weight)."""
    new = mapped([{"rename": "{x}_head.weight -> lm_{x}_head.weight"}], {"lm_head.weight": torch.zeros(1)})
    assert set(new) == {"lm_lm_head.weight"}  # applied exactly once, by design of full-match rules
    pat = parse_pattern("layers.{i}.v_proj.weight")
    assert pat.match("layers.0.qkv_proj.weight") is None  # no substring matches
    assert pat.match("layers.0.v_proj.weight") == {"i": "0"}


def test_expression_evaluator():
    env = {"i": "3", "n": 12}
    for src, want in [("i+6", 9), ("2*i+1", 7), ("n-1-i", 8), ("i//2", 1), ("i%2", 1), ("-(i*2)", -6), ("(i+1)*(i+2)", 20)]:
        assert eval_expr(parse_expr(src), env) == want
    assert parse_template("a.{i}.b{{x}}").fill({"i": 2}) == "a.2.b{x}"


def test_passthrough_is_reported_and_strict_refuses():
    sd = {"a": torch.zeros(1), "b": torch.zeros(1)}
    spec = {"name": "t", "version": 1, "rules": [{"rename": "a -> c"}]}
    new, report = statemap.map_state_dict(spec, sd)
    assert report.passthrough == ["b"] and set(new) == {"c", "b"}
    with pytest.raises(statemap.PlanError, match="not accounted for"):
        statemap.map_state_dict({**spec, "strict": True}, sd)


def test_numpy_state_dict_in_numpy_out():
    import numpy as np

    new, _ = statemap.map_state_dict(
        {"name": "t", "version": 1, "rules": [{"transpose": "w"}]}, {"w": np.arange(6, dtype="f4").reshape(2, 3)}
    )
    assert isinstance(new["w"], np.ndarray) and new["w"].tolist() == [[0, 3], [1, 4], [2, 5]]


def test_public_names_resolve_and_are_few():
    import statemap as sm

    assert len(sm.__all__) <= 25
    for name in sm.__all__:
        assert getattr(sm, name) is not None, name
    for name in sm.__all__:
        if callable(getattr(sm, name)) and not isinstance(getattr(sm, name), type) and name != "__version__":
            assert getattr(sm, name).__doc__, f"{name} has no docstring"


def test_view_reinterprets_bits_and_inject_for_makes_one_per_match():
    bits = torch.tensor([1.5, -2.0, 3.25]).bfloat16().view(torch.int16)
    sd = {"bn1._mean": torch.zeros(3), "bn2._mean": torch.ones(4), "w": bits}
    spec = {
        "name": "t",
        "version": 1,
        "strict": True,
        "rules": [
            {"inject": {"for": "{m}._mean", "to": "{m}.num_batches_tracked", "shape": [], "value": 0, "dtype": "int64"}},
            {"inject": {"for": "{m}._mean", "to": "{m}.ones", "shape": [{"dim": 0, "of": "{m}._mean"}], "value": 1}},
            {"rename": "{m}._mean -> {m}.running_mean"},
            {"view": {"from": "w", "dtype": "bfloat16"}},
        ],
    }
    new, report = statemap.map_state_dict(spec, sd)
    assert new["w"].dtype == torch.bfloat16 and new["w"].tolist() == [1.5, -2.0, 3.25]
    assert new["bn1.num_batches_tracked"].shape == () and new["bn1.num_batches_tracked"].dtype == torch.int64
    assert new["bn2.ones"].tolist() == [1.0] * 4 and new["bn1.ones"].shape == (3,)
    assert torch.equal(new["bn2.running_mean"], sd["bn2._mean"]) and report.passthrough == []
    with pytest.raises(
        statemap.PlanError, match=r"can't view float32 \(4 bytes\) as bfloat16 \(2 bytes\): widths differ; use cast"
    ):
        statemap.map_state_dict({"name": "t", "version": 1, "rules": [{"view": {"from": "bn1._mean", "dtype": "bf16"}}]}, sd)
    with pytest.raises(statemap.PlanError, match=r"writes 'bn1.ones', which already exists"):
        statemap.map_state_dict(
            {
                "name": "t",
                "version": 1,
                "rules": [
                    {"inject": {"for": "{m}._mean", "to": "{m}.ones", "shape": [1]}},
                    {"inject": {"for": "{m}._mean", "to": "{m}.ones", "shape": [1]}},
                ],
            },
            sd,
        )


def test_expression_printer_round_trips_precedence():
    from statemap.template import expr_str

    for src in ["2*(i+1)", "2*i+1", "(i-1)//2", "-(i*2)", "n-1-i", "n-(1-i)", "i%(2+j)"]:
        e = parse_expr(src)
        assert parse_expr(expr_str(e)) == e, src
    env = {"i": 5, "j": 1, "n": 9}
    assert eval_expr(parse_expr(expr_str(parse_expr("2*(i+1)"))), env) == 12
