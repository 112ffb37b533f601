"""Unpickler v2: protocol-2 names, harmless classes as placeholders, every dtype, numpy of any
protocol, and resource bounds. Good inputs are real ``torch.save`` files compared value by value
against ``torch.load(weights_only=False)`` on files this test generated itself."""

from __future__ import annotations

import _compat_pickle
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from statemap import UnsafeCheckpointError, open_checkpoint
from statemap.load.unpickle import compat_name, safe_load, to_plain

FIX = Path(__file__).parent / "fixtures" / "unpickle"


def _values(ck, name: str) -> list:
    return ck.read(name).flatten().tolist()


def _assert_same_tensors(path: Path, expected: dict) -> None:
    """Every tensor torch.load returned is in statemap's view with equal dtype, shape and values."""
    with open_checkpoint(path) as ck:
        assert set(ck.metas) == set(expected), (sorted(ck.metas), sorted(expected))
        for k, t in expected.items():
            assert ck.metas[k].dtype == str(t.dtype).removeprefix("torch."), k
            assert ck.metas[k].shape == tuple(t.shape), k
            got = torch.from_numpy(np.array(ck.read(k))).view(t.dtype).reshape(t.shape)
            assert torch.equal(got, t), k


# -- 1. protocol-2 compatibility names -----------------------------------------------------------


def test_compat_names_follow_the_stdlib_table_exactly():
    for (m, n), want in _compat_pickle.NAME_MAPPING.items():
        assert compat_name(m, n, 2) == want
    for m, want in _compat_pickle.IMPORT_MAPPING.items():
        if not any(k[0] == m for k in _compat_pickle.NAME_MAPPING):
            assert compat_name(m, "X", 2) == (want, "X")
    assert compat_name("__builtin__", "long", 3) == ("__builtin__", "long")  # protocol >= 3: no mapping, as in Python


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_torch_save_protocols_read_like_torch_load(tmp_path, protocol):
    torch.manual_seed(protocol)
    model = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3).double(), "n": torch.tensor([1, 2], dtype=torch.int64)}
    meta = {"types": [int, str, range], "r": range(3), "big": 2**70, "text": "größe", "raw": b"\x00\xff", "e": ValueError("x")}
    path = tmp_path / f"p{protocol}.pt"
    torch.save({"model": model, "meta": meta}, path, pickle_protocol=protocol)
    back = torch.load(path, weights_only=False)  # our own file, written just above
    _assert_same_tensors(path, back["model"])
    with open_checkpoint(path) as ck:
        got = ck.extras["meta"]
    assert got["big"] == back["meta"]["big"] and got["text"] == back["meta"]["text"]
    assert got["types"] == [int, str, range] and got["r"] == range(3)


@pytest.mark.parametrize("protocol", [2, 4])
def test_omegaconf_dictconfig_written_by_torch_save(protocol):
    """omegaconf configs (fairseq, NeMo, Hydra) pickled by torch.save; expected values from torch.load."""
    path = FIX / f"omegaconf_p{protocol}.pt"
    expected = json.loads((FIX / f"omegaconf_p{protocol}.expected.json").read_text())
    with open_checkpoint(path) as ck:
        assert ck.container == "model"
        assert set(ck.metas) == set(expected["tensors"])
        for k, t in expected["tensors"].items():
            assert (ck.metas[k].dtype, list(ck.metas[k].shape)) == (t["dtype"], t["shape"])
            assert _values(ck, k) == t["values"]
        assert ck.extras["cfg"] == expected["cfg"]
        assert ck.extras["lst"] == expected["lst"]
        assert ck.extras["n"] == expected["n"] == 2**70
    # the comparison can fail: a changed value is noticed
    assert {**expected["cfg"], "big": 1} != expected["cfg"]


def test_protocol2_code_names_are_still_refused(tmp_path):
    data = b"\x80\x02}X\x01\x00\x00\x00wc__builtin__\neval\nX\x01\x00\x00\x001\x85Rs."
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load '__builtin__\.eval'"):
        safe_load(data, "x.pkl")
    data = b"\x80\x02}X\x01\x00\x00\x00wc__builtin__\nreduce\nX\x01\x00\x00\x001\x85Rs."  # -> functools.reduce
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load '__builtin__\.reduce'"):
        safe_load(data, "x.pkl")


@pytest.mark.parametrize("protocol", [0, 1])
def test_protocol0_pickle_with_copy_reg_names(protocol):
    import argparse

    obj = {"w": np.arange(4, dtype=np.float32), "args": argparse.Namespace(lr=0.5, name="x"), "n": 5}
    data = pickle.dumps(obj, protocol=protocol)
    assert b"copy_reg" in data and b"__builtin__" in data
    got, _ = safe_load(data, "x.pkl")
    assert to_plain(got)["args"] == {"lr": 0.5, "name": "x"}
    assert got["n"] == 5 and got["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
