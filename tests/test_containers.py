"""Containers and formats: the model's state dict is picked (never optimizer state), pickled modules,
DCP folders, .npz, and formats recognised from bytes. Expected values come from the real loaders
(torch.load, model.state_dict(), torch's DCP reader, np.load), computed at test time."""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import statemap
from statemap import CheckpointError, open_checkpoint
from statemap.cli import main as cli

FIX = Path(__file__).resolve().parent / "fixtures"


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.register_buffer("anchors", torch.arange(6.0).reshape(3, 2))  # persistent buffer
        self.register_buffer("cache", torch.zeros(5), persistent=False)  # not in state_dict()


class Detector(torch.nn.Module):
    """A YOLO-like model: nested modules, a ModuleList, an optional (None) submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(4, 2)
        self.aux = None


def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


def _trained(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam with its per-parameter state filled as a step fills it (a first optimizer.step() in a
    process costs ~9 s of torch imports); state_dict() then is the real layout: state + param_groups."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.full_like(p, 0.1), "exp_avg_sq": torch.full_like(p, 0.01)}
    return opt


def test_pickled_module_is_its_state_dict(tmp_path):
    torch.manual_seed(0)
    net = Detector()
    torch.save(net, tmp_path / "net.pt")
    with open_checkpoint(tmp_path / "net.pt") as ck:
        assert ck.container == "" and ck.alternatives == []
        assert not any("cache" in k for k in ck.metas)
    _equal(statemap.load_state_dict(tmp_path / "net.pt"), net.state_dict())


def test_yolo_style_checkpoint_takes_the_model_not_the_optimizer(tmp_path):
    """{'model': <module>, 'ema': <module>, 'optimizer': ...}: the model; 'ema' is the alternative."""
    torch.manual_seed(0)
    model, ema = Detector().half(), Detector().half()
    opt = _trained(Detector())
    ckpt = {"epoch": 3, "best_fitness": None, "model": model, "ema": ema, "updates": 10, "optimizer": opt.state_dict()}
    torch.save(ckpt, tmp_path / "last.pt")
    want = torch.load(tmp_path / "last.pt", weights_only=False)  # the real loader (sandbox-free: our own file)
    with open_checkpoint(tmp_path / "last.pt") as ck:
        assert ck.container == "model" and ck.alternatives == ["ema"]
        assert ck.extras["ema"] == "<module test_containers.Detector>"
        assert set(ck.extras["optimizer"]) == {"state", "param_groups"}
        assert ck.extras["optimizer"]["state"]["0"]["exp_avg"] == "<tensor [4, 3, 3, 3] float32>"  # there, not in metas
    _equal(statemap.load_state_dict(tmp_path / "last.pt"), want["model"].state_dict())
    _equal(statemap.load_state_dict(tmp_path / "last.pt", unwrap="ema"), want["ema"].state_dict())
    assert not torch.equal(want["model"].state_dict()["head.weight"], want["ema"].state_dict()["head.weight"])


def _megatron_legacy(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Megatron-LM legacy checkpoint layout (checkpointing.save_checkpoint): model, optimizer, args."""
    g = torch.Generator().manual_seed(0)
    lm = {
        "embedding": {
            "word_embeddings": {"weight": torch.randn(10, 4, generator=g)},
            "position_embeddings": {"weight": torch.randn(8, 4, generator=g)},
        },
        "encoder": {
            "layers.0.input_layernorm.weight": torch.ones(4),
            "layers.0.self_attention.query_key_value.weight": torch.randn(12, 4, generator=g),
            "final_layernorm.weight": torch.ones(4),
        },
    }
    params = [torch.nn.Parameter(t.clone()) for t in (lm["encoder"]["layers.0.self_attention.query_key_value.weight"],)]
    opt = _trained(torch.nn.ParameterList(params))
    ckpt = {
        "args": argparse.Namespace(num_layers=1, hidden_size=4),
        "checkpoint_version": 3.0,
        "iteration": 100,
        "model": {"language_model": lm},
        "optimizer": {"optimizer": opt.state_dict(), "fp32_from_fp16_params": [[p.detach().float() for p in params]]},
        "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 100},
        "rng_state": [{"random_rng_state": (3, tuple(range(5)), None), "torch_rng_state": torch.get_rng_state()}],
    }
    path = tmp_path / "model_optim_rng.pt"
    torch.save(ckpt, path)
    want = {
        "language_model.embedding.word_embeddings.weight": lm["embedding"]["word_embeddings"]["weight"],
        "language_model.embedding.position_embeddings.weight": lm["embedding"]["position_embeddings"]["weight"],
        **{f"language_model.encoder.{k}": v for k, v in lm["encoder"].items()},
    }
    return path, want


