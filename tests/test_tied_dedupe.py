"""`tied: dedupe`: a tied group is written once, and the REAL transformers loader re-ties it.

Catalog specs whose target is a Hugging Face model write one tensor of each tied group (the name
`_tied_weights_keys` does not list, as `save_pretrained` does) and leave the names the loader
re-ties out of the file (nanoGPT -> HF does so with `tied="dedupe"`). Each case converts a committed fixture written by the real tool (fairseq
0.12.2, nanoGPT's train.py) twice, with the spec's default (dedupe) and with `tied="clone"`, and
checks: the file written once holds fewer bytes; the names left out are all ones HF re-ties; the
kept name is not; `from_pretrained` on a folder with config.json + the deduped model.safetensors
reports no missing key and gives the same logits as the cloned file loaded with strict=True, and
the tool's own logits. Negative: keeping a re-tied name instead of the tie's source gives other
logits (the check can fail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import statemap

FIX = Path(__file__).resolve().parent / "fixtures"
D, HEADS, FFN, LAYERS, MAX_POS = 16, 4, 24, 2, 16  # tests/fixtures/fairseq/make_fixtures.py


def _bart_config(kind: str) -> Any:
    from transformers import BartConfig, MBartConfig

    cls = {"bart": BartConfig, "mbart": MBartConfig}[kind]
    return cls(vocab_size=39, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
               encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
               decoder_ffn_dim=FFN, max_position_embeddings=MAX_POS, activation_function="gelu",
               scale_embedding=(kind == "mbart"), pad_token_id=1, bos_token_id=0, eos_token_id=2,
               decoder_start_token_id=2)  # fmt: skip


def _xlmr_config() -> Any:
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(vocab_size=40, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=FFN, max_position_embeddings=MAX_POS + 2, type_vocab_size=1,
                            layer_norm_eps=1e-5, hidden_act="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2)  # fmt: skip


def _seq2seq_logits(kind: str) -> Any:
    io = load_file(FIX / "fairseq" / "io.safetensors")

    def run(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            got = model(input_ids=io[f"{kind}.src"], decoder_input_ids=io[f"{kind}.prev"]).logits
        return got, io[f"{kind}.logits"]

    return run


def _xlmr_logits(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    io = load_file(FIX / "fairseq" / "io.safetensors")
    tokens, want = io["xlmr.tokens"], io["xlmr.logits"]
    mask = tokens.ne(1)
    with torch.no_grad():
        got = model(input_ids=tokens, attention_mask=mask.long()).logits
    return got[mask], want[mask]  # fairseq zeroes pad embeddings, HF does not: real tokens only


def _gpt2_config() -> Any:
    from transformers import GPT2Config

    args = torch.load(FIX / "gpt2" / "ckpt.pt", weights_only=True)["model_args"]  # a test may torch.load its fixture
    return GPT2Config(n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                      n_positions=args["block_size"], vocab_size=args["vocab_size"], activation_function="gelu",
                      layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip


def _gpt2_logits(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ref = load_file(FIX / "gpt2" / "nano_reference.safetensors")
    with torch.no_grad():
        return model(ref["idx"]).logits, ref["logits"]


CASES = {
    # spec: (source, model class, config, logits fn, kept name, names HF re-ties)
    "bart-fairseq-to-hf": (
        FIX / "fairseq" / "bart.pt", "BartForConditionalGeneration", lambda: _bart_config("bart"), _seq2seq_logits("bart"),
        "model.shared.weight", ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"],
    ),
    "mbart-fairseq-to-hf": (
        FIX / "fairseq" / "mbart.pt", "MBartForConditionalGeneration", lambda: _bart_config("mbart"), _seq2seq_logits("mbart"),
        "model.shared.weight", ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"],
    ),
    "xlmr-fairseq-to-hf": (
        FIX / "fairseq" / "xlmr.pt", "XLMRobertaForMaskedLM", _xlmr_config, _xlmr_logits,
        "roberta.embeddings.word_embeddings.weight", ["lm_head.decoder.weight"],
    ),
    "nanogpt-to-gpt2-hf": (
        FIX / "gpt2" / "ckpt.pt", "GPT2LMHeadModel", _gpt2_config, _gpt2_logits,
        "transformer.wte.weight", ["lm_head.weight"],
    ),
}  # fmt: skip


def _tied_keys(model: Any) -> list[str]:
    """The names HF's loader re-ties (``_tied_weights_keys``, relative to the model or its base;
    transformers 5 lists every tied name of the model and its sub-models in ``all_tied_weights_keys``)."""
    return list(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or [])


def _retied(name: str, model: Any) -> bool:
    return any(name == k or name.endswith("." + k) for k in _tied_keys(model))


@pytest.mark.transformers
@pytest.mark.parametrize("spec", sorted(CASES))
def test_written_once_loads_with_from_pretrained(tmp_path, spec):
    import transformers
    from hf_compat import loading_problems

    src, cls_name, config, logits, kept, retied = CASES[spec]
    cls = getattr(transformers, cls_name)
    once_dir, clone_dir = tmp_path / "once", tmp_path / "clone"
    once_dir.mkdir()
    clone_dir.mkdir()
    # the fairseq -> HF catalog specs write once by default; nanoGPT -> HF keeps `tied: clone`
    # (its own tests load with strict=True) and writes once on request
    assert statemap.load_spec(spec).tied == ("clone" if spec == "nanogpt-to-gpt2-hf" else "dedupe")
    report = statemap.convert(spec, src, once_dir / "model.safetensors", tied="dedupe")
    full = statemap.convert(spec, src, clone_dir / "model.safetensors", tied="clone")
    group = next(g for g in report.written_once if g[0] == kept)
    assert sorted(group[1:]) == sorted(retied)
    assert full.written_once == []

    once, clone = load_file(once_dir / "model.safetensors"), load_file(clone_dir / "model.safetensors")
    assert set(clone) - set(once) == {n for g in report.written_once for n in g[1:]}
    assert report.n_bytes < full.n_bytes
    for k, v in once.items():
        assert torch.equal(v, clone[k]), k

    cfg = config()
    cfg.save_pretrained(once_dir)
    model, info = cls.from_pretrained(once_dir, output_loading_info=True, attn_implementation="eager")
    model.eval()
    assert loading_problems(info) == {}, info
    assert not _retied(kept, model), f"{kept} is a name HF re-ties: it must be the one written"
    for g in report.written_once:
        for name in g[1:]:
            assert _retied(name, model), f"{name} is left out but HF does not re-tie it"

    loaded = model.state_dict()
    for k, v in clone.items():  # every name, re-tied ones included, holds the cloned file's values
        assert torch.equal(loaded[k], v), k
    got, want = logits(model)
    diff = (got - want).abs().max().item()
    print(f"{spec}: written once, from_pretrained vs the tool's logits: max abs diff {diff:.3g}")
    assert diff <= 1e-5, diff


@pytest.mark.transformers
@pytest.mark.parametrize("spec", ["bart-fairseq-to-hf", "nanogpt-to-gpt2-hf"])
def test_negative_an_untied_target_misses_the_names_left_out(tmp_path, spec):
    """The same file for a model configured without tied embeddings: the loader reports the
    names left out as missing (so the check above can fail)."""
    import transformers

    src, cls_name, config, _, _, retied = CASES[spec]
    statemap.convert(spec, src, tmp_path / "model.safetensors", tied="dedupe")
    cfg = config()
    cfg.tie_word_embeddings = False
    cfg.save_pretrained(tmp_path)
    _, info = getattr(transformers, cls_name).from_pretrained(tmp_path, output_loading_info=True)
    assert "lm_head.weight" in info["missing_keys"] and "lm_head.weight" in retied


def test_report_says_what_was_written_once_and_clone_writes_every_name(tmp_path):
    from rich.console import Console

    from statemap.report import render

    r = statemap.convert("bart-fairseq-to-hf", FIX / "fairseq" / "bart.pt", dry_run=True)
    console = Console(record=True, width=400)
    render(r, console)
    text = console.export_text()
    assert (
        "written once: model.shared.weight; re-tied on load: model.encoder.embed_tokens.weight, "
        "model.decoder.embed_tokens.weight, lm_head.weight" in text
    )
    assert r.to_json()["written_once"] == [
        ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"]
    ]
    # targets that load with load_state_dict(strict=True) get every name
    nano = statemap.convert("gpt2-hf-to-nanogpt", FIX / "gpt2" / "hf", tmp_path / "nano.safetensors")
    assert nano.written_once == []
    assert "lm_head.weight" in load_file(tmp_path / "nano.safetensors")
