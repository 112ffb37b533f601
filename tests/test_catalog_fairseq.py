"""fairseq family: xlmr-, bart-, mbart-fairseq-to-hf, proven against REAL fairseq 0.12.2 outputs.

The fixtures in tests/fixtures/fairseq/ were written by fairseq itself (make_fixtures.py there:
Trainer.save_checkpoint, i.e. the container fairseq training writes, with cfg / optimizer state),
together with the fairseq models' outputs on fixed token ids. Each test converts the committed
checkpoint with statemap.convert, loads the result into the transformers model with
load_state_dict(strict=True), and compares its outputs with fairseq's (max abs diff <= 1e-5).
fairseq is not needed to run these tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import statemap

pytestmark = pytest.mark.transformers

FIX = Path(__file__).resolve().parent / "fixtures" / "fairseq"
TOL = 1e-5
D, HEADS, FFN, LAYERS, MAX_POS = 16, 4, 24, 2, 16
# fairseq 0.12's zero-filled BetterTransformer copies, stored directly under encoder `layers.N.`
BT_DUPLICATES = "in_proj_weight in_proj_bias out_proj_weight out_proj_bias fc1_weight fc1_bias fc2_weight fc2_bias".split()


def _io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "io.safetensors")


def _convert(spec: str, src: Path, tmp_path: Path) -> tuple[dict[str, torch.Tensor], statemap.Report]:
    out = tmp_path / f"{spec}.safetensors"
    report = statemap.convert(spec, src, out, tied="clone")  # every name: strict load_state_dict
    return load_file(out), report


# ---------------------------------------------------------------- XLM-R / RoBERTa


def _xlmr(**over):
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    cfg = dict(vocab_size=40, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=FFN, max_position_embeddings=MAX_POS + 2, type_vocab_size=1,
               layer_norm_eps=1e-5, hidden_act="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
               attn_implementation="eager")  # fmt: skip
    cfg.update(over)
    return XLMRobertaForMaskedLM(XLMRobertaConfig(**cfg)).eval()


def _xlmr_diff(model, sd) -> float:
    io = _io()
    tokens, want = io["xlmr.tokens"], io["xlmr.logits"]
    model.load_state_dict(sd, strict=True)
    mask = tokens.ne(1)
    with torch.no_grad():
        got = model(input_ids=tokens, attention_mask=mask.long()).logits
    # fairseq zeroes the embeddings of pad positions, HF does not: compare real tokens only
    return (got - want)[mask].abs().max().item()


def test_xlmr_fairseq_to_hf_matches_fairseq(tmp_path):
    sd, report = _convert("xlmr-fairseq-to-hf", FIX / "xlmr.pt", tmp_path)
    assert report.container == "model" and report.passthrough == []
    bt = [f"encoder.sentence_encoder.layers.{i}.{n}" for i in range(LAYERS) for n in BT_DUPLICATES]
    assert sorted(report.dropped) == sorted(["encoder.sentence_encoder.version", *bt])
    assert torch.equal(sd["roberta.embeddings.token_type_embeddings.weight"], torch.zeros(1, D))
    assert sd["roberta.embeddings.position_embeddings.weight"].shape == (MAX_POS + 2, D)
    assert torch.equal(sd["lm_head.decoder.weight"], sd["roberta.embeddings.word_embeddings.weight"])
    assert torch.equal(sd["lm_head.decoder.bias"], sd["lm_head.bias"])
    diff = _xlmr_diff(_xlmr(), sd)
    print(f"xlmr-fairseq-to-hf max abs diff {diff:.3g}")
    assert diff <= TOL, diff


def test_xlmr_negative_swapped_query_key_is_caught(tmp_path):
    sd, _ = _convert("xlmr-fairseq-to-hf", FIX / "xlmr.pt", tmp_path)
    q, k = "roberta.encoder.layer.0.attention.self.query.weight", "roberta.encoder.layer.0.attention.self.key.weight"
    sd[q], sd[k] = sd[k], sd[q]
    assert _xlmr_diff(_xlmr(), sd) > 1e-3


# ---------------------------------------------------------------- BART / mBART


def _seq2seq(kind: str, **over):
    from transformers import BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration

    config_cls, model_cls = {
        "bart": (BartConfig, BartForConditionalGeneration),
        "mbart": (MBartConfig, MBartForConditionalGeneration),
    }[kind]
    cfg = dict(vocab_size=39, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
               encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
               decoder_ffn_dim=FFN, max_position_embeddings=MAX_POS, activation_function="gelu",
               scale_embedding=(kind == "mbart"), pad_token_id=1, bos_token_id=0, eos_token_id=2,
               decoder_start_token_id=2, attn_implementation="eager")  # fmt: skip
    cfg.update(over)
    return model_cls(config_cls(**cfg)).eval()


def _seq2seq_diff(model, sd, src, prev, want) -> float:
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        got = model(input_ids=src, decoder_input_ids=prev).logits
    return (got - want).abs().max().item()


def _check_seq2seq_keys(sd, report, vocab: int) -> None:
    assert report.container == "model" and report.passthrough == []
    bt = [f"encoder.layers.{i}.{n}" for i in range(LAYERS) for n in BT_DUPLICATES]
    assert sorted(report.dropped) == sorted(["encoder.version", "decoder.version", *bt])
    emb = sd["model.shared.weight"]
    for k in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(sd[k], emb), k  # shared in fairseq (--share-all-embeddings) and tied in HF
    assert torch.equal(sd["final_logits_bias"], torch.zeros(1, vocab))
    assert sd["model.encoder.embed_positions.weight"].shape == (MAX_POS + 2, D)


@pytest.mark.parametrize("kind", ["bart", "mbart"])
def test_seq2seq_fairseq_to_hf_matches_fairseq(tmp_path, kind):
    sd, report = _convert(f"{kind}-fairseq-to-hf", FIX / f"{kind}.pt", tmp_path)
    _check_seq2seq_keys(sd, report, 39)
    assert ("model.encoder.layer_norm.weight" in sd) == (kind == "mbart")
    io = _io()
    diff = _seq2seq_diff(_seq2seq(kind), sd, io[f"{kind}.src"], io[f"{kind}.prev"], io[f"{kind}.logits"])
    print(f"{kind}-fairseq-to-hf max abs diff {diff:.3g}")
    assert diff <= TOL, diff


@pytest.mark.parametrize("kind", ["bart", "mbart"])
def test_seq2seq_negative_wrong_embedding_scale_is_caught(tmp_path, kind):
    sd, _ = _convert(f"{kind}-fairseq-to-hf", FIX / f"{kind}.pt", tmp_path)
    io = _io()
    wrong = _seq2seq(kind, scale_embedding=(kind != "mbart"))
    assert _seq2seq_diff(wrong, sd, io[f"{kind}.src"], io[f"{kind}.prev"], io[f"{kind}.logits"]) > 1e-3


def test_mbart_spec_refuses_a_post_norm_bart_checkpoint(tmp_path):
    with pytest.raises(statemap.PlanError, match="layer_norm"):
        statemap.convert("mbart-fairseq-to-hf", FIX / "bart.pt", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_real_fairseq_checkpoint_reads_as_plain_data():
    """The Trainer's container (cfg with an argparse.Namespace, optimizer state) needs no fairseq."""
    with statemap.open_checkpoint(FIX / "bart.pt") as ck:
        assert ck.container == "model" and len(ck.metas) == 111
        assert ck.extras["cfg"]["model"]["arch"] == "bart_base"
        assert ck.extras["cfg"]["task"]["_name"] == "translation"
    assert "fairseq" not in sys.modules and "omegaconf" not in sys.modules


