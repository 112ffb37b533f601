"""statemap.iter_state_dict: (name, tensor) pairs one at a time, for lazy loaders (vLLM's load_weights)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import statemap
from statemap.load.checkpoint import FileReader

SPEC = {
    "name": "t",
    "version": 1,
    "rules": [
        {"rename": "enc.{i}.w -> model.layers.{i}.weight"},
        {"transpose": {"from": "enc.{i}.fc", "to": "model.layers.{i}.fc.weight"}},
        {"split": {"from": "enc.{i}.qkv", "to": ["model.layers.{i}.q", "model.layers.{i}.k", "model.layers.{i}.v"]}},
        {"rename": "emb -> model.embed.weight"},
        {"tie": {"from": "model.embed.weight", "to": ["model.embed.weight", "lm_head.weight"]}},
    ],
}


def _source(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(3):
        sd[f"enc.{i}.w"] = torch.randn(4, 4, generator=g).to(torch.bfloat16)
        sd[f"enc.{i}.fc"] = torch.randn(6, 4, generator=g)
        sd[f"enc.{i}.qkv"] = torch.randn(9, 4, generator=g)
    sd["emb"] = torch.randn(10, 4, generator=g)
    torch.save(sd, tmp_path / "src.pt")
    return sd


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_from_a_file_values_match_map_state_dict(tmp_path):
    sd = _source(tmp_path)
    want, _ = statemap.map_state_dict(SPEC, sd)
    with statemap.iter_state_dict(SPEC, tmp_path / "src.pt", tied="clone") as it:
        assert len(it) == len(want)
        got = list(it)
    assert [n for n, _ in got] == list(want)
    for name, t in got:
        assert isinstance(t, torch.Tensor) and t.dtype == want[name].dtype and torch.equal(_bits(t), _bits(want[name])), name
    assert torch.equal(dict(got)["model.layers.1.fc.weight"], sd["enc.1.fc"].T)
    # a different source value shows: the comparison can fail
    sd["enc.1.fc"] += 1
    torch.save(sd, tmp_path / "src2.pt")
    got2 = dict(statemap.iter_state_dict(SPEC, tmp_path / "src2.pt"))
    assert not torch.equal(got2["model.layers.1.fc.weight"], want["model.layers.1.fc.weight"])


def test_dedupe_yields_each_tied_group_once(tmp_path):
    _source(tmp_path)
    it = statemap.iter_state_dict(SPEC, tmp_path / "src.pt", tied="dedupe")
    names = [n for n, _ in it]
    assert "model.embed.weight" in names and "lm_head.weight" not in names
    assert it.report.written_once == [["model.embed.weight", "lm_head.weight"]]


def test_reads_happen_only_when_a_tensor_is_asked_for(tmp_path, monkeypatch):
    _source(tmp_path)
    reads: list[int] = []
    real = FileReader.read
    monkeypatch.setattr(FileReader, "read", lambda self, t: reads.append(1) or real(self, t))
    it = statemap.iter_state_dict(SPEC, tmp_path / "src.pt")
    assert reads == []  # planned and checked, nothing read
    name, t = next(it)
    assert len(reads) == 1
    next(it)
    assert len(reads) == 2
    rest = list(it)
    assert len(reads) == 2 + len(rest)
    assert it._closer is None  # exhausted: the file is closed


def test_from_a_torch_state_dict_renames_are_the_same_objects():
    g = torch.Generator().manual_seed(1)
    sd = {"enc.0.w": torch.randn(4, 4, generator=g), "enc.0.fc": torch.randn(6, 4, generator=g)}
    sd["enc.0.qkv"] = torch.randn(9, 4, generator=g)
    sd["emb"] = torch.randn(10, 4, generator=g)
    out = dict(statemap.iter_state_dict(SPEC, sd, tied="clone"))
    assert out["model.layers.0.weight"] is sd["enc.0.w"]
    assert out["model.layers.0.k"].data_ptr() == sd["enc.0.qkv"][3:6].data_ptr()  # a view
    assert torch.equal(out["model.layers.0.fc.weight"], sd["enc.0.fc"].T)
    meta = {k: torch.empty(v.shape, device="meta", dtype=torch.bfloat16) for k, v in sd.items()}
    assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for _, t in statemap.iter_state_dict(SPEC, meta))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "t", "version": 1, "rules": [{"rename": "nothing.here -> x"}]}, r"matched no key"),
        ({"name": "t", "version": 1, "rules": [{"split": {"from": "emb", "to": ["a", "b", "c"]}}]}, r"emb"),
    ],
)
def test_errors_come_before_the_first_tensor(tmp_path, spec, message):
    _source(tmp_path)
    with pytest.raises(statemap.StatemapError, match=message):
        statemap.iter_state_dict(spec, tmp_path / "src.pt")


CHILD = textwrap.dedent(
    """
    import sys, numpy as np, torch, statemap
    spec = {"name": "t", "version": 1, "rules": [
        {"transpose": {"from": "l.{i}.fc", "to": "m.{i}.fc"}}, {"rename": "l.{i}.w -> m.{i}.w"}]}
    it = statemap.iter_state_dict(spec, sys.argv[1])
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here on
    base = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
    total = 0
    for name, t in it:
        total += float(t.reshape(-1)[0])
        del t
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    print("OK", peak - base)
    """
)


def test_iterating_a_big_file_holds_one_tensor_at_a_time(tmp_path):
    """16 tensors x 8 MiB = 128 MiB; the extra peak RSS while iterating stays under 3 tensors."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    sd = {}
    for i in range(8):
        sd[f"l.{i}.fc"] = rng.random((1024, 2048), dtype=np.float32)
        sd[f"l.{i}.w"] = rng.random((2048, 1024), dtype=np.float32)
    save_file(sd, str(tmp_path / "big.safetensors"))
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "big.safetensors")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    extra = int(r.stdout.split()[-1])
    assert extra < 3 * 8 * 2**20, f"extra peak RSS {extra >> 20} MiB for 8 MiB tensors (checkpoint: 128 MiB)"