def test_megatron_legacy_lists_only_model_tensors(tmp_path):
    path, want = _megatron_legacy(tmp_path)
    with open_checkpoint(path) as ck:
        assert ck.container == "model"
        assert not any("optimizer" in k or "exp_avg" in k or "rng" in k for k in ck.metas)
    _equal(statemap.load_state_dict(path), want)


@pytest.mark.parametrize("unwrap", ["model/language_model", ("model", "language_model"), ["model/language_model"]])
def test_unwrap_path_forms(tmp_path, unwrap):
    path, want = _megatron_legacy(tmp_path)
    got = statemap.load_state_dict(path, unwrap=unwrap)
    _equal(got, {k.removeprefix("language_model."): v for k, v in want.items()})


def test_timm_style_alternatives_and_unwrap(tmp_path):
    """timm train.py checkpoints: state_dict + state_dict_ema + optimizer + args."""
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = _trained(model)
    ckpt = {
        "epoch": 1,
        "arch": "tiny",
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "version": 2,
        "args": argparse.Namespace(model="tiny"),
        "state_dict_ema": ema.state_dict(),
        "metric": 0.5,
    }
    torch.save(ckpt, tmp_path / "checkpoint-1.pth.tar")
    with open_checkpoint(tmp_path / "checkpoint-1.pth.tar") as ck:
        assert ck.container == "state_dict" and ck.alternatives == ["state_dict_ema"]
    _equal(statemap.load_state_dict(tmp_path / "checkpoint-1.pth.tar", unwrap="state_dict_ema"), ema.state_dict())
    code = cli(["inspect", "--json", str(tmp_path / "checkpoint-1.pth.tar")])
    assert code == 0


