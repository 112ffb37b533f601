"""Mixtral: one tensor per expert (transformers 4.x) <-> stacked experts (transformers 5.x), proven
against both real implementations and transformers 5's own conversion.

Fixtures (tests/fixtures/mixtral/, written by make_fixtures.py: transformers 4.57.6 and 5.24.0):
- per_expert_e{2,4}/: a 4.57.6 MixtralForCausalLM ``save_pretrained`` folder, its logits
  (reference.safetensors), and what transformers 5.24.0 makes of it (tf5.json: sha256 of every tensor
  of its ``from_pretrained`` state dict; tf5_logits.safetensors: its logits);
- stacked_e{2,4}/: a 5.24.0 ``save_pretrained(save_original_format=False)`` folder, its logits, and
  tf5.json: sha256 of what 5.24.0's default ``save_pretrained`` writes (its conversion back).

CI runs transformers 4.57.6 only: the 4.x side is run live; the 5.x side is checked through its own
conversion (bitwise) and its stored logits. With /work/venvs/moe (transformers 5) present, the 5.x
model is also run live on statemap's output.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import statemap
from statemap.catalog import find
from statemap.errors import StatemapError

FIX = Path(__file__).resolve().parent / "fixtures" / "mixtral"
EXPERTS = (2, 4)
TOL = 1e-5
# transformers 5 lives in a venv of its own: CI builds .venv-tf5 (.ci/run) before the tests run
TF5_PYTHON = Path(os.environ.get("STATEMAP_TF5_PYTHON", Path(__file__).resolve().parents[1] / ".venv-tf5" / "bin" / "python"))


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _tf4_model(config_dir: Path):
    """A transformers 4.57.6 MixtralForCausalLM with the dims of a (4.x or 5.x) config.json."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = json.loads((config_dir / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("num_key_value_heads", "num_experts_per_tok", "num_local_experts", "max_position_embeddings", "rms_norm_eps")
    rope = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta")
    cfg = MixtralConfig(**{k: c[k] for k in keys}, rope_theta=rope, tie_word_embeddings=False)
    return MixtralForCausalLM(cfg).eval()


