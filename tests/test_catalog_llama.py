"""LLaMA family: Meta's consolidated.NN.pth (+ params.json) <-> Hugging Face LlamaForCausalLM.

Proofs against real implementations (fixtures written by them, see the make_fixtures.py headers):
- tests/fixtures/llama_mp/{gqa,mha}/meta/: 2-rank model-parallel checkpoints, split by fairscale's
  own parallel layers inside llama-models' Transformer (gqa: Llama 3 layout, n_kv_heads 2,
  VocabParallelEmbedding; mha: Llama 2 layout, no n_kv_heads, ParallelEmbedding);
  hf/: transformers 4.44.2's convert_llama_weights_to_hf of the two shard files;
  torchtune_hf.safetensors: torchtune's meta_to_tune + tune_to_hf of the consolidated weights;
  reference.safetensors: llama-models' Transformer logits, run model-parallel on 2 ranks.
- tests/fixtures/llama/: a single-file GQA checkpoint and transformers 4.44.2's conversion of it.
Here only statemap, torch and transformers 4.57.6 (LlamaForCausalLM) run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import statemap
from statemap.errors import StatemapError

FIX = Path(__file__).resolve().parent / "fixtures" / "llama_mp"
SINGLE = Path(__file__).resolve().parent / "fixtures" / "llama"
TOL = 1e-5
# Llama 2's ParallelEmbedding splits the embedding dim; Llama 3's VocabParallelEmbedding the vocab (default)
VARS = {"gqa": {}, "mha": {"embed_shard_dim": 1}}


def _convert(src: Path | str, tmp_path: Path, spec: Any = "llama-meta-to-hf", **vars_: Any) -> dict[str, torch.Tensor]:
    out = tmp_path / "out.safetensors"
    statemap.convert(spec, src, out, vars=vars_ or None)
    return load_file(str(out))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _logits_diff(name: str, sd: dict[str, torch.Tensor]) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_pretrained(FIX / name / "hf")).float().eval()
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    ref = load_file(str(FIX / name / "reference.safetensors"))
    with torch.no_grad():
        return (model(ref["input_ids"]).logits - ref["logits"]).abs().max().item()


def _spec_without(op: str, key_part: str) -> dict[str, Any]:
    """The catalog spec as a dict, minus the rules of `op` whose source contains key_part."""
    import yaml

    from statemap.catalog import find

    path = find("llama-meta-to-hf")
    assert path is not None
    d = yaml.safe_load(path.read_text())
    rules = [r for r in d["rules"] if not (op in r and key_part in str(r[op].get("from", "")))]
    assert len(rules) < len(d["rules"])
    return {**d, "rules": rules}


# ------------------------------------------------------------------------------------------------
# Meta -> HF


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_shards_convert_bitwise_equal_to_transformers_and_torchtune(tmp_path, name):
    out = _convert(FIX / name / "meta", tmp_path, **VARS[name])
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    assert _same(out, load_file(str(FIX / name / "hf" / "model.safetensors")))  # transformers, from the 2 shards
    assert _same(out, load_file(str(FIX / name / "torchtune_hf.safetensors")))  # torchtune, from the consolidated dict


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_logits_equal_meta_reference_model_parallel(tmp_path, name):
    assert _logits_diff(name, _convert(FIX / name / "meta", tmp_path, **VARS[name])) <= TOL


def test_single_file_bitwise_equal_to_transformers(tmp_path):
    out = _convert(SINGLE / "meta", tmp_path)
    assert _same(out, load_file(str(SINGLE / "hf" / "model.safetensors")))


def test_cli_pattern_input_and_report_names_the_file(tmp_path, capsys):
    from statemap.cli import main

    src = FIX / "gqa" / "meta" / "consolidated.{rank:int}.pth"
    out = tmp_path / "hf.safetensors"
    assert main(["apply", "llama-meta-to-hf", str(src), str(out), "--json"]) == 0
    report = capsys.readouterr().out
    assert "consolidated.01.pth" in report
    assert _same(load_file(str(out)), load_file(str(FIX / "gqa" / "hf" / "model.safetensors")))


# ------------------------------------------------------------------------------------------------
# a wrong spec or a broken checkpoint is caught


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_without_the_rotary_permute_the_comparisons_fail(tmp_path, name):
    spec = _spec_without("rearrange", "proj")
    out = _convert(FIX / name / "meta", tmp_path, spec=spec, **VARS[name])
    ref = load_file(str(FIX / name / "hf" / "model.safetensors"))
    assert not _same(out, ref)
    assert {k for k in out if not torch.equal(out[k], ref[k])} == {
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qk"
    }
    assert _logits_diff(name, out) > 1e-2


def test_a_wrong_head_count_is_caught_by_the_logits(tmp_path):
    out = _convert(FIX / "mha" / "meta", tmp_path, n_heads=2, embed_shard_dim=1)  # still divides: no error
    assert not _same(out, load_file(str(FIX / "mha" / "hf" / "model.safetensors")))
    assert _logits_diff("mha", out) > 1e-2


def test_a_wrong_kv_head_count_is_refused(tmp_path):
    with pytest.raises(StatemapError, match="k_proj"):
        _convert(FIX / "gqa" / "meta", tmp_path, n_kv_heads=4)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name, wrong", [("gqa", 1), ("mha", 0)])
def test_the_wrong_embedding_shard_dim_is_refused(tmp_path, name, wrong):
    with pytest.raises(StatemapError, match="embed_shard_dim"):
        _convert(FIX / name / "meta", tmp_path, embed_shard_dim=wrong)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("missing", ["consolidated.00.pth", "consolidated.01.pth"])
def test_a_missing_shard_is_a_clear_error(tmp_path, missing):
    src = tmp_path / "meta"
    shutil.copytree(FIX / "gqa" / "meta", src)
    (src / missing).unlink()
    with pytest.raises(StatemapError) as e:
        _convert(src, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and ("rank" in msg or "shard" in msg), msg
    assert not (tmp_path / "out.safetensors").exists()


def test_replicated_norms_that_differ_are_refused(tmp_path):
    src = tmp_path / "meta"
    shutil.copytree(FIX / "gqa" / "meta", src)
    sd = torch.load(src / "consolidated.01.pth", weights_only=True)  # the test's own file
    sd["layers.1.ffn_norm.weight"] = sd["layers.1.ffn_norm.weight"] + 1
    torch.save(sd, src / "consolidated.01.pth")
    with pytest.raises(StatemapError, match="ffn_norm"):
        _convert(src, tmp_path)
    assert not (tmp_path / "out.safetensors").exists()


def test_params_json_without_n_kv_heads_defaults_to_n_heads():
    params = json.loads((FIX / "mha" / "meta" / "params.json").read_text())
    assert "n_kv_heads" not in params  # the fixture is the case; the bitwise test above proves the default


# ------------------------------------------------------------------------------------------------
# HF -> Meta (single consolidated.00.pth)


def test_hf_to_meta_restores_meta_bitwise(tmp_path):
    """transformers' own conversion of the single-file fixture, back to Meta's layout: the original file."""
    out = tmp_path / "consolidated.00.pth"
    report = statemap.convert("llama-hf-to-meta", SINGLE / "hf", out)  # head counts from the folder's config.json
    assert report.ok
    back = statemap.load_state_dict(out)
    orig = torch.load(SINGLE / "meta" / "consolidated.00.pth", weights_only=True)
    assert _same(dict(back), orig)


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_meta_shards_to_hf_to_meta_single_file_equals_reference(tmp_path, name):
    """shards -> HF -> one consolidated file, then -> HF again: the transformers reference each time."""
    meta = tmp_path / "meta"
    meta.mkdir()
    statemap.convert("llama-hf-to-meta", FIX / name / "hf", meta / "consolidated.00.pth")
    shutil.copyfile(FIX / name / "meta" / "params.json", meta / "params.json")
    assert _same(_convert(meta, tmp_path), load_file(str(FIX / name / "hf" / "model.safetensors")))  # one rank: either embed dim


def test_hf_to_meta_ties_output_to_the_embedding_when_lm_head_is_absent():
    """tie_word_embeddings models (Llama 3.2 1B / 3B) save no lm_head.weight: output.weight is the embedding."""
    sd = load_file(str(SINGLE / "hf" / "model.safetensors"))
    del sd["lm_head.weight"]
    out, _ = statemap.map_state_dict(statemap.load_spec("llama-hf-to-meta", vars={"dim": 32, "n_heads": 4, "n_kv_heads": 2}), sd)
    assert torch.equal(out["output.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(out["tok_embeddings.weight"], sd["model.embed_tokens.weight"])
    assert len(out) == len(sd) + 1  # every key renamed, plus output.weight


STREAMING_FIXTURES = {
    "llama-meta-to-hf": lambda tmp: (FIX / "gqa" / "meta", {"dim": 32, "n_heads": 4, "n_kv_heads": 2}),
    "llama-hf-to-meta": lambda tmp: (SINGLE / "hf" / "model.safetensors", {"dim": 32, "n_heads": 4, "n_kv_heads": 2}),
}
