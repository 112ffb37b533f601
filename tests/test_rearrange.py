"""rearrange (einops notation): values against torch view/permute on real tensors, the LLaMA
rotary permute against transformers' own rotary embedding, the derived inverse, and bad inputs."""

from __future__ import annotations

import pytest
import torch

import statemap
from statemap.axes import parse_axes, solve
from statemap.errors import PlanError, SpecError
from statemap.invert import invert
from statemap.spec import load_spec


def spec_of(rules: list, vars: dict | None = None) -> statemap.Spec:
    return load_spec({"name": "t", "version": 1, "vars": vars or {}, "rules": rules})


def mapped(rules: list, sd: dict, vars: dict | None = None) -> dict:
    out, _ = statemap.map_state_dict(spec_of(rules, vars), sd)
    return out


g = torch.Generator().manual_seed(0)
W = torch.randn(24, 5, generator=g)
T4 = torch.randn(2, 3, 4, 5, generator=g)


@pytest.mark.parametrize(
    "pattern, sizes, x, expected",
    [
        ("(h d two) c -> (h two d) c", {"h": 3, "two": 2}, W, W.view(3, 4, 2, 5).permute(0, 2, 1, 3).reshape(24, 5)),
        ("(h three d) c -> (three h d) c", {"h": 2, "three": 3}, W, W.view(2, 3, 4, 5).permute(1, 0, 2, 3).reshape(24, 5)),
        ("a b -> b a", {}, W, W.permute(1, 0)),
        ("(a b) c -> a (c b)", {"a": "n"}, W, W.view(4, 6, 5).permute(0, 2, 1).reshape(4, 30)),
        ("a b c d -> (a d) c b", {}, T4, T4.permute(0, 3, 2, 1).reshape(10, 4, 3)),
        ("a b c d -> a 1 (b c) d", {}, T4, T4.reshape(2, 1, 12, 5)),
        ("(h d) c -> h d c", {"d": {"dim": 0, "of": "k"}}, W, W.view(4, 6, 5)),
        ("(h d) c -> h d c", {"h": "n_heads // 2"}, W, W.view(2, 12, 5)),
    ],
)
def test_values_match_torch(pattern, sizes, x, expected):
    sd = {"x": x, "k": torch.zeros(6)}
    out = mapped([{"rearrange": {"from": "x", "to": "y", "pattern": pattern, "sizes": sizes}}], sd, {"n": 4, "n_heads": 4})
    assert out["y"].shape == expected.shape
    assert torch.equal(out["y"], expected)


def test_a_wrong_pattern_gives_other_values():
    """The comparison can fail: swapping the group order is a different layout."""
    out = mapped([{"rearrange": {"from": "x", "pattern": "(h two d) c -> (h d two) c", "sizes": {"h": 3, "two": 2}}}], {"x": W})
    hf = W.view(3, 4, 2, 5).transpose(1, 2).reshape(24, 5)
    assert out["x"].shape == hf.shape and not torch.equal(out["x"], hf)


def test_compiles_to_reshape_permute_reshape_and_skips_no_ops():
    from statemap.meta import TensorMeta
    from statemap.plan import make_plan

    spec = spec_of([{"rearrange": {"from": "x", "pattern": "(h d two) c -> (h two d) c", "sizes": {"h": 3, "two": 2}}}])
    node = make_plan(spec, [TensorMeta("x", (24, 5), "float32")]).outputs[0].node
    assert [node.kind, node.inputs[0].kind, node.inputs[0].inputs[0].kind] == ["reshape", "permute", "reshape"]
    spec = spec_of([{"rearrange": {"from": "x", "pattern": "a b -> b a"}}])
    node = make_plan(spec, [TensorMeta("x", (24, 5), "float32")]).outputs[0].node
    assert node.kind == "permute" and node.inputs[0].kind == "source"


def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The permute of transformers' convert_llama_weights_to_hf.py (Meta -> HF q/k rows)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


@pytest.mark.parametrize("heads, head_dim, hidden", [(4, 8, 32), (2, 16, 24), (8, 2, 16)])
def test_llama_rotary_permute_is_one_rule(heads, head_dim, hidden):
    w = torch.randn(heads * head_dim, hidden, generator=g)
    rule = {
        "rearrange": {
            "from": "layers.{i}.attention.wq.weight",
            "to": "model.layers.{i}.self_attn.q_proj.weight",
            "pattern": "(h d two) c -> (h two d) c",
            "sizes": {"h": "n_heads", "two": 2},
        }
    }
    out = mapped([rule], {"layers.0.attention.wq.weight": w}, {"n_heads": heads})
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], _hf_permute(w, heads))


