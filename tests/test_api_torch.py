"""map_state_dict on torch tensors: zero copy, device and dtype preserved, same values as the file path."""

from __future__ import annotations

import pytest
import torch

import statemap
from statemap.errors import CheckpointError

HEAD = "name: t\nversion: 1\nrules:\n"


def test_renamed_tensors_are_the_input_objects():
    sd = {f"enc.layers.{i}.w": torch.randn(4, 3) for i in range(3)}
    out, _ = statemap.map_state_dict(HEAD + "  - rename: 'enc.{r:path} -> model.enc.{r}'\n", sd)
    assert all(out[f"model.enc.layers.{i}.w"] is sd[f"enc.layers.{i}.w"] for i in range(3))


def test_dim0_split_gives_views_and_the_rest_is_computed_in_torch():
    fused = torch.randn(6, 2)
    sd = {"qkv": fused, "w": torch.randn(2, 3)}
    spec = HEAD + "  - split: {from: qkv, to: [q, k, v], dim: 0}\n  - transpose: {from: w, to: wt}\n"
    out, _ = statemap.map_state_dict(spec, sd)
    assert out["k"].untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # a view, no copy
    assert torch.equal(out["k"], fused[2:4]) and torch.equal(out["wt"], sd["w"].T) and out["wt"].is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float16])
def test_dtypes_are_not_widened(dtype):
    sd = {"a": torch.randn(2, 4).to(dtype), "b": torch.randn(2, 4).to(dtype)}
    spec = HEAD + "  - merge: {from: [a, b], to: ab, dim: 0}\n  - transpose: {from: ab, to: abt}\n"
    out, _ = statemap.map_state_dict(spec, sd)
    assert out["abt"].dtype == dtype
    assert torch.equal(out["abt"].view(torch.uint8), torch.cat([sd["a"], sd["b"]]).T.contiguous().view(torch.uint8))


def test_meta_tensors_plan_and_map_without_data():
    sd = {"a": torch.empty(4, 3, device="meta"), "b": torch.empty(4, 3, device="meta")}
    spec = HEAD + "  - transpose: {from: a, to: at}\n  - rename: 'b -> c'\n  - inject: {to: z, shape: [2], value: 0}\n"
    out, _ = statemap.map_state_dict(spec, sd)
    assert out["at"].device.type == "meta" and out["at"].shape == (3, 4) and out["c"] is sd["b"]
    assert out["z"].device.type == "meta"  # filled on the state dict's device
    # meta tensors share no storage: never taken for a tie; and an assume cannot be checked on them
    tied = HEAD + "  - drop: {from: a, when: {tied_to: b}}\n"
    assert "a" in statemap.map_state_dict(tied, sd)[0]
    with pytest.raises(CheckpointError, match="meta tensor holds no values"):
        statemap.map_state_dict(HEAD + "  - drop: {from: a, assume: {equal: b}}\n", sd)


def test_copy_is_independent_and_tie_is_one_object():
    e = torch.randn(3, 2)
    out, _ = statemap.map_state_dict(HEAD + "  - copy: {from: e, to: [e, x]}\n", {"e": e})
    assert out["e"] is e and out["x"] is not e and torch.equal(out["x"], e)
    out, _ = statemap.map_state_dict(HEAD + "  - tie: {from: e, to: [e, x]}\n", {"e": e})
    assert out["e"] is out["x"] is e


def test_torch_path_equals_the_numpy_path_bitwise(tmp_path):
    """The same spec on the same tensors: the torch executor and the file (numpy) path agree."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    sd = {
        "qkv.0": torch.randn(6, 4, generator=g).bfloat16(),
        "w.0": torch.randn(4, 5, generator=g),
        "v": torch.randn(7, 2, generator=g),
    }
    spec = (
        HEAD
        + "  - split: {from: 'qkv.{i}', to: ['q.{i}', 'k.{i}', 'v.{i}'], dim: 0}\n"
        + "  - transpose: {from: 'w.{i}', to: 'wt.{i}'}\n"
        + "  - cast: {from: 'wt.{i}', dtype: bfloat16}\n"
        + "  - pad: {from: v, dim: 0, size: 9, value: 0.5}\n"
        + "  - slice: {from: 'k.{i}', dim: 1, start: 1, stop: 3}\n"
    )
    out, _ = statemap.map_state_dict(spec, sd)
    save_file(sd, tmp_path / "in.safetensors")
    statemap.convert(spec, tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    ref = load_file(tmp_path / "out.safetensors")
    assert out.keys() == ref.keys()
    for k in ref:
        assert out[k].dtype == ref[k].dtype and torch.equal(out[k].contiguous().view(torch.uint8), ref[k].view(torch.uint8)), k
