"""Real container layouts end to end: an HF folder with sharded safetensors, written by
transformers' own save_pretrained, converts exactly like the single-file checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from hf_compat import loading_problems
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

import statemap

pytestmark = pytest.mark.transformers

FIX = "tests/fixtures/gpt2/hf"


def test_hf_sharded_folder_converts_like_the_single_file(root, tmp_path):
    model = GPT2LMHeadModel.from_pretrained(root / FIX)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3, shards  # really sharded, by transformers itself

    statemap.convert("gpt2-hf-to-nanogpt", sharded, tmp_path / "from_folder.safetensors")
    statemap.convert("gpt2-hf-to-nanogpt", root / FIX / "model.safetensors", tmp_path / "from_file.safetensors")
    a, b = load_file(tmp_path / "from_folder.safetensors"), load_file(tmp_path / "from_file.safetensors")
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sharded_output_loads_with_from_pretrained(root, tmp_path):
    """statemap's own sharded output (index + shards) is read by transformers' from_pretrained."""
    from transformers import GPT2Config

    src = root / "tests/fixtures/gpt2/ckpt.pt"
    with statemap.open_checkpoint(src) as ck:
        args = ck.extras["model_args"]  # nanoGPT's own record of the model's shape
    out = tmp_path / "hf"
    out.mkdir()
    config = GPT2Config(
        n_embd=args["n_embd"],
        n_layer=args["n_layer"],
        n_head=args["n_head"],
        vocab_size=args["vocab_size"],
        n_positions=args["block_size"],
        activation_function="gelu",
        layer_norm_epsilon=1e-5,
    )
    config.save_pretrained(out)
    statemap.convert("nanogpt-to-gpt2-hf", src, out / "model.safetensors", max_shard_size="4KB")
    assert (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()
    model, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert loading_problems(info) == {}, info
    sd = statemap.load_state_dict(out)
    got = model.state_dict()
    assert set(sd) == set(got)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
