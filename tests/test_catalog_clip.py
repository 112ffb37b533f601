"""CLIP catalog specs, proven against the real libraries.

clip-openai-to-hf: the fixtures in tests/fixtures/clip were written by the real open_clip
(make_fixtures.py there): a tiny OpenAI-layout ViT CLIP saved as a plain state dict and as an
open_clip training checkpoint ({"epoch", "name", "state_dict" with DDP "module." keys,
"optimizer"}), plus fixed inputs and open_clip's outputs on them. Each is converted with the
public API, loaded strictly into transformers' CLIPModel and run on the same inputs.

clip-hf-to-openai: the CLIPModel above is written by `save_pretrained` and converted back; the
result must be the open_clip source state dict, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_compat import features, load_converted
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

import statemap

pytestmark = pytest.mark.transformers

FIX = Path(__file__).resolve().parent / "fixtures" / "clip"
PLAIN = FIX / "openai_state_dict.pt"  # torch.save(model.state_dict())
TRAIN = FIX / "open_clip_epoch_1.pt"  # open_clip_train/main.py checkpoint_dict, DDP-wrapped model
TOL = 1e-5


def _config(**text: object) -> CLIPConfig:
    """The HF config equal to make_fixtures.build(): quick_gelu, eps 1e-5, EOT 99 pooling."""
    common = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text_cfg = dict(common, vocab_size=100, max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=0)
    text_cfg.update(text)
    vision_cfg = dict(common, image_size=32, patch_size=8, num_channels=3)
    if "hidden_act" in text:
        vision_cfg["hidden_act"] = text["hidden_act"]
    return CLIPConfig(projection_dim=8, text_config=text_cfg, vision_config=vision_cfg)


def _hf_model(state: dict[str, torch.Tensor], **text: object) -> CLIPModel:
    return load_converted(CLIPModel, _config(**text), state)


def _io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "io.safetensors")


def _diffs(model: CLIPModel, io: dict[str, torch.Tensor]) -> dict[str, float]:
    pixel_values = io["pixel_values"].float()  # stored as float16; open_clip ran on these float32 values
    with torch.no_grad():
        got = {
            "image_features": features(model.get_image_features(pixel_values=pixel_values)),
            "text_features": features(model.get_text_features(input_ids=io["input_ids"])),
            "logits_per_image": model(input_ids=io["input_ids"], pixel_values=pixel_values).logits_per_image,
        }
    return {k: (v - io[k]).abs().max().item() for k, v in got.items()}


@pytest.mark.parametrize("fixture", [PLAIN, TRAIN], ids=["plain-state-dict", "training-checkpoint"])
def test_openai_to_hf_matches_open_clip_outputs(tmp_path, fixture):
    out = tmp_path / "model.safetensors"
    report = statemap.convert("clip-openai-to-hf", fixture, out)
    if fixture == TRAIN:
        assert report.container == "state_dict" and report.stripped_prefix == "module."
    else:
        assert report.container == "" and report.stripped_prefix == ""
    assert report.passthrough == [] and report.dropped == []
    state = load_file(out)
    assert len(state) == 78
    assert state["logit_scale"].shape == ()  # HF's load_state_dict would also take a [1]: check it here
    # position_ids are non-persistent buffers in transformers 4.57.6: not in the state dict
    assert not any(k.endswith("position_ids") for k in CLIPModel(_config()).state_dict())
    diffs = _diffs(_hf_model(state), _io())
    assert max(diffs.values()) <= TOL, diffs


def test_training_checkpoint_is_the_open_clip_train_container():
    with statemap.open_checkpoint(TRAIN) as ck:
        assert ck.container == "state_dict"
        assert set(ck.extras) == {"epoch", "name", "optimizer"}
        assert ck.extras["epoch"] == 1
        assert len(ck.extras["optimizer"]["param_groups"]) == 2  # gain/bias (wd 0) and the rest
    plain, train = statemap.load_state_dict(PLAIN), statemap.load_state_dict(TRAIN)
    assert list(plain) == list(train)
    assert all(torch.equal(plain[k], train[k]) for k in plain)


def test_projections_are_transposed_and_qkv_split_in_order():
    src = statemap.load_state_dict(PLAIN)
    hf, _ = statemap.map_state_dict("clip-openai-to-hf", src)
    assert torch.equal(hf["text_projection.weight"], src["text_projection"].T)  # [8, 16] from [16, 8]
    assert torch.equal(hf["visual_projection.weight"], src["visual.proj"].T)
    assert hf["logit_scale"].shape == () and torch.equal(hf["logit_scale"], src["logit_scale"])
    w = src["visual.transformer.resblocks.1.attn.in_proj_weight"]
    for n, name in enumerate("qkv"):
        assert torch.equal(hf[f"vision_model.encoder.layers.1.self_attn.{name}_proj.weight"], w[16 * n : 16 * (n + 1)])


def test_comparison_can_fail():
    """Wrong q/k order, wrong activation, or a wrong EOT id each move the outputs far past 1e-5."""
    io = _io()
    good, _ = statemap.map_state_dict("clip-openai-to-hf", statemap.load_state_dict(PLAIN))
    bad = dict(good)  # the split written in k, q, v order for the text tower
    for i in range(2):
        for p in ("weight", "bias"):
            q, k = (f"text_model.encoder.layers.{i}.self_attn.{n}_proj.{p}" for n in "qk")
            bad[q], bad[k] = good[k], good[q]
    d = _diffs(_hf_model(bad), io)
    assert d["text_features"] > 1e-3 and d["image_features"] <= TOL, d

    d = _diffs(_hf_model(good, hidden_act="gelu"), io)
    assert d["image_features"] > 1e-4 and d["text_features"] > 1e-4, d
    d = _diffs(_hf_model(good, eos_token_id=0), io)  # pools at the first pad instead of EOT
    assert d["text_features"] > 1e-3, d


def _hf_save_pretrained(tmp_path: Path) -> Path:
    hf, _ = statemap.map_state_dict("clip-openai-to-hf", statemap.load_state_dict(PLAIN))
    _hf_model(hf).save_pretrained(tmp_path / "hf", safe_serialization=True)
    return tmp_path / "hf" / "model.safetensors"


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_hf_to_openai_round_trip_is_bitwise(tmp_path):
    hf_file = _hf_save_pretrained(tmp_path)
    back = tmp_path / "open_clip.pt"  # torch.save layout, as open_clip / OpenAI checkpoints are stored
    report = statemap.convert("clip-hf-to-openai", hf_file, back)
    assert report.passthrough == [] and report.dropped == []
    got = torch.load(back, weights_only=True)
    want = torch.load(PLAIN, weights_only=True)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and _bits(got[k]) == _bits(v), k

    # checkpoints from transformers < 4.31 still carry the position_ids buffers: dropped
    old = load_file(hf_file)
    old["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    old["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    again, rep = statemap.map_state_dict("clip-hf-to-openai", old)
    assert sorted(rep.dropped) == ["text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"]
    assert set(again) == set(want)
    for k, v in want.items():  # logit_scale is 0-dim: shapes must survive the in-memory path too
        assert again[k].shape == v.shape and _bits(again[k]) == _bits(v), k


def _streaming_openai(tmp: Path) -> tuple[Path, dict]:
    return TRAIN, {}


def _streaming_hf(tmp: Path) -> tuple[Path, dict]:
    return _hf_save_pretrained(tmp), {}


STREAMING_FIXTURES = {"clip-openai-to-hf": _streaming_openai, "clip-hf-to-openai": _streaming_hf}
