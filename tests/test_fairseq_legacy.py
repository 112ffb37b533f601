"""Acceptance 3 of the core issue (seed 000): fused in_proj -> separate q/k/v, proven numerically.

The source weights come from torch.nn.MultiheadAttention, whose state dict uses the legacy
fairseq names (in_proj_weight, in_proj_bias, out_proj.*). The target is run by an
independent separate-projection attention. Equal outputs prove the split is in q, k, v order
and per-head layout is preserved.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import statemap

D, HEADS, VOCAB, POS, FFN = 16, 4, 30, 12, 24


class SeparateAttention(nn.Module):
    """Attention with q/k/v/out projections (HF BART naming), no fusion."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        s = mem.shape[1]
        q = self.q_proj(x).view(b, t, self.h, self.dh).transpose(1, 2)
        k = self.k_proj(mem).view(b, s, self.h, self.dh).transpose(1, 2)
        v = self.v_proj(mem).view(b, s, self.h, self.dh).transpose(1, 2)
        att = (q @ k.transpose(-1, -2) / math.sqrt(self.dh)).softmax(-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, t, d))


def _perturbed(m: nn.Module, g: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # MHA zero-inits its biases
    return m


def _legacy_state(g: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, nn.MultiheadAttention]]:
    sd: dict[str, torch.Tensor] = {}
    mhas: dict[str, nn.MultiheadAttention] = {}
    sd["encoder.embed_tokens.weight"] = torch.randn(VOCAB, D, generator=g)
    sd["encoder.embed_positions.weight"] = torch.randn(POS, D, generator=g)
    sd["decoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"].clone()
    sd["decoder.embed_positions.weight"] = torch.randn(POS, D, generator=g)
    sd["encoder.version"] = torch.tensor([2.0])
    for i in range(2):
        for stack, attns in (("encoder", ["self_attn"]), ("decoder", ["self_attn", "encoder_attn"])):
            for attn in attns:
                mha = _perturbed(nn.MultiheadAttention(D, HEADS, batch_first=True), g)
                mhas[f"{stack}.{i}.{attn}"] = mha
                for k, v in mha.state_dict().items():
                    sd[f"{stack}.layers.{i}.{attn}.{k}"] = v.clone()
            for fc, shape in (("fc1", (FFN, D)), ("fc2", (D, FFN))):
                sd[f"{stack}.layers.{i}.{fc}.weight"] = torch.randn(shape, generator=g)
                sd[f"{stack}.layers.{i}.{fc}.bias"] = torch.randn(shape[0], generator=g)
            norms = (
                ["layer_norms.0", "layer_norms.1"]
                if stack == "encoder"
                else ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"]
            )
            for ln in norms:
                sd[f"{stack}.layers.{i}.{ln}.weight"] = torch.randn(D, generator=g)
                sd[f"{stack}.layers.{i}.{ln}.bias"] = torch.randn(D, generator=g)
    return sd, mhas


def test_legacy_fused_attention_equals_separate_projections(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd, mhas = _legacy_state(g)
    new, report = statemap.map_state_dict("fairseq-legacy-to-hf", sd)
    assert report.passthrough == [] and report.dropped == ["encoder.version"]

    x = torch.randn(2, 5, D, generator=g)
    mem = torch.randn(2, 7, D, generator=g)
    worst = 0.0
    for name, mha in mhas.items():
        stack, i, attn = name.split(".")
        sep = SeparateAttention(D, HEADS)
        prefix = f"model.{stack}.layers.{i}.{attn}."
        sep.load_state_dict({k[len(prefix) :]: v for k, v in new.items() if k.startswith(prefix)}, strict=True)
        kv = mem if attn == "encoder_attn" else x
        with torch.no_grad():
            want, _ = mha(x, kv, kv, need_weights=False)
            got = sep(x, kv)
        worst = max(worst, (want - got).abs().max().item())
    assert worst <= 1e-6, worst

    # the renamed layer norms and embeddings carry the same values
    assert torch.equal(new["model.encoder.layers.1.self_attn_layer_norm.weight"], sd["encoder.layers.1.layer_norms.0.weight"])
    assert torch.equal(new["model.encoder.layers.0.final_layer_norm.bias"], sd["encoder.layers.0.layer_norms.1.bias"])
    assert torch.equal(new["model.shared.weight"], sd["encoder.embed_tokens.weight"])
    assert torch.equal(new["lm_head.weight"], sd["decoder.embed_tokens.weight"])
    assert torch.equal(new["final_logits_bias"], torch.zeros(1, VOCAB))
    assert not any("in_proj" in k or "layer_norms" in k for k in new)


def test_swapped_split_order_is_caught():
    """A spec that writes k before q must fail the numeric check: the test can fail."""
    g = torch.Generator().manual_seed(3)
    mha = _perturbed(nn.MultiheadAttention(D, HEADS, batch_first=True), g)
    sd = {f"a.{k}": v for k, v in mha.state_dict().items()}
    spec = {
        "name": "swapped",
        "version": 1,
        "rules": [
            {"split": {"from": "a.in_proj_weight", "to": ["k_proj.weight", "q_proj.weight", "v_proj.weight"]}},
            {"split": {"from": "a.in_proj_bias", "to": ["k_proj.bias", "q_proj.bias", "v_proj.bias"]}},
            {"rename": "a.out_proj.{p} -> out_proj.{p}"},
        ],
    }
    new, _ = statemap.map_state_dict(spec, sd)
    sep = SeparateAttention(D, HEADS)
    sep.load_state_dict(new, strict=True)
    x = torch.randn(1, 4, D, generator=g)
    with torch.no_grad():
        assert (mha(x, x, x, need_weights=False)[0] - sep(x, x)).abs().max() > 1e-3
