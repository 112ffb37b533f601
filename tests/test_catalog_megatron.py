"""Megatron GPT, tensor-parallel rank checkpoints -> HF GPT-2, proven by logits against megatron-core.

Fixture (tests/fixtures/megatron/tp2/, written by make_fixtures.py with megatron-core 0.16.1 on CPU):
mp_rank_00/model_optim_rng.pt and mp_rank_01/model_optim_rng.pt hold the two ranks' state dicts of
megatron-core's own GPTModel (TP=2, fused per-head linear_qkv split by heads, row-parallel
linear_proj / linear_fc2 split by columns, replicated norms and biases) in Megatron-LM's checkpoint
container; reference.safetensors holds input_ids and the TP=2 model's own forward logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import statemap
from statemap.errors import StatemapError

FIX = Path(__file__).resolve().parent / "fixtures" / "megatron" / "tp2"
SPEC = "megatron-gpt-tp-to-gpt2-hf"
TOL = 1e-5


def _gpt2():
    """GPT2Config from the checkpoint's args (hidden 32, 4 heads, 2 layers, ffn 128, vocab 64, 16 positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=128, activation_function="gelu",
        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def _logits(sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    model = _gpt2()
    model.load_state_dict(sd, strict=True)
    ref = load_file(FIX / "reference.safetensors")
    with torch.no_grad():
        return model(ref["input_ids"]).logits, ref["logits"]


def test_megatron_tp2_to_gpt2_logits_equal(tmp_path):
    out = tmp_path / "gpt2.safetensors"
    report = statemap.convert(SPEC, FIX, out)  # the folder: both ranks, args from the checkpoint
    got, want = _logits(load_file(out))
    assert (got - want).abs().max() <= TOL
    assert "mp_rank_01" in str(report)  # the report names the file each key came from


def test_the_pattern_as_input_and_the_in_memory_api(tmp_path):
    out = tmp_path / "gpt2.safetensors"
    statemap.convert(SPEC, str(FIX / "mp_rank_{tp:int}" / "model_optim_rng.pt"), out)  # the pattern itself
    got, want = _logits(load_file(out))
    assert (got - want).abs().max() <= TOL

    ckpts = {f"{r:02d}": torch.load(FIX / f"mp_rank_{r:02d}" / "model_optim_rng.pt", weights_only=False) for r in (0, 1)}
    sds = {r: {k: v for k, v in ck["model"].items() if isinstance(v, torch.Tensor)} for r, ck in ckpts.items()}
    new, report = statemap.map_state_dict(SPEC, sds, vars_from=vars(ckpts["00"]["args"]))  # the args as a mapping
    got, want = _logits(new)
    assert (got - want).abs().max() <= TOL


def test_the_reverse_gives_back_every_rank_tensor(tmp_path):
    """GPT-2 -> ranks with the derived reverse: one file keyed 0/..., 1/..., bitwise the ranks' tensors.
    The vars are given, so the reverse reads no `args` (a GPT-2 file has none)."""
    statemap.convert(SPEC, FIX, tmp_path / "gpt2.safetensors")
    statemap.convert(SPEC, tmp_path / "gpt2.safetensors", tmp_path / "ranks.safetensors", reverse=True,
                     vars={"n_heads": 4, "n_ranks": 2})  # fmt: skip
    back = load_file(tmp_path / "ranks.safetensors")
    want = {
        f"{r}/{k}": v
        for r in (0, 1)
        for k, v in torch.load(FIX / f"mp_rank_{r:02d}" / "model_optim_rng.pt", weights_only=False)["model"].items()
        if isinstance(v, torch.Tensor)
    }
    assert sorted(back) == sorted(want) and all(torch.equal(back[k], want[k]) for k in want)


def _copy_with(tmp: Path, rank: int, edit) -> Path:
    dst = tmp / "ckpt"
    shutil.copytree(FIX, dst)
    path = dst / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
    ck = torch.load(path, weights_only=False)
    edit(ck)
    torch.save(ck, path)
    return dst


def test_diverged_replicas_are_refused_before_writing(tmp_path):
    def bump(ck: dict[str, Any]) -> None:
        ck["model"]["decoder.layers.1.input_layernorm.weight"][3] += 0.5

    src = _copy_with(tmp_path, 1, bump)
    with pytest.raises(
        StatemapError, match=r"replicas '00/decoder\.layers\.1\.input_layernorm\.weight' and '01/.*differ \(max abs diff 0\.5"
    ):
        statemap.convert(SPEC, src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_missing_rank_is_refused(tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(FIX, src)
    shutil.rmtree(src / "mp_rank_01")
    with pytest.raises(StatemapError, match=r"count is 2, but merging over tp found 1"):  # args: 2 ranks
        statemap.convert(SPEC, src, tmp_path / "out.safetensors")


def test_a_wrong_spec_is_caught(tmp_path):
    """Without the per-head reorder every shape still fits GPT-2, but the logits do not."""
    import yaml

    from statemap.catalog import find

    path = find(SPEC)
    assert path is not None
    spec = yaml.safe_load(path.read_text())
    spec["rules"] = [r for r in spec["rules"] if "rearrange" not in r]
    statemap.convert(spec, FIX, tmp_path / "wrong.safetensors")
    got, want = _logits(load_file(tmp_path / "wrong.safetensors"))
    assert (got - want).abs().max() > 100 * TOL


STREAMING_FIXTURES = {SPEC: lambda tmp: (FIX, {"n_heads": 4, "n_ranks": 2})}
