"""Real `fairseq-train` output -> xlmr-/bart-fairseq-to-hf -> transformers, logits equal to fairseq's.

tests/fixtures/fairseq_train/ holds the checkpoint_last.pt files that the fairseq 0.12.2 command line
(fairseq-preprocess + fairseq-train, 12 Adam updates on CPU) wrote, with the full training container
(cfg, optimizer_history, extra_state, last_optimizer_state), and the logits fairseq's own
RobertaModel / BARTModel.from_pretrained computed from those files on fixed tokens (make_fixtures.py
there). Each file is converted with the CLI and with the Python API; the HF model is configured from
the checkpoint's own cfg (as a user would), loaded with strict=True, and its logits are compared with
fairseq's (max abs diff <= 1e-5). fairseq is not needed to run these tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import statemap
from statemap.cli import main

pytestmark = pytest.mark.transformers

FIX = Path(__file__).resolve().parent / "fixtures" / "fairseq_train"
TOL = 1e-5
SPEC = {"xlmr": "xlmr-fairseq-to-hf", "bart": "bart-fairseq-to-hf"}
HF_CLASS = {"xlmr": "XLMRobertaForMaskedLM", "bart": "BartForConditionalGeneration"}
EMBED = {"xlmr": "encoder.sentence_encoder.embed_tokens.weight", "bart": "encoder.embed_tokens.weight"}
# fairseq 0.12's BetterTransformer copies, stored (zero-filled, never trained) directly under encoder `layers.N.`
BT_DUPLICATES = "in_proj_weight in_proj_bias out_proj_weight out_proj_bias fc1_weight fc1_bias fc2_weight fc2_bias".split()


def _ckpt(kind: str, file: str = "checkpoint_last.pt") -> Path:
    return FIX / kind / file


def _hf_config(kind: str) -> Any:
    """The transformers config a user derives from the fairseq checkpoint's own cfg.model."""
    from transformers import BartConfig, XLMRobertaConfig

    with statemap.open_checkpoint(_ckpt(kind)) as ck:
        a = ck.extras["cfg"]["model"]  # fairseq's argparse.Namespace, read back as plain data
        vocab = ck.metas[EMBED[kind]].shape[0]
    assert a["activation_fn"] == "gelu" and a["no_scale_embedding"] and not a["encoder_normalize_before"]
    common = dict(vocab_size=vocab, pad_token_id=1, bos_token_id=0, eos_token_id=2, attn_implementation="eager")
    if kind == "xlmr":
        # fairseq offsets positions by padding_idx + 1 and stores max_positions + 2 rows, as HF does
        return XLMRobertaConfig(hidden_size=a["encoder_embed_dim"], num_hidden_layers=a["encoder_layers"],
                                num_attention_heads=a["encoder_attention_heads"],
                                intermediate_size=a["encoder_ffn_embed_dim"],
                                max_position_embeddings=a["max_positions"] + 2, type_vocab_size=1,
                                layer_norm_eps=1e-5, hidden_act="gelu", **common)  # fmt: skip
    assert a["layernorm_embedding"] and not a["decoder_normalize_before"]
    return BartConfig(d_model=a["encoder_embed_dim"], encoder_layers=a["encoder_layers"], decoder_layers=a["decoder_layers"],
                      encoder_attention_heads=a["encoder_attention_heads"],
                      decoder_attention_heads=a["decoder_attention_heads"], encoder_ffn_dim=a["encoder_ffn_embed_dim"],
                      decoder_ffn_dim=a["decoder_ffn_embed_dim"], max_position_embeddings=a["max_source_positions"],
                      activation_function="gelu", scale_embedding=False, decoder_start_token_id=2, **common)  # fmt: skip


def _diff(kind: str, sd: dict[str, torch.Tensor]) -> float:
    """Max abs difference between the HF model's logits (loaded strict) and fairseq's."""
    import transformers

    model = getattr(transformers, HF_CLASS[kind])(_hf_config(kind)).eval()
    model.load_state_dict(sd, strict=True)
    io = load_file(FIX / kind / "io.safetensors")
    with torch.no_grad():
        if kind == "bart":
            got = model(input_ids=io["src"], decoder_input_ids=io["prev"]).logits
            return (got - io["logits"]).abs().max().item()
        tokens = io["tokens"]
        mask = tokens.ne(1)
        got = model(input_ids=tokens, attention_mask=mask.long()).logits
    # fairseq zeroes the embeddings of pad positions, HF does not: compare real tokens only
    return (got - io["logits"])[mask].abs().max().item()


def _expected_dropped(kind: str) -> list[str]:
    stack = "encoder.sentence_encoder" if kind == "xlmr" else "encoder"
    versions = ["encoder.sentence_encoder.version"] if kind == "xlmr" else ["encoder.version", "decoder.version"]
    return sorted([*versions, *(f"{stack}.layers.{i}.{n}" for i in range(2) for n in BT_DUPLICATES)])


def test_fixture_is_a_full_fairseq_train_container():
    """Not a bare state dict: everything fairseq-train saves, incl. Adam moments; the model is chosen."""
    for kind in SPEC:
        with statemap.open_checkpoint(_ckpt(kind)) as ck:
            assert ck.container == "model"
            assert {"cfg", "optimizer_history", "extra_state", "last_optimizer_state"} <= set(ck.extras)
            assert ck.extras["optimizer_history"][-1]["num_updates"] == 12
            assert ck.extras["cfg"]["model"]["arch"] == {"xlmr": "roberta_base", "bart": "bart_base"}[kind]
            assert ck.extras["last_optimizer_state"]["state"], "the optimizer state is saved"
            # the BetterTransformer copies the specs drop are zero in a trained file: nothing is lost
            for name in _expected_dropped(kind):
                if not name.endswith(".version"):
                    assert not ck.read(name).any(), name


