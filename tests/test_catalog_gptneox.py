"""GPT-NeoX fused per-head query_key_value <-> separate q / k / v, proven against transformers' own
slicing: GPTNeoXAttention.forward (transformers 4.57.6) is run on the identity matrix and the q, k, v
it hands to the rotary embedding / attention are the reference weights, exactly.

No HF model with separate projections computes what GPTNeoXForCausalLM computes (parallel
residual with two LayerNorms, partial rotary, biased GeLU MLP), so the logits check is the way
back: separate -> fused loads into GPTNeoXForCausalLM with the original logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import statemap
from statemap.errors import StatemapError

TOL = 1e-5


def _model(heads: int, seed: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=64,
        rotary_pct=0.5, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    model = GPTNeoXForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _transformers_qkv(attn: torch.nn.Module, d: int) -> dict[str, torch.Tensor]:
    """The q, k, v weights and biases as GPTNeoXAttention.forward itself slices them."""
    from transformers.models.gpt_neox import modeling_gpt_neox as m

    seen: dict[str, torch.Tensor] = {}
    rope, eager = m.apply_rotary_pos_emb, m.eager_attention_forward

    def capture_qk(q, k, cos, sin, *a, **kw):
        seen["q"], seen["k"] = q, k
        return rope(q, k, cos, sin, *a, **kw)

    def capture_v(module, q, k, v, *a, **kw):
        seen["v"] = v
        return eager(module, q, k, v, *a, **kw)

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        cos = torch.ones(1, x.shape[1], attn.head_size)
        sin = torch.zeros_like(cos)
        with torch.no_grad():
            attn(x, attention_mask=None, position_embeddings=(cos, sin))
        # [1, heads, tokens, head_size] -> [heads*head_size, tokens]: output row r for input token t
        return {n: t[0].permute(0, 2, 1).reshape(d, x.shape[1]) for n, t in seen.items()}

    m.apply_rotary_pos_emb, m.eager_attention_forward = capture_qk, capture_v
    try:
        bias = attn.query_key_value.bias.detach().clone()
        with torch.no_grad():
            attn.query_key_value.bias.zero_()
            w = run(torch.eye(d)[None])  # identity input, no bias: the weight columns, exactly
            attn.query_key_value.bias.copy_(bias)
            b = run(torch.zeros(1, 1, d))  # zero input: the bias
    finally:
        m.apply_rotary_pos_emb, m.eager_attention_forward = rope, eager
    return {f"{n}_proj.weight": w[n] for n in "qkv"} | {f"{n}_proj.bias": b[n][:, 0] for n in "qkv"}


@pytest.mark.parametrize("heads", [4, 2])
def test_fused_to_separate_is_transformers_slicing(tmp_path, heads):
    model = _model(heads, seed=heads)
    model.save_pretrained(tmp_path / "neox")
    statemap.convert("gptneox-fused-to-separate-qkv", tmp_path / "neox", tmp_path / "sep.safetensors")
    sep = load_file(tmp_path / "sep.safetensors")
    for i, layer in enumerate(model.gpt_neox.layers):
        ref = _transformers_qkv(layer.attention, 32)
        for name, want in ref.items():
            got = sep[f"gpt_neox.layers.{i}.attention.{name}"]
            assert got.shape == want.shape and torch.equal(got, want), (i, name)
    assert not any("query_key_value" in k for k in sep)
    assert torch.equal(sep["embed_out.weight"], model.embed_out.weight)

    # back to fused: bitwise the original file, and GPTNeoXForCausalLM's logits are the original's
    statemap.convert("gptneox-separate-to-fused-qkv", tmp_path / "sep.safetensors", tmp_path / "fused.safetensors",
                     vars={"n_heads": heads})  # fmt: skip
    fused, orig = load_file(tmp_path / "fused.safetensors"), load_file(tmp_path / "neox" / "model.safetensors")
    assert sorted(fused) == sorted(orig) and all(torch.equal(fused[k], orig[k]) for k in orig)
    again = _model(heads, seed=99)
    again.load_state_dict(fused, strict=True)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (again(ids).logits - model(ids).logits).abs().max() <= TOL


def test_a_wrong_head_count_is_caught(tmp_path):
    """The same spec with 2 heads assumed on a 4-head model: shapes all fit, the values do not."""
    model = _model(4, seed=4)
    model.save_pretrained(tmp_path / "neox")
    statemap.convert("gptneox-fused-to-separate-qkv", tmp_path / "neox", tmp_path / "sep.safetensors", vars={"n_heads": 2})
    sep = load_file(tmp_path / "sep.safetensors")
    ref = _transformers_qkv(model.gpt_neox.layers[0].attention, 32)
    assert not torch.equal(sep["gpt_neox.layers.0.attention.q_proj.weight"], ref["q_proj.weight"])
    # and a head count that does not divide the rows is refused, showing the arithmetic
    with pytest.raises(StatemapError, match=r"length 96 into h\*three = 5\*3 = 15 parts \(96 % 15 = 6\)"):
        statemap.convert("gptneox-fused-to-separate-qkv", tmp_path / "neox", tmp_path / "x.safetensors", vars={"n_heads": 5})


def _neox_folder(tmp: Path) -> tuple[Path, dict[str, Any]]:
    model = _model(4, seed=5)
    model.save_pretrained(tmp / "neox")
    return tmp / "neox", {"n_heads": 4}  # the in-memory side has no config.json


def _separate_file(tmp: Path) -> tuple[Path, dict[str, Any]]:
    src, _ = _neox_folder(tmp)
    statemap.convert("gptneox-fused-to-separate-qkv", src, tmp / "sep.safetensors")  # n_heads from its config.json
    return tmp / "sep.safetensors", {"n_heads": 4}


STREAMING_FIXTURES = {"gptneox-fused-to-separate-qkv": _neox_folder, "gptneox-separate-to-fused-qkv": _separate_file}
