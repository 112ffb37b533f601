"""Catalog family `paddle`: Paddle .pdparams -> torch layouts, proven against Paddle's own outputs.

Fixtures (tests/fixtures/paddle/, written by make_fixtures.py with paddlepaddle 3.3.1): real
``paddle.save`` state dicts of a tiny ViT built from Paddle layers and of a Conv2D + BatchNorm2D
stack, the fixed inputs, and Paddle's outputs on them. CI has no Paddle: these tests read the
.pdparams with statemap alone and run the converted weights in transformers / torch.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hf_compat import load_converted, saved_layout
from safetensors.torch import load_file
from torch import nn

import statemap

HERE = Path(__file__).resolve().parent
FIX = HERE / "fixtures" / "paddle"
VIT = FIX / "vit.pdparams"
CONVBN = FIX / "convbn.pdparams"
REF = np.load(FIX / "reference.npz")
PIXELS = torch.from_numpy(REF["pixel_values"])

pytestmark = pytest.mark.transformers


def _vit_config(**overrides: Any):
    from transformers import ViTConfig

    kw = dict(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",  # Paddle F.gelu: exact (erf) GELU
        layer_norm_eps=1e-5,  # paddle.nn.LayerNorm default (HF ViTConfig default: 1e-12)
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
        num_labels=10,
    )
    kw.update(overrides)
    return ViTConfig(**kw)


def _hf_vit_logits(state: dict[str, torch.Tensor], **overrides: Any) -> torch.Tensor:
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    with torch.device("meta"):
        saved = set(saved_layout(ViTForImageClassification(_vit_config(**overrides))))
    assert set(state) == saved, set(state) ^ saved  # exactly the names save_pretrained writes
    model = load_converted(ViTForImageClassification, _vit_config(**overrides), state)
    with torch.no_grad():
        return model(pixel_values=PIXELS).logits


def _convbn_torch() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    )


def _diff(got: torch.Tensor, want: np.ndarray) -> float:
    assert tuple(got.shape) == want.shape
    return (got - torch.from_numpy(want)).abs().max().item()


# -- vit-paddle-to-torch -------------------------------------------------------------------


def test_vit_pdparams_to_hf_matches_paddle_logits(tmp_path):
    out = tmp_path / "out.safetensors"
    report = statemap.convert("vit-paddle-to-torch", VIT, out)
    assert report.passthrough == [] and report.dropped == []
    state = load_file(str(out))
    src = statemap.load_state_dict(VIT)
    # Paddle Linear [in, out] became torch [out, in]; Conv2D moved unchanged
    assert torch.equal(state["vit.encoder.layer.1.intermediate.dense.weight"], src["encoder.layers.1.linear1.weight"].T)
    assert state["vit.encoder.layer.1.intermediate.dense.weight"].shape == (64, 32)
    assert torch.equal(state["vit.embeddings.patch_embeddings.projection.weight"], src["patch_embedding.patch_embedding.weight"])

    diff = _diff(_hf_vit_logits(state), REF["vit_logits"])
    print(f"vit-paddle-to-torch: max abs diff vs Paddle logits = {diff:.3e}")
    assert diff <= 1e-5, diff


def test_bf16_vit_pdparams_converts_to_bf16_weights_not_integers(tmp_path):
    """paddle.save writes bf16 parameters as uint16 bits: they must come out as those bf16 values."""
    src = FIX / "vit_bf16.pdparams"
    with statemap.open_checkpoint(src) as ck:
        assert {m.dtype for m in ck.metas.values()} == {"uint16"}  # what Paddle really wrote
        raw = {k: ck.read(k) for k in ck.metas}
    out = tmp_path / "out.safetensors"
    statemap.convert("vit-paddle-to-torch", src, out)
    state = load_file(str(out))
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    cls = state["vit.embeddings.cls_token"]
    assert np.array_equal(cls.view(torch.int16).numpy().view(np.uint16), raw["patch_embedding.cls_token"])  # same bits
    assert cls.abs().max().item() < 10  # values, not integer-valued bit patterns (~1.6e4)
    fp32 = {k: v.float() for k, v in state.items()}
    diff = _diff(_hf_vit_logits(fp32), np.load(FIX / "reference_bf16.npz")["vit_logits"])
    print(f"vit-paddle-to-torch bf16: max abs diff vs Paddle logits = {diff:.3e}")
    assert diff <= 1e-5, diff
    # the comparison can fail: the fp32 model's logits differ from the bf16 model's
    assert _diff(_hf_vit_logits(fp32), REF["vit_logits"]) > 1e-4
    # without the view rule, the uint16 bits would be cast as integers: refuse to look like that
    wrong = {k: torch.from_numpy(raw_v.astype(np.float32)) for k, raw_v in raw.items()}
    assert max(v.abs().max().item() for v in wrong.values()) > 1e4


def test_vit_final_norm_inside_transformer_encoder_is_mapped_too():
    """TransformerEncoder(layer, n, norm=LayerNorm(d)) names the final norm encoder.norm.*."""
    src = statemap.load_state_dict(VIT)
    src = {("encoder." + k if k.startswith("norm.") else k): v for k, v in src.items()}
    new, report = statemap.map_state_dict("vit-paddle-to-torch", src)
    assert report.passthrough == []
    assert _diff(_hf_vit_logits(new), REF["vit_logits"]) <= 1e-5


def test_vit_comparison_can_fail():
    """Swapping q and k, HF's default layer_norm_eps, or the tanh GELU changes the logits."""
    new, _ = statemap.map_state_dict("vit-paddle-to-torch", statemap.load_state_dict(VIT))
    swapped = dict(new)
    for i in range(2):
        q, k = (f"vit.encoder.layer.{i}.attention.attention.{n}.weight" for n in ("query", "key"))
        swapped[q], swapped[k] = new[k], new[q]
    assert _diff(_hf_vit_logits(swapped), REF["vit_logits"]) > 1e-3
    assert _diff(_hf_vit_logits(new, layer_norm_eps=1e-12), REF["vit_logits"]) > 1e-3  # measured 6.2e-3
    assert _diff(_hf_vit_logits(new, hidden_act="gelu_pytorch_tanh"), REF["vit_logits"]) > 1e-4  # measured 4.1e-4