def test_rotary_layouts_agree_through_transformers_rotary_embedding():
    """Meta's interleaved rotary on the Meta weight == transformers' LLaMA rotary (rotate_half) on the
    rearranged weight: the rule's direction is the one the HF model needs (and the reverse is not)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    heads, head_dim, hidden, seq = 4, 8, 32, 5
    cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=16)
    wq = torch.randn(heads * head_dim, hidden, generator=g, dtype=torch.float64)
    x = torch.randn(1, seq, hidden, generator=g, dtype=torch.float64)
    pos = torch.arange(seq)[None]

    # Meta (llama-models): q viewed as complex pairs (interleaved), times exp(i * pos * freq)
    q = (x @ wq.T).view(1, seq, heads, head_dim)
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    cis = torch.polar(
        torch.ones(seq, head_dim // 2, dtype=torch.float64), torch.outer(torch.arange(seq, dtype=torch.float64), freqs)
    )
    meta = torch.view_as_real(torch.view_as_complex(q.reshape(1, seq, heads, head_dim // 2, 2)) * cis[None, :, None]).flatten(3)

    rule = {"rearrange": {"from": "wq", "pattern": "(h d two) c -> (h two d) c", "sizes": {"h": heads, "two": 2}}}
    rot = LlamaRotaryEmbedding(cfg)

    def hf_q(w: torch.Tensor) -> torch.Tensor:
        qh = (x @ w.T).view(1, seq, heads, head_dim).transpose(1, 2)
        cos, sin = rot(qh.float(), pos)
        out, _ = apply_rotary_pos_emb(qh, qh, cos.double(), sin.double())
        return out.transpose(1, 2)

    hf = hf_q(mapped([rule], {"wq": wq})["wq"])
    # HF's rows are (two d) per head, Meta's (d two): compare after putting Meta's output in HF order
    meta_hf_order = meta.view(1, seq, heads, head_dim // 2, 2).transpose(3, 4).reshape(1, seq, heads, head_dim)
    torch.testing.assert_close(hf, meta_hf_order, rtol=0, atol=1e-6)
    wrong = {"rearrange": {**rule["rearrange"], "pattern": "(h two d) c -> (h d two) c"}}
    assert not torch.allclose(hf_q(mapped([wrong], {"wq": wq})["wq"]), meta_hf_order, atol=1e-3)


def test_inverse_swaps_the_sides_and_restores_the_values():
    spec = spec_of(
        [
            {
                "rearrange": {
                    "from": "layers.{i}.wq",
                    "to": "model.layers.{i}.q",
                    "pattern": "(h d two) c -> (h two d) c",
                    "sizes": {"h": "n", "two": 2},
                }
            }
        ],
        {"n": 3},
    )
    inv = invert(spec)
    assert inv.lossless
    (rule,) = inv.data["rules"]
    assert rule["rearrange"]["pattern"] == "(h two d) c -> (h d two) c"
    assert rule["rearrange"]["from"] == "model.layers.{i}.q" and rule["rearrange"]["to"] == "layers.{i}.wq"
    sd = {"layers.0.wq": W, "layers.1.wq": W * 2}
    fwd, _ = statemap.map_state_dict(spec, sd)
    back, _ = statemap.map_state_dict(inv.spec, fwd)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("(h d two) c", r"needs exactly one '->'"),
        ("a -> b -> c", r"needs exactly one '->'"),
        ("a [ -> a", r"unexpected '\[' at position 2 of 'a \[ -> a'"),
        ("(a (b)) c -> a b c", r"nested '\(' at position 3"),
        ("a b) -> a b", r"unmatched '\)' at position 3"),
        ("(a b -> a b", r"unclosed '\('"),
        ("a ... -> a", r"'\.\.\.' at position 2 .* not supported"),
        ("a 2 -> a", r"anonymous axis 2 at position 2"),
        ("a a -> a", r"axis 'a' appears twice on one side"),
        ("a b -> a", r"both sides name the same axes \(b only on the left\)"),
        ("a -> a c", r"c only on the right"),
        (" -> a", r"empty side"),
    ],
)
def test_bad_patterns(pattern, message):
    with pytest.raises(SpecError, match=message):
        spec_of([{"rearrange": {"from": "x", "pattern": pattern}}])


@pytest.mark.parametrize(
    "rule, error, message",
    [
        ({"pattern": "(h d) c -> h d c", "sizes": {"x": 2}}, SpecError, r"sizes name 'x', not an axis of '\(h d\) c -> h d c'"),
        ({"pattern": "(h d) c -> h d c", "sizes": {"h": True}}, SpecError, r"axis 'h': expected an integer"),
        ({"pattern": "(h d) c -> h d c", "sizes": "h=2"}, SpecError, r"expected a mapping of axis: size"),
        ({"pattern": 3}, SpecError, r"an axis pattern is text"),
        (
            {"pattern": "(h d two) c -> (h two d) c", "sizes": {"h": 5, "two": 2}},
            PlanError,
            r"can't divide dim 0 \(h d two\) of length 24 into h\*two = 5\*2 = 10 parts \(24 % 10 = 4\)",
        ),
        ({"pattern": "(h d) c -> h d c", "sizes": {"h": 5}}, PlanError, r"into h=5 parts \(24 % 5 = 4\)"),
        ({"pattern": "(h d) c -> h d c"}, PlanError, r"can't infer both h and d"),
        (
            {"pattern": "(h d) c -> h d c", "sizes": {"h": 4, "d": 4}},
            PlanError,
            r"dim 0 \(h d\) of length 24 does not match h\*d = 4\*4 = 16",
        ),
        ({"pattern": "a b c -> c b a"}, PlanError, r"the left side 'a b c' has 3 dims, but the tensor has shape \[24, 5\]"),
        ({"pattern": "(h d) c -> h d c", "sizes": {"h": 0}}, PlanError, r"h=0: sizes must be positive"),
        ({"pattern": "(h d) c -> h d c", "sizes": {"h": "nope"}}, PlanError, r"unknown name 'nope'"),
        (
            {"pattern": "(h d) c -> h d c", "sizes": {"h": {"dim": 3, "of": "x"}}},
            PlanError,
            r"'x' has shape \[24, 5\]; it has no dim 3",
        ),
    ],
)
def test_bad_rules(rule, error, message):
    with pytest.raises(error, match=message):
        mapped([{"rearrange": {"from": "x", **rule}}], {"x": W})


def test_parser_is_apart_from_meaning():
    pat = parse_axes("(h d two) c -> (h two d) c")
    assert pat.left.dims == (("h", "d", "two"), ("c",)) and pat.right.axes == ("h", "two", "d", "c")
    assert pat.inverse().inverse() == pat
    steps = solve(pat, (24, 5), {"h": 3, "two": 2})
    assert steps.split == (3, 4, 2, 5) and steps.perm == (0, 2, 1, 3) and steps.out == (24, 5)