# ---------------------------------------------------------------- legacy layout vs real fairseq


def test_fairseq_legacy_to_hf_matches_fairseq_upgrade(tmp_path):
    """legacy_bart.pt: BART weights in the legacy layout (fused in_proj, layer_norms.N, torch's
    pre-zip container). fairseq 0.12 loaded it through its own upgrade_state_dict_named into a
    fresh BART; fairseq-legacy-to-hf + HF BART must give the same logits."""
    sd, report = _convert("fairseq-legacy-to-hf", FIX / "legacy_bart.pt", tmp_path)
    assert report.passthrough == [] and sorted(report.dropped) == ["decoder.version", "encoder.version"]
    ref = load_file(FIX / "legacy_bart_ref.safetensors")
    # fairseq's own upgrade of the legacy dict reproduces the modern BART checkpoint exactly
    assert (ref["logits"] - _io()["bart.logits"]).abs().max().item() <= 1e-6
    diff = _seq2seq_diff(_seq2seq("bart"), sd, ref["src"], ref["prev"], ref["logits"])
    print(f"fairseq-legacy-to-hf max abs diff {diff:.3g}")
    assert diff <= TOL, diff


# ---------------------------------------------------------------- streaming fixtures


def _fixture(name: str):
    def fn(tmp_path: Path) -> tuple[Path, dict]:
        return FIX / name, {}

    return fn


STREAMING_FIXTURES = {
    "xlmr-fairseq-to-hf": _fixture("xlmr.pt"),
    "bart-fairseq-to-hf": _fixture("bart.pt"),
    "mbart-fairseq-to-hf": _fixture("mbart.pt"),
}
