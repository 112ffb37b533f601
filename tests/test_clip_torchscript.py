"""clip-openai-to-hf on a TorchScript archive built like OpenAI's released CLIP `.pt` files.

tests/fixtures/clip/openai_jit.pt was written by OpenAI's own `clip` package (make_torchscript.py
there): the package's `clip.model.CLIP`, converted to float16 by `clip.model.convert_weights`,
traced and `torch.jit.save`d, with the `clip` model's outputs on fixed inputs stored beside it.
statemap reads the archive as data (no torch.jit.load, no code run), converts it, and transformers'
CLIPModel must reproduce the `clip` outputs.
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
JIT = FIX / "openai_jit.pt"
TOL = 1e-5


def _config(**text: object) -> CLIPConfig:
    """The HF config equal to make_torchscript.py's model (the clip package: quick_gelu, eps 1e-5)."""
    text_cfg = dict(
        hidden_size=16,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        vocab_size=100,
        max_position_embeddings=16,
        bos_token_id=98,
        eos_token_id=99,
        pad_token_id=0,
    )
    text_cfg.update(text)
    vision_cfg = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=1,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        image_size=8,
        patch_size=4,
        num_channels=3,
    )
    return CLIPConfig(projection_dim=8, text_config=text_cfg, vision_config=vision_cfg)


def _outputs(state: dict[str, torch.Tensor], io: dict[str, torch.Tensor], **text: object) -> dict[str, torch.Tensor]:
    model = load_converted(CLIPModel, _config(**text), state)  # float16 weights are copied into the float32 model
    with torch.no_grad():
        return {
            "image_features": features(model.get_image_features(pixel_values=io["pixel_values"])),
            "text_features": features(model.get_text_features(input_ids=io["input_ids"])),
            "logits_per_image": model(input_ids=io["input_ids"], pixel_values=io["pixel_values"]).logits_per_image,
        }


def _diffs(got: dict[str, torch.Tensor], io: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: (v - io[k]).abs().max().item() for k, v in got.items()}


def test_archive_reads_as_torch_jit_load_state_dict():
    """Names, order, dtypes and values equal torch.jit.load(...).state_dict() (the test may run torch.jit; statemap does not)."""
    want = torch.jit.load(str(JIT)).state_dict()
    with statemap.open_checkpoint(JIT) as ck:
        assert ck.format == "torchscript"
        assert list(ck.metas) == list(want)
    got = statemap.load_state_dict(JIT)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert want["visual.conv1.weight"].dtype == torch.float16 and want["ln_final.weight"].dtype == torch.float32
    assert {"input_resolution", "context_length", "vocab_size"} <= set(want)


def test_openai_jit_archive_to_hf_matches_clip_outputs(tmp_path):
    out = tmp_path / "model.safetensors"
    report = statemap.convert("clip-openai-to-hf", JIT, out)
    assert report.source_format == "torchscript" and report.passthrough == []
    assert sorted(report.dropped) == ["context_length", "input_resolution", "vocab_size"]
    io = load_file(FIX / "openai_jit_io.safetensors")
    d = _diffs(_outputs(load_file(out), io), io)
    assert max(d.values()) <= TOL, d


def test_comparison_can_fail(tmp_path):
    """Swapped q/k in one text layer, or pooling at the wrong token, move the outputs far past 1e-5."""
    io = load_file(FIX / "openai_jit_io.safetensors")
    good, _ = statemap.map_state_dict("clip-openai-to-hf", statemap.load_state_dict(JIT))
    bad = dict(good)
    q, k = (f"text_model.encoder.layers.0.self_attn.{n}_proj.weight" for n in "qk")
    bad[q], bad[k] = good[k], good[q]
    d = _diffs(_outputs(bad, io), io)
    assert d["text_features"] > 1e-3 and d["image_features"] <= TOL, d
    d = _diffs(_outputs(good, io, eos_token_id=0), io)
    assert d["text_features"] > 1e-3, d


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_torchscript_archives_match_torch_jit_load(tmp_path, mode):
    """A scripted and a traced module with a non-persistent buffer (TorchScript keeps it), a Sequential, a bias-free Linear."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.BatchNorm1d(4))
            self.head = torch.nn.Linear(4, 5, bias=False)
            self.scale = torch.nn.Parameter(torch.tensor(2.0))
            self.register_buffer("tmp", torch.ones(2), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(self.emb(x))) * self.scale + self.tmp.sum()

    torch.manual_seed(0)
    net = Net().eval()
    m = torch.jit.script(net) if mode == "script" else torch.jit.trace(net, torch.tensor([1, 2, 3]))
    path = tmp_path / f"{mode}.pt"
    torch.jit.save(m, str(path))
    want = torch.jit.load(str(path)).state_dict()
    got = statemap.load_state_dict(path)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("path", [JIT, FIX.parent / "dcp" / "sharded"], ids=["torchscript", "dcp"])
def test_read_without_torch(path):
    """Reading every tensor of a TorchScript archive or a DCP folder never imports torch (so no
    torch.jit.load / torch.load can run): the file is data."""
    import subprocess
    import sys

    code = (
        "import sys, statemap\n"
        f"ck = statemap.open_checkpoint({str(path)!r})\n"
        "n = sum(ck.read(k).size for k in ck.metas)\n"
        "assert n > 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "print(len(ck.metas))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0
