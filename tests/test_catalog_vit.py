"""The `vit` family: timm ViT <-> HF ViT, and HF ViT -> HF CLIP vision tower.

Fixtures (tests/fixtures/vit, written by make_fixtures.py with real timm 1.0.31 and
transformers 4.57.6): a perturbed timm VisionTransformer saved by timm's save_for_hf
(model.safetensors), a perturbed HF ViTModel saved by save_pretrained, fixed images, and the
outputs each source model produced on them. Here only transformers runs: the targets are
loaded strict and compared with the sources' recorded outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hf_compat import TF_MAJOR, load_converted, loading_problems, saved_layout
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTForImageClassification, ViTModel

import statemap

pytestmark = pytest.mark.transformers

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "vit"
TIMM = FIX / "timm" / "model.safetensors"
HF_VIT = FIX / "hf_vit" / "model.safetensors"
TOL = 1e-5


def _images() -> torch.Tensor:
    return load_file(FIX / "inputs.safetensors")["pixel_values"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# -- timm -> HF ViT ------------------------------------------------------------------------------


def _hf_vit_config_for_timm(**over) -> ViTConfig:
    args = json.loads((FIX / "timm" / "config.json").read_text())["model_args"]
    d = args["embed_dim"]
    kw = dict(
        hidden_size=d,
        num_hidden_layers=args["depth"],
        num_attention_heads=args["num_heads"],
        intermediate_size=4 * d,  # timm's default mlp_ratio
        image_size=args["img_size"][0],
        patch_size=args["patch_size"],
        num_channels=args["in_chans"],
        num_labels=args["num_classes"],
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )
    kw.update(over)
    return ViTConfig(**kw)


def _timm_to_hf_classifier(tmp_path: Path, spec="vit-timm-to-hf", **config_over) -> ViTForImageClassification:
    out = tmp_path / "hf.safetensors"
    report = statemap.convert(spec, TIMM, out, force=True)
    assert report.passthrough == [] and report.dropped == []
    return load_converted(ViTForImageClassification, _hf_vit_config_for_timm(**config_over), load_file(out))


def test_timm_to_hf_logits_match_timm(tmp_path):
    model = _timm_to_hf_classifier(tmp_path)
    want = load_file(FIX / "timm_outputs.safetensors")
    with torch.no_grad():
        out = model(pixel_values=_images(), output_hidden_states=False)
        feats = model.vit(pixel_values=_images()).last_hidden_state
    assert _max_diff(out.logits, want["logits"]) <= TOL
    assert _max_diff(feats, want["features"]) <= TOL  # timm forward_features: every token, normed


def test_loading_a_converted_state_dict_under_each_transformers_major(tmp_path):
    """What the README says about loading map_state_dict's result: under 4.x
    load_state_dict(strict=True) takes the catalog's ViT output; under 5.x the model's in-memory
    names differ and it refuses them, while from_pretrained(None, config=, state_dict=) loads it
    under both majors (it converts the names as for a saved file)."""
    sd, _ = statemap.map_state_dict("vit-timm-to-hf", statemap.load_state_dict(TIMM))
    cfg = _hf_vit_config_for_timm()
    model = ViTForImageClassification(cfg)
    if TF_MAJOR < 5:
        model.load_state_dict(sd, strict=True)
    else:
        with pytest.raises(RuntimeError, match="Missing key"):
            model.load_state_dict(sd, strict=True)
    model, info = ViTForImageClassification.from_pretrained(None, config=cfg, state_dict=sd, output_loading_info=True)
    assert loading_problems(info) == {}, info
    with torch.no_grad():
        logits = model.eval()(pixel_values=_images()).logits
    assert _max_diff(logits, load_file(FIX / "timm_outputs.safetensors")["logits"]) <= TOL


def test_timm_to_hf_headless_prefix_gives_vit_model(tmp_path):
    """prefix= on a timm model without head.* keys -> ViTModel(add_pooling_layer=False), strict."""
    sd = statemap.load_state_dict(TIMM)
    headless = {k: v for k, v in sd.items() if not k.startswith("head.")}
    new, report = statemap.map_state_dict("vit-timm-to-hf", headless, vars={"prefix": ""})
    assert report.passthrough == []
    model = load_converted(ViTModel, _hf_vit_config_for_timm(), new, add_pooling_layer=False)
    want = load_file(FIX / "timm_outputs.safetensors")
    with torch.no_grad():
        hs = model(pixel_values=_images()).last_hidden_state
    assert _max_diff(hs, want["features"]) <= TOL
    assert _max_diff(hs[:, 0], want["pre_logits"]) <= TOL  # timm pre-logits = normed CLS token


def test_timm_to_hf_negative_checks(tmp_path):
    """The comparison can fail: q/k swapped in the split, or the wrong activation."""
    want = load_file(FIX / "timm_outputs.safetensors")["logits"]
    raw = yaml.safe_load((ROOT / "mappings" / "vit-timm-to-hf.yaml").read_text())
    for rule in raw["rules"]:
        if "split" in rule:
            to = rule["split"]["to"]
            to[0], to[1] = to[1], to[0]
    swapped = _timm_to_hf_classifier(tmp_path, spec=raw)
    with torch.no_grad():
        assert _max_diff(swapped(pixel_values=_images()).logits, want) > 1e-3
    wrong_act = _timm_to_hf_classifier(tmp_path, hidden_act="gelu_new")
    with torch.no_grad():
        assert _max_diff(wrong_act(pixel_values=_images()).logits, want) > TOL


def test_timm_to_hf_to_timm_is_bitwise(tmp_path):
    hf = tmp_path / "hf.safetensors"
    back = tmp_path / "timm.safetensors"
    statemap.convert("vit-timm-to-hf", TIMM, hf)
    report = statemap.convert("vit-hf-to-timm", hf, back)
    assert report.passthrough == [] and report.dropped == []
    src, got = load_file(TIMM), load_file(back)
    assert list(got) == list(src) or set(got) == set(src)
    for k, v in src.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k


def test_hf_vit_model_to_timm_drops_pooler():
    """A ViTModel (pooler, no classifier) maps to a headless timm layout."""
    vit = ViTModel(_hf_vit_config_for_timm())
    new, report = statemap.map_state_dict("vit-hf-to-timm", saved_layout(vit))
    assert set(report.dropped) == {"pooler.dense.weight", "pooler.dense.bias"}
    src = load_file(TIMM)
    assert {k: tuple(v.shape) for k, v in new.items()} == {k: tuple(v.shape) for k, v in src.items() if not k.startswith("head.")}


# -- HF ViT -> HF CLIP vision ----------------------------------------------------------------------


def _clip_config(**over) -> CLIPVisionConfig:
    vc = json.loads((FIX / "hf_vit" / "config.json").read_text())
    kw = dict(
        hidden_size=vc["hidden_size"],
        intermediate_size=vc["intermediate_size"],
        num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"],
        num_channels=vc["num_channels"],
        image_size=vc["image_size"],
        patch_size=vc["patch_size"],
        hidden_act=vc["hidden_act"],  # "gelu", not CLIP's default quick_gelu
        layer_norm_eps=vc["layer_norm_eps"],  # 1e-12, not CLIP's default 1e-5
    )
    kw.update(over)
    return CLIPVisionConfig(**kw)


def _clip_from_fixture(tmp_path: Path, bypass_pre_layrnorm: bool, fold_patch_bias: bool = False, **over):
    out = tmp_path / "clip.safetensors"
    report = statemap.convert("vit-hf-to-clip-vision", HF_VIT, out, force=True)
    assert report.passthrough == []
    assert set(report.dropped) == {"pooler.dense.weight", "pooler.dense.bias", "embeddings.patch_embeddings.projection.bias"}
    sd = load_file(out)
    d = sd["vision_model.embeddings.class_embedding"].shape[0]
    assert torch.equal(sd["vision_model.pre_layrnorm.weight"], torch.ones(d))
    assert torch.equal(sd["vision_model.pre_layrnorm.bias"], torch.zeros(d))
    if fold_patch_bias:  # the exact repair the docs describe; statemap has no add op
        bias = load_file(HF_VIT)["embeddings.patch_embeddings.projection.bias"]
        sd["vision_model.embeddings.position_embedding.weight"][1:] += bias
    model = load_converted(CLIPVisionModel, _clip_config(**over), sd)
    if bypass_pre_layrnorm:
        getattr(model, "vision_model", model).pre_layrnorm = torch.nn.Identity()  # 5.x has no vision_model wrapper
    return model


def _clip_vs_vit(model: CLIPVisionModel, suffix: str) -> tuple[float, float]:
    want = load_file(FIX / "hf_vit_outputs.safetensors")
    with torch.no_grad():
        out = model(pixel_values=_images())
    # CLIP last_hidden_state = encoder output (no final norm); pooler_output = post_layernorm(CLS)
    enc = _max_diff(out.last_hidden_state, want["encoder_output" + suffix])
    cls = _max_diff(out.pooler_output, want["last_hidden_state" + suffix][:, 0])
    return enc, cls


def test_clip_layers_equal_vit_when_patch_bias_is_zero(tmp_path):
    """Every copied weight is exact: with pre_layrnorm bypassed, the CLIP tower equals the ViT
    whose patch bias is zero (the spec drops the bias, so both conversions are the same)."""
    model = _clip_from_fixture(tmp_path, bypass_pre_layrnorm=True)
    enc, cls = _clip_vs_vit(model, "_zero_patch_bias")
    assert enc <= TOL and cls <= TOL, (enc, cls)
    # ... and the dropped bias is a real loss against the ViT as saved
    enc, cls = _clip_vs_vit(model, "")
    assert enc > 1e-3 and cls > 1e-3, (enc, cls)


def test_clip_equals_vit_with_patch_bias_folded_into_positions(tmp_path):
    model = _clip_from_fixture(tmp_path, bypass_pre_layrnorm=True, fold_patch_bias=True)
    enc, cls = _clip_vs_vit(model, "")
    assert enc <= TOL and cls <= TOL, (enc, cls)


def test_clip_tower_as_converted_is_not_the_vit_function(tmp_path):
    """pre_layrnorm (weight 1, bias 0) still normalizes the embeddings: outputs differ."""
    model = _clip_from_fixture(tmp_path, bypass_pre_layrnorm=False, fold_patch_bias=True)
    enc, cls = _clip_vs_vit(model, "")
    assert enc > 1e-2 and cls > 1e-2, (enc, cls)


def test_clip_default_activation_and_eps_differ(tmp_path):
    """CLIP's defaults (quick_gelu, eps 1e-5) are a different function: the config matters."""
    for over in ({"hidden_act": "quick_gelu"}, {"layer_norm_eps": 1e-5}):
        model = _clip_from_fixture(tmp_path, bypass_pre_layrnorm=True, **over)
        enc, cls = _clip_vs_vit(model, "_zero_patch_bias")
        assert enc > TOL and cls > TOL, (over, enc, cls)


# -- streaming fixtures -------------------------------------------------------------------------


def _timm_fixture(tmp: Path):
    return TIMM, {}


def _hf_fixture(tmp: Path):
    out = tmp / "hf-vit-classifier.safetensors"
    statemap.convert("vit-timm-to-hf", TIMM, out)
    return out, {}


def _hf_vit_model_fixture(tmp: Path):
    return HF_VIT, {}


STREAMING_FIXTURES = {
    "vit-timm-to-hf": _timm_fixture,
    "vit-hf-to-timm": _hf_fixture,
    "vit-hf-to-clip-vision": _hf_vit_model_fixture,
}