@pytest.mark.parametrize("kind", ["xlmr", "bart"])
def test_cli_apply_matches_fairseq_logits(tmp_path, kind, capsys):
    config = tmp_path / "hf"
    _hf_config(kind).save_pretrained(config)
    out = tmp_path / "out.safetensors"
    argv = [
        "apply",
        SPEC[kind],
        str(_ckpt(kind)),
        str(out),
        "--json",
        "--expect",
        f"hf:{HF_CLASS[kind]}",
        "--config",
        str(config),
        "--tied",
        "clone",  # every name: the check loads with strict=True
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["container"] == "model"
    diff = _diff(kind, load_file(out))
    print(f"{SPEC[kind]} (CLI) on fairseq-train output: max abs diff {diff:.3g}")
    assert diff <= TOL, diff


# checkpoint_stripped.pt: checkpoint_last.pt read by fairseq's load_checkpoint_to_cpu (cfg becomes an
# omegaconf DictConfig), optimizer state deleted, torch.save again -- omegaconf pickles at protocol 2
# (`__builtin__.long`, `__builtin__.dict`, ...), which torch.load(weights_only=True) refuses
@pytest.mark.parametrize("file", ["checkpoint_last.pt", "checkpoint_stripped.pt"])
@pytest.mark.parametrize("kind", ["xlmr", "bart"])
def test_python_api_convert_matches_fairseq_logits(tmp_path, kind, file):
    out = tmp_path / "out.safetensors"
    report = statemap.convert(SPEC[kind], _ckpt(kind, file), out, tied="clone")
    assert report.ok and report.container == "model" and report.passthrough == []
    assert sorted(report.dropped) == _expected_dropped(kind)
    sd = load_file(out)
    diff = _diff(kind, sd)
    print(f"{SPEC[kind]} (API) on {file}: max abs diff {diff:.3g}")
    assert diff <= TOL, diff


@pytest.mark.parametrize("kind", ["xlmr", "bart"])
def test_stripped_checkpoint_holds_omegaconf_at_protocol_2_and_reads_as_data(kind):
    import pickletools
    import zipfile

    with zipfile.ZipFile(_ckpt(kind, "checkpoint_stripped.pt")) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    names = {a for op, a, _ in pickletools.genops(pkl) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    assert pkl[:2] == b"\x80\x02" and {"__builtin__ long", "omegaconf.dictconfig DictConfig"} <= names
    with statemap.open_checkpoint(_ckpt(kind, "checkpoint_stripped.pt")) as ck:
        assert ck.container == "model" and "last_optimizer_state" not in ck.extras
        with statemap.open_checkpoint(_ckpt(kind)) as last:
            assert ck.metas == last.metas
            assert all(ck.read(n).tobytes() == last.read(n).tobytes() for n in ck.metas)


NEGATIVE = {
    # (kind, description, mutation of the converted state dict)
    "xlmr swapped query/key": ("xlmr", ("roberta.encoder.layer.0.attention.self.query.weight",
                                        "roberta.encoder.layer.0.attention.self.key.weight")),
    "bart swapped encoder query/key": ("bart", ("model.encoder.layers.0.self_attn.q_proj.weight",
                                                "model.encoder.layers.0.self_attn.k_proj.weight")),
    "bart swapped cross-attention key/value": ("bart", ("model.decoder.layers.1.encoder_attn.k_proj.weight",
                                                        "model.decoder.layers.1.encoder_attn.v_proj.weight")),
}  # fmt: skip


@pytest.mark.parametrize("case", NEGATIVE, ids=list(NEGATIVE))
def test_negative_a_wrong_mapping_is_caught(tmp_path, case):
    kind, (a, b) = NEGATIVE[case]
    statemap.convert(SPEC[kind], _ckpt(kind), tmp_path / "out.safetensors", tied="clone")
    sd = load_file(tmp_path / "out.safetensors")
    sd[a], sd[b] = sd[b], sd[a]
    diff = _diff(kind, sd)
    print(f"{case}: max abs diff {diff:.3g}")
    assert diff > 1e-3, diff


@pytest.mark.parametrize("kind", ["xlmr", "bart"])
def test_negative_a_perturbed_tensor_is_caught(tmp_path, kind):
    statemap.convert(SPEC[kind], _ckpt(kind), tmp_path / "out.safetensors", tied="clone")
    sd = load_file(tmp_path / "out.safetensors")
    # random, not a constant shift: a post-norm LayerNorm would erase a constant added to an fc2 bias
    name = {"xlmr": "roberta.encoder.layer.1.output.dense.bias", "bart": "model.decoder.layers.0.fc2.bias"}[kind]
    sd[name] = sd[name] + 0.05 * torch.randn(sd[name].shape, generator=torch.Generator().manual_seed(0))
    diff = _diff(kind, sd)
    print(f"{kind} {name} + 0.05 * randn: max abs diff {diff:.3g}")
    assert diff > 1e-3, diff