def test_inspect_json_lists_alternatives(tmp_path, capsys):
    ckpt = {"state_dict": {"w": torch.zeros(1)}, "state_dict_ema": {"w": torch.ones(1)}}
    torch.save(ckpt, tmp_path / "c.pt")
    assert cli(["inspect", "--json", str(tmp_path / "c.pt")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["container"] == "state_dict" and out["alternatives"] == ["state_dict_ema"]


# -- DCP ------------------------------------------------------------------------------------


def _dcp_reference(folder: Path, tmp_path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(tmp_path / "ref.pt"))  # torch's own DCP reader, one process
    return torch.load(tmp_path / "ref.pt", weights_only=False)


def test_dcp_sharded_by_two_ranks_is_stitched(tmp_path):
    folder = FIX / "dcp" / "sharded"
    ref = _dcp_reference(folder, tmp_path)
    with open_checkpoint(folder) as ck:
        assert ck.format == "dcp" and ck.container == "model"
        assert ck.metas["c"].dtype == "bfloat16" and ck.metas["w"].shape == (6, 4)
        assert "w" not in ck.locations and "r" in ck.locations  # sharded: stitched; whole: one byte range
        assert ck.extras["step"] == 7 and ck.extras["optim"]["param_groups"] == {"0": {"lr": 0.1}}
    _equal(statemap.load_state_dict(folder), ref["model"])
    _equal(statemap.load_state_dict(folder, unwrap="optim/state/w"), ref["optim"]["state"]["w"])


def test_dcp_single_process_save(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    net = Detector()
    opt = _trained(net)
    with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
        dcp.save({"model": net.state_dict(), "optim": opt.state_dict(), "epoch": 2}, checkpoint_id=str(tmp_path / "ck"))
    ref = _dcp_reference(tmp_path / "ck", tmp_path)
    with open_checkpoint(tmp_path / "ck") as ck:
        assert ck.container == "model" and ck.extras["epoch"] == 2
    _equal(statemap.load_state_dict(tmp_path / "ck"), ref["model"])


def _dcp_copy(tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "dcp"
    shutil.copytree(FIX / "dcp" / "sharded", dst)
    return dst


def test_dcp_truncated_shard_file(tmp_path):
    d = _dcp_copy(tmp_path)
    data = (d / "__1_0.distcp").read_bytes()
    (d / "__1_0.distcp").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"runs past the end of '__1_0\.distcp' \(truncated\?\)"):
        open_checkpoint(d)


def test_dcp_missing_shard_file(tmp_path):
    d = _dcp_copy(tmp_path)
    (d / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"record file '__1_0\.distcp' cannot be read"):
        open_checkpoint(d)


# -- npz ------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["savez", "savez_compressed"])
def test_npz_reads_like_np_load(tmp_path, save):
    arrays = {
        "w": np.arange(12, dtype="f4").reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "big_endian": np.array([1, -2, 3], dtype=">i4"),
        "layer/0/bias": np.ones(2, dtype="f2"),
        "scalar": np.float64(3.5),
    }
    save(tmp_path / "a.npz", **arrays)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as want, open_checkpoint(tmp_path / "a.npz") as ck:
        assert ck.format == "npz" and sorted(ck.metas) == sorted(want.files)
        for k in want.files:
            got = ck.read(k)
            assert got.shape == want[k].shape and np.array_equal(got, want[k]), k
            assert got.dtype == want[k].dtype.newbyteorder("<"), k


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "o.npz", ok=np.zeros(2), bad=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=r"entry 'bad\.npy' is an object array \(numpy pickles those\)"):
        open_checkpoint(tmp_path / "o.npz")


# -- formats from bytes -----------------------------------------------------------------------


def test_misnamed_files_are_read_by_their_bytes(tmp_path):
    sd = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    torch.save(sd, tmp_path / "really_torch.safetensors")
    save_file(sd, tmp_path / "really_safetensors.pt")
    with open(tmp_path / "really_npz.bin", "wb") as f:  # np.savez appends .npz to a name
        np.savez(f, **{k: v.numpy() for k, v in sd.items()})
    for name, fmt in [
        ("really_torch.safetensors", "torch-zip"),
        ("really_safetensors.pt", "safetensors"),
        ("really_npz.bin", "npz"),
    ]:
        with open_checkpoint(tmp_path / name) as ck:
            assert ck.format == fmt, name
        got = statemap.load_state_dict(tmp_path / name)
        assert set(got) == set(sd)  # safetensors orders its header itself
        _equal({k: got[k] for k in sd}, sd)
    assert statemap.load.detect(tmp_path / "really_torch.safetensors").name == "torch-zip"


def _zip_of_text(tmp_path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("README.md", "hi")
        z.writestr("config.json", "{}")
    return buf.getvalue()


def _old_torchscript(tmp_path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the layout of torch 1.0-1.3 archives
        z.writestr("net/model.json", "{}")
        z.writestr("net/tensors/0", bytes(8))
        z.writestr("net/code/net.py", "op_version_set = 0\n")
    return buf.getvalue()


NOT_CHECKPOINTS = [
    (
        "model.safetensors",
        lambda t: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
        r"looks like a Git LFS pointer",
    ),
    ("model.pt", lambda t: b"\x1f\x8b\x08\x00" + bytes(40), r"looks like gzip-compressed data"),
    ("model.bin", lambda t: b"<!DOCTYPE html><html>404</html>", r"looks like an HTML or XML page"),
    ("model.h5", lambda t: b"\x89HDF\r\n\x1a\n" + bytes(40), r"looks like an HDF5 file"),
    ("model.safetensors", lambda t: b"GGUF" + bytes(40), r"looks like a GGUF file"),
    ("model.pt", _zip_of_text, r"looks like a zip archive of other files \(README\.md, config\.json\)"),
    ("old.pt", _old_torchscript, r"looks like a TorchScript archive from torch < 1\.4 \(model\.json\)"),
    ("weights.xyz", lambda t: b"\x00\x01\x02\x03" * 8, r"not a checkpoint format statemap recognises"),
]


@pytest.mark.parametrize("name, build, message", NOT_CHECKPOINTS, ids=[f"{n}-{m[:20]}" for n, _, m in NOT_CHECKPOINTS])
def test_not_a_checkpoint_says_what_it_looks_like(tmp_path, name, build, message):
    (tmp_path / name).write_bytes(build(tmp_path))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / name)


def test_torch_file_named_safetensors_gives_no_header_alarm(tmp_path, capsys):
    torch.save({"w": torch.zeros(3)}, tmp_path / "x.safetensors")
    assert cli(["inspect", str(tmp_path / "x.safetensors")]) == 0
    assert "header length" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "obj, message",
    [
        (torch.zeros(2), r"holds a single tensor, not a state dict \(save a dict of name -> tensor\)"),
        (argparse.Namespace(lr=1), r"holds a argparse\.Namespace, not a state dict or a model"),
        ({"optimizer": {"state": {0: {"exp_avg": torch.zeros(1)}}, "param_groups": []}}, r"no tensors found"),
    ],
    ids=["tensor", "namespace", "optimizer-only"],
)
def test_not_a_model(tmp_path, obj, message):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / "x.pt")


def test_damaged_torch_file_named_safetensors_is_reported_as_a_zip(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "x.pt")
    data = (tmp_path / "x.pt").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[: len(data) // 2])  # truncated: no zip directory
    with pytest.raises(CheckpointError, match=r"x\.safetensors: not a readable torch zip file") as e:
        open_checkpoint(tmp_path / "x.safetensors")
    assert "header length" not in str(e.value)


def test_format_table_is_the_one_registry():
    names = [f.name for f in statemap.load.FORMATS]
    assert names == ["safetensors", "torchscript", "torch-zip", "npz", "torch-legacy", "pickle", "flax-msgpack", "index-json"]


def test_shared_submodule_dag_is_bounded(tmp_path, monkeypatch):
    """A module shared by two parents appears under both names (as in torch); a DAG of 2**25 paths is refused."""
    from statemap.load import containers

    monkeypatch.setattr(containers, "MAX_VISITS", 10_000)  # the default (1M) works the same, slower
    m: torch.nn.Module = torch.nn.Linear(1, 1)
    shared = torch.nn.Module()
    shared.a, shared.b = m, m
    _equal(statemap.load_state_dict(_saved(tmp_path, shared)), shared.state_dict())
    for _ in range(25):
        parent = torch.nn.Module()
        parent.a, parent.b = m, m
        m = parent
    # the unpickler's shared-container bound (MAX_EXPANDED) or the module walk's bound, whichever is first
    with pytest.raises(CheckpointError, match=r"(more than 10000 module paths|expand to more than [\d,]+ values .*); refusing"):
        open_checkpoint(_saved(tmp_path, m))


def _saved(tmp_path: Path, obj: object) -> Path:
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.pt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "tracker, dirs, message",
    [
        ("abc", [], r"latest_checkpointed_iteration\.txt: expected an iteration number or 'release', found 'abc'"),
        ("5", [], r"names iteration 5, but iter_0000005/ is missing"),
        (
            "5",
            ["iter_0000005/mp_rank_00", "iter_0000005/mp_rank_01"],
            r"found ranks: mp_rank_00, mp_rank_01\); to read every rank, add .inputs: \"mp_rank_\{tp:int\}/model_optim_rng\.pt\". to the spec",
        ),
    ],
    ids=["not-a-number", "missing-iteration", "two-ranks"],
)
def test_megatron_folder_errors(tmp_path, tracker, dirs, message):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text(tracker)
    for d in dirs:
        (tmp_path / d).mkdir(parents=True)
        torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / d / "model_optim_rng.pt")
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path)
