"""Flax msgpack: a file written by the real flax serializer reads right without jax; files
statemap writes are read back by flax itself."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import statemap
from statemap import CheckpointError, open_checkpoint
from statemap.torch_adapter import to_torch

FIX = "tests/fixtures/flax"


def test_reads_flax_written_tree_without_jax(root):
    expected = np.load(root / FIX / "expected.npz")
    dtypes = json.loads((root / FIX / "expected.json").read_text())
    code = (
        "import sys, statemap\n"
        f"ck = statemap.open_checkpoint(r'{root / FIX / 'tree.msgpack'}')\n"
        "print(sorted(ck.metas))\n"
        "assert 'jax' not in sys.modules and 'flax' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open_checkpoint(root / FIX / "tree.msgpack") as ck:
        assert ck.format == "flax-msgpack" and ck.container == ""
        assert sorted(ck.metas) == sorted(expected.files)
        for k in expected.files:
            assert ck.metas[k].dtype == dtypes[k], k
            got = to_torch(ck.read(k), ck.metas[k].dtype)
            assert np.array_equal(got.double().numpy(), expected[k]), k
    assert ck.metas["big"].shape == (8, 5)  # stored chunked by flax


def test_written_msgpack_is_read_by_flax(tmp_path):
    import flax.serialization as fs  # the real reader checks the file statemap wrote

    sd = {
        "params.encoder.0.kernel": torch.randn(3, 4),
        "params.encoder.0.bias": torch.randn(4).bfloat16(),
        "params.step": torch.tensor(7, dtype=torch.int32),
    }
    statemap.save_state_dict(sd, tmp_path / "flax_model.msgpack")
    tree = fs.msgpack_restore((tmp_path / "flax_model.msgpack").read_bytes())
    assert np.array_equal(np.asarray(tree["params"]["encoder"]["0"]["kernel"]), sd["params.encoder.0.kernel"].numpy())
    assert str(tree["params"]["encoder"]["0"]["bias"].dtype) == "bfloat16"
    assert np.array_equal(
        np.asarray(tree["params"]["encoder"]["0"]["bias"], dtype=np.float32), sd["params.encoder.0.bias"].float().numpy()
    )
    assert int(tree["params"]["step"]) == 7


def test_name_that_is_both_module_and_tensor_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"'a' is both a tensor and a module"):
        statemap.save_state_dict({"a": torch.zeros(1), "a.b": torch.zeros(1)}, tmp_path / "x.msgpack")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x93\x01\x02\x03", r"top level is a list, not a map of parameters"),
        (b"\x81\xa1a\xc7\x03\x05abc", r"unsupported msgpack extension type 5"),
        (b"\x81\xa1a\xc7\x05\x01\x93\x91\x03\xa3f32", r"malformed array record|not a valid Flax msgpack"),
        (b"\xde\xff", r"not a valid Flax msgpack file"),
    ],
)
def test_malformed_msgpack(tmp_path, data, message):
    (tmp_path / "bad.msgpack").write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / "bad.msgpack")