def test_reading_pdparams_never_imports_paddle(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        import statemap
        sd = statemap.load_state_dict({str(VIT)!r})
        statemap.convert("vit-paddle-to-torch", {str(VIT)!r}, {str(tmp_path / "o.safetensors")!r})
        statemap.convert("batchnorm-paddle-to-torch", {str(CONVBN)!r}, {str(tmp_path / "b.safetensors")!r})
        assert len(sd) == 40, len(sd)
        assert not any(m == "paddle" or m.startswith("paddle.") for m in sys.modules), "paddle imported"
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_pdparams_container_is_paddles_own():
    """The fixture is the pickle paddle.save writes: numpy arrays + a StructuredToParameterName@@ dict."""
    from statemap.load import open_checkpoint

    with open_checkpoint(VIT) as ck:
        assert ck.format == "pickle"
        assert ck.skipped == ["StructuredToParameterName@@"]
        assert ck.metas["head.weight"].shape == (32, 10)  # Paddle Linear: [in, out]


# -- batchnorm-paddle-to-torch -------------------------------------------------------------


def test_batchnorm_pdparams_to_torch_matches_paddle_output(tmp_path):
    out = tmp_path / "out.safetensors"
    report = statemap.convert("batchnorm-paddle-to-torch", CONVBN, out)
    state = load_file(str(out))
    model = _convbn_torch().eval()
    assert set(state) == set(model.state_dict())
    for m in ("1", "4"):
        assert state[f"{m}.num_batches_tracked"].dtype == torch.int64
        assert state[f"{m}.num_batches_tracked"].shape == () and state[f"{m}.num_batches_tracked"].item() == 0
    src = statemap.load_state_dict(CONVBN)
    assert torch.equal(state["4.running_var"], src["4._variance"])
    assert torch.equal(state["1.running_mean"], src["1._mean"])
    assert not torch.allclose(src["1._mean"], torch.zeros(4)) and not torch.allclose(src["4._variance"], torch.ones(4))
    assert report.passthrough == []

    model.load_state_dict(state, strict=True)
    assert model[1].num_batches_tracked.shape == ()
    with torch.no_grad():
        got = model(PIXELS)
    diff = _diff(got, REF["convbn_output"])
    print(f"batchnorm-paddle-to-torch: max abs diff vs Paddle output = {diff:.3e}")
    assert diff <= 1e-5, diff

    # negative: Paddle's names loaded with torch defaults (mean 0, var 1) give other outputs
    fresh = _convbn_torch().eval()
    fresh.load_state_dict({k: v for k, v in state.items() if "running" not in k}, strict=False)
    with torch.no_grad():
        assert _diff(fresh(PIXELS), REF["convbn_output"]) > 1e-3


def test_inject_zero_dim_shape(tmp_path):
    spec = {
        "name": "nbt",
        "version": 1,
        "rules": [
            {"rename": "{m:path}._mean -> {m}.running_mean"},
            {"inject": {"to": "1.num_batches_tracked", "shape": [], "value": 0, "dtype": "int64"}},
        ],
    }
    new, _ = statemap.map_state_dict(spec, statemap.load_state_dict(CONVBN))
    assert new["1.num_batches_tracked"].shape == ()
    statemap.convert(spec, CONVBN, tmp_path / "o.safetensors")
    assert load_file(str(tmp_path / "o.safetensors"))["1.num_batches_tracked"].shape == ()


def _vit_fixture(tmp: Path) -> tuple[Path, dict[str, Any]]:
    return VIT, {}


def _convbn_fixture(tmp: Path) -> tuple[Path, dict[str, Any]]:
    return CONVBN, {}


STREAMING_FIXTURES = {
    "vit-paddle-to-torch": _vit_fixture,
    "batchnorm-paddle-to-torch": _convbn_fixture,
}
