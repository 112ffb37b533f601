"""Phi-3 <-> Llama: fused qkv_proj / gate_up_proj <-> separate projections, proven by logits.

Both sides are the real transformers 4.57.6 models (Phi3ForCausalLM, LlamaForCausalLM), built here
from tiny configs with every parameter drawn at random, saved with ``save_pretrained`` (the folder
and its config.json are the spec's input), converted, loaded with ``strict=True``, and run on the
same input_ids.
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
DIMS = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64)
HEADS = [(4, 4), (4, 2)]  # (num_attention_heads, num_key_value_heads): MHA and GQA


def _configs(heads: int, kv: int, tied: bool = False):
    from transformers import LlamaConfig, Phi3Config

    common = dict(
        **DIMS,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Phi3Config(**common, hidden_act="silu"), LlamaConfig(**common, hidden_act="silu")


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) if p.ndim == 1 else 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, DIMS["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("heads", "kv"), HEADS)
@pytest.mark.parametrize("tied", [False, True])
def test_phi3_to_llama_logits_equal(tmp_path, heads, kv, tied):
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    phi_cfg, llama_cfg = _configs(heads, kv, tied)
    phi = _randomized(Phi3ForCausalLM(phi_cfg), seed=heads + kv)
    src = _save(phi, tmp_path / "phi3")
    statemap.convert("phi3-to-llama", src, tmp_path / "llama.safetensors")  # the folder: head counts from its config.json
    llama = LlamaForCausalLM(llama_cfg).eval()
    missing, unexpected = llama.load_state_dict(load_file(tmp_path / "llama.safetensors"), strict=not tied)
    assert not unexpected and missing == (["lm_head.weight"] if tied else [])
    if tied:
        llama.tie_weights()
    diff = (_logits(llama) - _logits(phi)).abs().max()
    assert diff <= TOL, diff

    # back: llama -> phi3 is the original file, bitwise
    statemap.convert("llama-to-phi3", tmp_path / "llama.safetensors", tmp_path / "phi3.safetensors")
    again, orig = load_file(tmp_path / "phi3.safetensors"), load_file(src / "model.safetensors")
    assert sorted(again) == sorted(orig) and all(torch.equal(again[k], orig[k]) for k in orig)


@pytest.mark.parametrize(("heads", "kv"), HEADS)
def test_llama_to_phi3_logits_equal(tmp_path, heads, kv):
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    phi_cfg, llama_cfg = _configs(heads, kv)
    llama = _randomized(LlamaForCausalLM(llama_cfg), seed=10 + heads + kv)
    src = _save(llama, tmp_path / "llama")
    statemap.convert("llama-to-phi3", src, tmp_path / "phi3.safetensors")
    phi = Phi3ForCausalLM(phi_cfg).eval()
    phi.load_state_dict(load_file(tmp_path / "phi3.safetensors"), strict=True)
    diff = (_logits(phi) - _logits(llama)).abs().max()
    assert diff <= TOL, diff
    # the derived reverse of llama-to-phi3 needs the sizes: it is the catalog's phi3-to-llama
    new, _ = statemap.map_state_dict(
        statemap.load_spec("phi3-to-llama", vars={"n_heads": heads, "n_kv_heads": kv, "hidden": 32, "head_dim": 32 // heads}),
        load_file(tmp_path / "phi3.safetensors"),
    )
    orig = load_file(src / "model.safetensors")
    assert sorted(new) == sorted(orig) and all(torch.equal(new[k], orig[k]) for k in orig)
    # and llama-to-phi3's own reverse (its declared inverse: q rows = o_proj's input dim), no vars
    statemap.convert("llama-to-phi3", tmp_path / "phi3.safetensors", tmp_path / "back.safetensors", reverse=True)
    back = load_file(tmp_path / "back.safetensors")
    assert sorted(back) == sorted(orig) and all(torch.equal(back[k], orig[k]) for k in orig)


def test_a_wrong_spec_is_caught(tmp_path):
    """Splitting a GQA qkv_proj as if every head had its own k/v (n_kv_heads = n_heads) is refused;
    swapping gate and up loads but changes the logits."""
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    phi_cfg, llama_cfg = _configs(4, 2)
    phi = _randomized(Phi3ForCausalLM(phi_cfg), seed=7)
    src = _save(phi, tmp_path / "phi3")
    with pytest.raises(StatemapError, match=r"sizes 32 \+ 32 \+ 32 = 96 do not add up to dim 0 of length 64"):
        statemap.convert("phi3-to-llama", src, tmp_path / "x.safetensors", vars={"n_kv_heads": 4})
    import yaml

    from statemap.catalog import find

    path = find("phi3-to-llama")
    assert path is not None
    spec = yaml.safe_load(path.read_text())
    split = spec["rules"][1]["split"]
    split["to"] = list(reversed(split["to"]))  # up first
    spec["config"] = str(src / "config.json")
    statemap.convert(spec, src, tmp_path / "wrong.safetensors")
    llama = LlamaForCausalLM(llama_cfg).eval()
    llama.load_state_dict(load_file(tmp_path / "wrong.safetensors"), strict=True)  # every shape fits
    assert (_logits(llama) - _logits(phi)).abs().max() > 100 * TOL


def _phi3_file(tmp: Path) -> tuple[Path, dict[str, Any]]:
    from transformers import Phi3ForCausalLM

    vars_ = {"n_heads": 4, "n_kv_heads": 2, "hidden": 32, "head_dim": 8}  # the in-memory side has no config.json
    return _save(_randomized(Phi3ForCausalLM(_configs(4, 2)[0]), seed=5), tmp / "phi3"), vars_


def _llama_file(tmp: Path) -> tuple[Path, dict[str, Any]]:
    from transformers import LlamaForCausalLM

    return _save(_randomized(LlamaForCausalLM(_configs(4, 2)[1]), seed=6), tmp / "llama") / "model.safetensors", {}


STREAMING_FIXTURES = {"phi3-to-llama": _phi3_file, "llama-to-phi3": _llama_file}
