"""Readers and writers: every supported container, checked value-for-value against torch."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import statemap
from statemap import CheckpointError, open_checkpoint
from statemap.torch_adapter import to_torch

g = torch.Generator().manual_seed(0)
DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint16,
]


def _all_dtypes() -> dict[str, torch.Tensor]:
    out = {}
    for dt in DTYPES:
        x = torch.randn(3, 4, generator=g) * 10
        out[str(dt).removeprefix("torch.")] = x.to(dt) if dt != torch.uint16 else x.abs().to(torch.int32).to(torch.uint16)
    return out


def _read_all(path, **kw) -> dict[str, torch.Tensor]:
    with open_checkpoint(path, **kw) as ck:
        return {k: to_torch(ck.read(k), m.dtype) for k, m in ck.metas.items()}


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(
            a[k].view(torch.uint8) if a[k].dtype.itemsize == 1 else a[k],
            b[k].view(torch.uint8) if b[k].dtype.itemsize == 1 else b[k],
        ), k


def test_safetensors_written_by_the_library_every_dtype(tmp_path):
    sd = _all_dtypes()
    save_file(sd, tmp_path / "a.safetensors")
    got = _read_all(tmp_path / "a.safetensors")
    _same({k: got[k] for k in sd}, sd)


@pytest.mark.parametrize("zipfmt", [True, False], ids=["zip", "legacy"])
def test_torch_files_every_dtype_and_views(tmp_path, zipfmt):
    sd = _all_dtypes()
    base = torch.randn(6, 5, generator=g)
    sd["transposed"] = base.t()  # non-contiguous
    sd["row_view"] = base[2:4]  # storage offset, shares storage with `transposed`
    sd["param"] = torch.nn.Parameter(torch.randn(2, generator=g))
    sd["alias_of_row_view"] = sd["row_view"]  # one tensor, two names (a tie, as fairseq saves them)
    torch.save(sd, tmp_path / "a.pt", _use_new_zipfile_serialization=zipfmt)
    got = _read_all(tmp_path / "a.pt")
    want = {k: (v.detach() if isinstance(v, torch.nn.Parameter) else v) for k, v in sd.items()}
    _same(got, want)
    with open_checkpoint(tmp_path / "a.pt") as ck:
        assert ck.format == ("torch-zip" if zipfmt else "torch-legacy")
        # found from metadata: the same view under two names is a tie; two views of one storage are not
        assert ck.tied_groups() == [["row_view", "alias_of_row_view"]]


def test_writers_round_trip_and_are_readable_by_torch_and_safetensors(tmp_path):
    sd = _all_dtypes()
    statemap.save_state_dict(sd, tmp_path / "o.safetensors")
    statemap.save_state_dict(sd, tmp_path / "o.pt")
    lib = load_file(tmp_path / "o.safetensors")
    _same({k: lib[k] for k in sd}, sd)
    _same(torch.load(tmp_path / "o.pt", weights_only=True), sd)
    with open_checkpoint(tmp_path / "o.safetensors") as ck:
        assert ck.metadata["format"] == "pt"


def test_sharded_safetensors_out_and_in(tmp_path):
    sd = {f"layer.{i}.w": torch.randn(64, 64, generator=g) for i in range(6)}  # 16 KiB each
    save_file(sd, tmp_path / "src.safetensors")
    spec = {"name": "t", "version": 1, "rules": [{"rename": "layer.{i}.w -> model.layers.{i}.weight"}]}
    report = statemap.convert(spec, tmp_path / "src.safetensors", tmp_path / "model.safetensors", max_shard_size="40KB")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "src.safetensors",
    ]
    assert len(report.files) == 4
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 6 * 64 * 64 * 4
    got = _read_all(tmp_path / "model.safetensors.index.json")
    assert got == got and all(torch.equal(got[f"model.layers.{i}.weight"], sd[f"layer.{i}.w"]) for i in range(6))
    got_dir = _read_all(tmp_path)  # a directory with one index file
    assert set(got_dir) == set(got)


def test_hf_sharded_bin_index(tmp_path):
    a = {"x.weight": torch.randn(2, 2, generator=g)}
    b = {"y.weight": torch.randn(3, generator=g)}
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {"x.weight": "pytorch_model-00001-of-00002.bin", "y.weight": "pytorch_model-00002-of-00002.bin"},
            }
        )
    )
    got = _read_all(tmp_path)
    assert torch.equal(got["x.weight"], a["x.weight"]) and torch.equal(got["y.weight"], b["y.weight"])


BAD_INDEXES = [
    ({"x.weight": "../outside.safetensors"}, r"points outside the checkpoint folder; refusing"),
    ({"x.weight": "/etc/passwd"}, r"points outside the checkpoint folder; refusing"),
    ({"x.weight": "missing.safetensors"}, r"shard 'missing\.safetensors' is missing"),
    (
        {"x.weight": "s1.safetensors", "y.weight": "s1.safetensors"},
        r"shard 's1\.safetensors' holds 'z', which the index maps to None",
    ),
    ({"x.weight": "s1.safetensors", "z": "s2.safetensors", "y.weight": "s2.safetensors"}, r"tensor 'z' is in two shards"),
]


@pytest.mark.parametrize("weight_map, message", BAD_INDEXES)
def test_bad_index(tmp_path, weight_map, message):
    save_file({"x.weight": torch.zeros(1), "z": torch.zeros(1)}, tmp_path / "s1.safetensors")
    save_file({"y.weight": torch.zeros(1), "z": torch.zeros(1)}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / "model.safetensors.index.json")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_compiled_and_ddp_prefixes_are_stripped(tmp_path, prefix):
    sd = {f"{prefix}h.0.w": torch.zeros(1), f"{prefix}h.1.w": torch.ones(1)}
    torch.save({"model": sd, "iter_num": 5}, tmp_path / "ckpt.pt")
    with open_checkpoint(tmp_path / "ckpt.pt") as ck:
        assert list(ck.metas) == ["h.0.w", "h.1.w"] and ck.stripped_prefix == prefix
        assert ck.read("h.1.w").tolist() == [1.0]
        assert ck.extras == {"iter_num": 5}


def test_plain_pickle_of_numpy_arrays(tmp_path):
    """Paddle .pdparams are pickles of numpy arrays; read them with the same allowlist."""
    sd = {
        "linear_0.w_0": np.arange(12, dtype="f4").reshape(3, 4),
        "linear_0.b_0": np.ones(4, dtype="f8"),
        "StructuredToParameterName@@": {"a": "b"},
    }
    with open(tmp_path / "m.pdparams", "wb") as f:
        pickle.dump(sd, f, protocol=2)
    with open_checkpoint(tmp_path / "m.pdparams") as ck:
        assert ck.format == "pickle"
        assert ck.read("linear_0.w_0").tolist() == sd["linear_0.w_0"].tolist()
        assert ck.metas["linear_0.b_0"].dtype == "float64"
        assert ck.skipped == ["StructuredToParameterName@@"]


def test_nested_state_dict_is_flattened(tmp_path):
    torch.save({"params": {"encoder": {"w": torch.zeros(2)}, "head": {"b": torch.ones(1)}}}, tmp_path / "n.pt")
    with open_checkpoint(tmp_path / "n.pt") as ck:
        assert list(ck.metas) == ["encoder.w", "head.b"] and ck.container == "params"


def test_explicit_unwrap_errors_name_the_keys(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "args": None}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"cannot unwrap 'weights': no key 'weights' \(keys: model, args\)"):
        open_checkpoint(tmp_path / "c.pt", unwrap=("weights",))


@pytest.mark.parametrize(
    "obj, message",
    [
        ({}, r"state dict is empty"),
        ({"args": 1, "note": "x"}, r"no tensors found \(top-level keys: args, note\)"),
        ([torch.zeros(1)], r"holds a list, not a state dict"),
    ],
)
def test_not_a_state_dict(tmp_path, obj, message):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / "x.pt")


def test_directory_without_a_single_checkpoint(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "a.safetensors")
    save_file({"b": torch.zeros(1)}, tmp_path / "b.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"holds 2 checkpoints and no index \(a\.safetensors, b\.safetensors\); name one file, "
        r"or read them all with 'inputs: \"\{name\}\.safetensors\"' in the spec",
    ):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".msgpack"])
def test_zero_dim_tensors_round_trip(tmp_path, suffix):
    """Scalars (e.g. num_batches_tracked, logit_scale) keep shape [] in every format."""
    sd = {"num_batches_tracked": torch.tensor(5), "logit_scale": torch.tensor(2.5), "w": torch.ones(2)}
    statemap.save_state_dict(sd, tmp_path / f"s{suffix}")
    got = _read_all(tmp_path / f"s{suffix}")
    for k, v in sd.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v), k