def _tf4_logits(config_dir: Path, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model = _tf4_model(config_dir)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(ids).logits


def _convert(spec: str | dict[str, Any], src: Path, tmp: Path, **kw: Any) -> dict[str, torch.Tensor]:
    out = tmp / f"out{len(list(tmp.iterdir()))}.safetensors"
    statemap.convert(spec, src, out, **kw)
    return load_file(out)


def _check_hashes(sd: dict[str, torch.Tensor], ref_json: Path) -> None:
    ref = json.loads(ref_json.read_text())
    assert sorted(sd) == sorted(ref["sha256"])
    for k, v in sd.items():
        assert list(v.shape) == ref["shapes"][k], k
        assert _sha(v) == ref["sha256"][k], k


# --------------------------------------------------------------------------------------------
# per-expert (4.x) -> stacked (5.x)


@pytest.mark.parametrize("e", EXPERTS)
def test_per_expert_to_stacked_is_transformers5s_own_conversion(tmp_path, e):
    src = FIX / f"per_expert_e{e}"
    out = _convert("mixtral-experts-to-stacked", src / "model.safetensors", tmp_path)
    _check_hashes(out, src / "tf5.json")  # bitwise what transformers 5.24.0's from_pretrained holds
    assert out["model.layers.0.mlp.experts.gate_up_proj"].shape == (e, 2 * 16, 32)
    assert out["model.layers.1.mlp.experts.down_proj"].shape == (e, 32, 16)
    # ... and transformers 5.24.0's logits on those tensors equal transformers 4.57.6's, run here
    ref = load_file(src / "reference.safetensors")
    tf4 = _tf4_logits(src, load_file(src / "model.safetensors"), ref["input_ids"])
    tf5 = load_file(src / "tf5_logits.safetensors")["logits"]
    assert (tf4 - tf5).abs().max() <= TOL


@pytest.mark.parametrize("e", EXPERTS)
def test_stacked_to_per_expert_runs_in_transformers4(tmp_path, e):
    src = FIX / f"stacked_e{e}"
    out = _convert("mixtral-stacked-to-experts", src / "model.safetensors", tmp_path)
    _check_hashes(out, src / "tf5.json")  # bitwise what transformers 5.24.0 itself writes back
    ref = load_file(src / "reference.safetensors")  # transformers 5.24.0's logits
    diff = (_tf4_logits(src, out, ref["input_ids"]) - ref["logits"]).abs().max()
    assert diff <= TOL, diff


@pytest.mark.skipif(
    not TF5_PYTHON.exists(),
    reason="no transformers 5 venv (.venv-tf5, built by .ci/run; or set STATEMAP_TF5_PYTHON): the stored logits still cover it",
)
def test_transformers5_runs_statemaps_stacked_output(tmp_path):
    args = []
    for e in EXPERTS:
        src = FIX / f"per_expert_e{e}"
        statemap.convert("mixtral-experts-to-stacked", src / "model.safetensors", tmp_path / f"stacked{e}.safetensors")
        args += [
            FIX / f"stacked_e{e}",
            tmp_path / f"stacked{e}.safetensors",
            src / "reference.safetensors",
            tmp_path / f"logits{e}.safetensors",
        ]
    subprocess.run([str(TF5_PYTHON), str(FIX / "tf5_logits.py"), *map(str, args)], check=True)  # one transformers 5 import
    for e in EXPERTS:
        tf5 = load_file(tmp_path / f"logits{e}.safetensors")["logits"]
        tf4 = load_file(FIX / f"per_expert_e{e}" / "reference.safetensors")["logits"]  # transformers 4.57.6's
        assert (tf5 - tf4).abs().max() <= TOL


# --------------------------------------------------------------------------------------------
# round trips, derived inverses


@pytest.mark.parametrize("e", EXPERTS)
def test_round_trips_are_bitwise(tmp_path, e):
    for name, there, back in [
        ("per_expert", "mixtral-experts-to-stacked", "mixtral-stacked-to-experts"),
        ("stacked", "mixtral-stacked-to-experts", "mixtral-experts-to-stacked"),
    ]:
        src = FIX / f"{name}_e{e}" / "model.safetensors"
        mid = tmp_path / f"{name}-mid.safetensors"
        statemap.convert(there, src, mid)
        for spec, kw in [(back, {}), (there, {"reverse": True})]:  # the catalog's reverse spec, and the derived one
            again = _convert(spec, mid, tmp_path, **kw)
            orig = load_file(src)
            assert sorted(again) == sorted(orig)
            assert all(torch.equal(again[k], orig[k]) for k in orig), (name, spec, kw)


def test_in_memory_from_the_models_state_dict():
    """map_state_dict on a live transformers 4.57.6 model's state_dict() (3 experts, not a fixture count)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    model = MixtralForCausalLM(MixtralConfig(**{**cfg.to_dict(), "num_local_experts": 3})).eval()
    sd = model.state_dict()
    new, _ = statemap.map_state_dict(statemap.load_spec("mixtral-experts-to-stacked"), sd)
    gu = new["model.layers.0.mlp.experts.gate_up_proj"]
    for x in range(3):
        p = f"model.layers.0.block_sparse_moe.experts.{x}."
        assert torch.equal(gu[x], torch.cat([sd[p + "w1.weight"], sd[p + "w3.weight"]]))
        assert torch.equal(new["model.layers.0.mlp.experts.down_proj"][x], sd[p + "w2.weight"])


# --------------------------------------------------------------------------------------------
# a wrong spec is caught


def _swapped_spec() -> dict[str, Any]:
    """The catalog spec with up (w3) stacked before gate (w1): every shape still agrees."""
    import yaml

    data = yaml.safe_load(find("mixtral-experts-to-stacked").read_text())
    merge = data["rules"][2]["merge"]
    merge["from"] = list(reversed(merge["from"]))
    return data


def test_a_wrong_spec_is_caught_by_the_checks(tmp_path):
    src = FIX / "per_expert_e2"
    out = _convert(_swapped_spec(), src / "model.safetensors", tmp_path)
    with pytest.raises(AssertionError):
        _check_hashes(out, src / "tf5.json")
    # the 5.x model on the wrong tensors: emulated by the 4.x model on its per-expert inverse
    back = _convert("mixtral-stacked-to-experts", tmp_path / "out0.safetensors", tmp_path)
    ref = load_file(src / "reference.safetensors")
    assert (_tf4_logits(src, back, ref["input_ids"]) - ref["logits"]).abs().max() > 100 * TOL


@pytest.mark.parametrize(
    ("spec_edit", "drop", "match"),
    [
        ({"count": 3}, None, r"count is 3, but merging over e found 2"),  # count asserted: the file has 2
        ({}, "model.layers.1.block_sparse_moe.experts.0.w1.weight", r"merging over e: no index 0"),  # named
    ],
)
def test_bad_expert_sets_are_refused(tmp_path, spec_edit, drop, match):
    import yaml

    data = yaml.safe_load(find("mixtral-experts-to-stacked").read_text())
    data["rules"][0]["merge"].update(spec_edit)
    sd = load_file(FIX / "per_expert_e2" / "model.safetensors")
    if drop:
        sd.pop(drop)
    with pytest.raises(StatemapError, match=match):
        statemap.map_state_dict(statemap.load_spec(data), sd)


def _streaming(name: str, folder: str):
    def make(tmp: Path) -> tuple[Path, dict[str, Any]]:
        return FIX / folder / "model.safetensors", {}

    return make


STREAMING_FIXTURES = {
    "mixtral-experts-to-stacked": _streaming("mixtral-experts-to-stacked", "per_expert_e4"),
    "mixtral-stacked-to-experts": _streaming("mixtral-stacked-to-experts", "stacked_e4"),
}
