"""Acceptance 1 and 2 of the core issue: the DeltaLM specs on the seed's exact key layout."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from safetensors.torch import load_file
from seed_layouts import deltalm_finetuned, deltalm_pretrained

import statemap

DIMS = dict(d=8, ffn=12, pos=10, enc=12, dec=6)
PRE_VOCAB, VOCAB = 40, 33  # 250104 -> 250001 in the real thing


def _randn(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def _pretrained_ckpt(tmp_path):
    g = torch.Generator().manual_seed(1)
    weights = {k: _randn(s, g) for k, s in deltalm_pretrained(vocab=PRE_VOCAB, **DIMS).items()}
    path = tmp_path / "deltalm-base.pt"
    torch.save({"weights": weights}, path)
    return path, weights


def _expected_source(key: str) -> str | None:
    """Where each fine-tuned key comes from, written from the issue's description of the mapping."""
    if key.endswith(".version"):
        return None
    side, _, rest = key.partition(".")
    emb = "src_embedding" if side == "encoder" else "tgt_embedding"
    if rest == "output_projection.weight":
        return "tgt_embedding.embed_tokens.weight"
    if rest.startswith(("embed_tokens", "embed_positions")):
        return f"{emb}.{rest}"
    if rest.startswith("layernorm_embedding"):
        return f"{emb}.{rest.replace('layernorm_embedding', 'emb_layer_norm')}"
    parts = rest.split(".")  # layers, i, module, ...
    mod = parts[2]
    ffn = {"fc1": "ffn_2.fc1", "fc2": "ffn_2.fc2", "fc3": "ffn_1.fc1", "fc4": "ffn_1.fc2"}
    if mod in ffn:
        new_mod = ("ffn." + mod) if side == "encoder" else ffn[mod]
        return ".".join([side, "layers", parts[1], new_mod, *parts[3:]])
    return key


def test_pretrained_to_fairseq_exact_layout_and_values(tmp_path):
    src, weights = _pretrained_ckpt(tmp_path)
    assert len(weights) == 392
    out = tmp_path / "fairseq.pt"
    report = statemap.convert("deltalm-pretrained-to-fairseq", src, out, vars={"vocab": VOCAB})
    assert report.passthrough == [] and report.container == "weights"

    got = torch.load(out, weights_only=True)
    want = deltalm_finetuned(vocab=VOCAB, **DIMS)
    assert len(got) == 395
    assert {k: tuple(v.shape) for k, v in got.items()} == want
    checked = 0
    for key, tensor in got.items():
        src_key = _expected_source(key)
        if src_key is None:
            assert torch.equal(tensor, torch.tensor([1.0])), key
            continue
        ref = weights[src_key]
        if "embed_tokens" in src_key:
            ref = ref[:VOCAB]
        assert torch.equal(tensor, ref), key
        checked += 1
    assert checked == 393
    # the output projection is the decoder embedding, one storage in the .pt
    assert got["decoder.output_projection.weight"].data_ptr() == got["decoder.embed_tokens.weight"].data_ptr()


def test_vocab_var_must_fit(tmp_path):
    src, _ = _pretrained_ckpt(tmp_path)
    with pytest.raises(statemap.PlanError, match=r"slice \[0:41\] does not fit dim 0 of length 40"):
        statemap.convert("deltalm-pretrained-to-fairseq", src, tmp_path / "o.pt", vars={"vocab": 41})
    assert not (tmp_path / "o.pt").exists()


def _fairseq_ckpt(tmp_path):
    g = torch.Generator().manual_seed(2)
    model = {
        k: (torch.tensor([1.0]) if k.endswith("version") else _randn(s, g))
        for k, s in deltalm_finetuned(vocab=VOCAB, **DIMS).items()
    }
    model["decoder.output_projection.weight"] = model["decoder.embed_tokens.weight"]
    ckpt = {
        "args": argparse.Namespace(arch="deltalm_base", share_all_embeddings=True),
        "model": model,
        "optimizer_history": [{"num_updates": 10}],
        "extra_state": {"epoch": 1},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}},
    }
    path = tmp_path / "checkpoint_best.pt"
    torch.save(ckpt, path)
    return path, model


HF_EXPECTED_EXTRA = {"model.shared.weight", "lm_head.weight", "final_logits_bias"}


def test_fairseq_to_hf_layout_and_values(tmp_path):
    src, model = _fairseq_ckpt(tmp_path)
    out = tmp_path / "model.safetensors"
    report = statemap.convert("deltalm-fairseq-to-hf", src, out, tied="clone")
    assert report.container == "model"
    got = load_file(out)
    want_keys = {f"model.{k}" for k in model if not k.endswith("version") and "output_projection" not in k} | HF_EXPECTED_EXTRA
    assert set(got) == want_keys
    assert len(got) == 395 - 2 - 1 + 3
    assert torch.equal(got["model.shared.weight"], model["encoder.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], model["decoder.output_projection.weight"])
    assert torch.equal(got["final_logits_bias"], torch.zeros(1, VOCAB))
    for k, v in model.items():
        if k.endswith("version") or "output_projection" in k:
            continue
        assert torch.equal(got[f"model.{k}"], v), k
    # the decoder layers keep fc1..fc4 and ffn_layer_norm
    assert "model.decoder.layers.5.fc4.weight" in got and "model.decoder.layers.0.ffn_layer_norm.bias" in got

    # the spec's default (tied: dedupe): each tied group once, under the name HF's loader keeps
    once = statemap.convert("deltalm-fairseq-to-hf", src, tmp_path / "once.safetensors")
    left_out = {n for g in once.written_once for n in g[1:]}
    assert [g[0] for g in once.written_once][:1] == ["model.shared.weight"]
    assert "model.encoder.embed_tokens.weight" in left_out and "lm_head.weight" in left_out
    small = load_file(tmp_path / "once.safetensors")
    assert set(small) == set(got) - left_out and once.n_bytes < report.n_bytes
    for k, v in small.items():
        assert torch.equal(v, got[k]), k


def test_bundled_example_reads_without_omegaconf_and_converts(tmp_path, root):
    """examples/deltalm-tiny.pt pickles a real omegaconf DictConfig; it loads as plain data."""
    ck = statemap.open_checkpoint(root / "examples" / "deltalm-tiny.pt")
    with ck:
        assert ck.container == "model" and len(ck.metas) == 395
        assert ck.extras["cfg"]["task"]["_name"] == "translation"
        assert ck.extras["args"]["arch"] == "deltalm_base"
    assert "omegaconf" not in sys.modules
    report = statemap.convert("deltalm-fairseq-to-hf", root / "examples" / "deltalm-tiny.pt", tmp_path / "hf.safetensors")
    got = load_file(tmp_path / "hf.safetensors")
    src = statemap.load_state_dict(root / "examples" / "deltalm-tiny.pt")
    assert torch.equal(got["model.decoder.layers.3.fc3.weight"], src["decoder.layers.3.fc3.weight"])
    assert len(report.produced) == 395
