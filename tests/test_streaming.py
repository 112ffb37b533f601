"""The streaming engine: bounded memory, byte-range copies, same bytes as the in-memory path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from catalog_fixtures import FIXTURES, spec_params
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

import statemap
from statemap.apply import Segments, byte_segments
from statemap.catalog import names
from statemap.load import open_checkpoint


def _bits(a) -> np.ndarray:
    import torch

    if isinstance(a, torch.Tensor):
        return a.contiguous().reshape(-1).view(torch.uint8).numpy() if a.numel() else np.zeros(0, np.uint8)
    return np.asarray(a, order="C").reshape(-1).view(np.uint8)


def test_every_catalog_spec_has_a_streaming_fixture():
    assert sorted(FIXTURES) == names()


@pytest.mark.parametrize("spec", spec_params(sorted(FIXTURES)))
def test_streaming_output_is_bitwise_identical_to_in_memory(tmp_path, spec):
    src, vars_ = FIXTURES[spec](tmp_path)
    out = tmp_path / "streamed.safetensors"
    statemap.convert(spec, src, out, vars=vars_, tied="clone")  # the in-memory dict has every name
    s = statemap.load_spec(spec, vars=vars_)
    if s.inputs is not None:  # several files: one state dict per file, keyed by its capture values
        from statemap.source import open_input
        from statemap.torch_adapter import to_torch

        loaded = {}
        with open_input(src, s.inputs) as ck:
            for k, m in ck.metas.items():
                part, _, key = k.partition("/")
                loaded.setdefault(part, {})[key] = to_torch(ck.read(k), m.dtype)
    else:
        loaded = statemap.load_state_dict(src)
    if s.unwrap:  # the in-memory API takes the inner dict; load_state_dict already unwrapped it
        s = s.__class__(**{**s.__dict__, "unwrap": None})
    in_memory, _ = statemap.map_state_dict(s, loaded)
    streamed = np_load_file(str(out))
    assert set(streamed) == set(in_memory)  # same keys (safetensors stores them sorted)
    for k, v in in_memory.items():
        assert np.array_equal(_bits(streamed[k]), _bits(v)), k


def test_pure_moves_are_byte_ranges_and_computed_ops_are_not(tmp_path):
    np_save_file(
        {"in_proj": np.arange(24, dtype="f4").reshape(6, 4), "w": np.ones((2, 3), "f4")}, str(tmp_path / "a.safetensors")
    )
    spec = {
        "name": "t",
        "version": 1,
        "rules": [
            {"split": {"from": "in_proj", "to": ["q", "k", "v"]}},
            {"merge": {"from": ["k", "v"], "to": "kv"}},
            {"transpose": "w"},
        ],
    }
    with open_checkpoint(tmp_path / "a.safetensors") as ck:
        plan = statemap.make_plan(statemap.load_spec(spec), ck.metas.values())
        segs = {o.name: byte_segments(o.node, ck.locations) for o in plan.outputs}
        base = ck.locations["in_proj"].offset
    assert segs["q"] == [(str(tmp_path / "a.safetensors"), base, 32)]
    assert segs["kv"] == [(str(tmp_path / "a.safetensors"), base + 32, 64)]
    assert segs["w"] is None
    statemap.convert(spec, tmp_path / "a.safetensors", tmp_path / "o.safetensors")
    got = np_load_file(str(tmp_path / "o.safetensors"))
    assert got["kv"].tolist() == np.arange(8, 24, dtype="f4").reshape(4, 4).tolist()
    assert got["w"].shape == (3, 2)
    assert isinstance(Segments(()), Segments)


CHILD = textwrap.dedent(
    """
    import os, resource, sys, threading
    limit = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    threading.stack_size(1 << 20)  # see the test: a thread's stack is address space, not memory used
    import statemap
    spec = {"name": "big", "version": 1, "rules": [
        {"rename": "layers.{i}.fc1.weight -> model.layers.{i}.fc1.weight"},
        {"transpose": {"from": "layers.{i}.fc2.weight", "to": "model.layers.{i}.fc2.weight"}},
        {"split": {"from": "layers.{i}.in_proj", "to": ["model.layers.{i}.q", "model.layers.{i}.k"]}},
    ]}
    statemap.convert(spec, sys.argv[1], sys.argv[2])
    assert "torch" not in sys.modules
    status = open("/proc/self/status").read()
    print("OK", int(status.split("VmHWM:")[1].split()[0]) * 1024)
    """
)


@pytest.mark.parametrize(
    "fmt, out_fmt", [("safetensors", "safetensors"), ("pt", "safetensors"), ("safetensors", "pt"), ("pt", "msgpack")]
)
def test_convert_under_a_memory_limit_smaller_than_the_checkpoint(tmp_path, fmt, out_fmt):
    """12 layers x 3 tensors x 8 MiB = 288 MiB checkpoint; the child may use 240 MiB of address
    space in all, interpreter and numpy included (~105 MiB of it), and its peak RSS is measured.
    Every output format streams: .pt (torch's zip written directly) and Flax .msgpack too."""
    rng = np.random.default_rng(0)
    sd = {}
    for i in range(12):
        sd[f"layers.{i}.fc1.weight"] = rng.random((1024, 2048), dtype=np.float32)
        sd[f"layers.{i}.fc2.weight"] = rng.random((2048, 1024), dtype=np.float32)
        sd[f"layers.{i}.in_proj"] = rng.random((2048, 1024), dtype=np.float32)
    src = tmp_path / f"big.{fmt}"
    if fmt == "safetensors":
        np_save_file(sd, str(src))
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
    size = src.stat().st_size
    limit = 240 << 20
    assert limit < size
    out = tmp_path / f"out.{out_fmt}"
    # RLIMIT_AS counts address space: glibc reserves 64 MiB of it for each malloc arena a thread
    # creates when the others are busy (the writer, its producer, transpose and CRC threads), which
    # depends on timing, not on memory used; two arenas keep the limit about real allocations.
    # Likewise each thread's stack (8 MiB of address space by default: the writer's copy thread,
    # its producer, the transpose and CRC threads) is a reservation; the child gives its threads
    # 1 MiB. Peak RSS (VmHWM) is what is checked below.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), str(out), str(limit)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert "OK" in stdout
    peak_rss = int(stdout.split()[-1])  # VmHWM of the child's own address space
    assert peak_rss < 100 * 2**20 + 8 * 2**20, f"peak RSS {peak_rss >> 20} MiB"  # 100 MiB + largest rewritten tensor
    if out_fmt == "safetensors":
        got = np_load_file(str(out))
    else:
        got = {k: np.asarray(v) for k, v in statemap.load_state_dict(out).items()}
    for i in (0, 11):
        assert np.array_equal(got[f"model.layers.{i}.fc1.weight"], sd[f"layers.{i}.fc1.weight"])
        assert np.array_equal(got[f"model.layers.{i}.fc2.weight"], sd[f"layers.{i}.fc2.weight"].T)
        assert np.array_equal(got[f"model.layers.{i}.k"], sd[f"layers.{i}.in_proj"][1024:])


def _layered(tmp_path):
    rng = np.random.default_rng(1)
    sd = {}
    for i in range(6):
        sd[f"layers.{i}.w"] = rng.random((64, 96), dtype=np.float32)
        sd[f"layers.{i}.b"] = rng.random(96, dtype=np.float32)
    src = tmp_path / "src.safetensors"
    np_save_file(sd, str(src))
    spec = {
        "name": "t",
        "version": 1,
        "rules": [
            {"transpose": {"from": "layers.{i}.w", "to": "L.{i}.kernel"}},
            {"rename": "layers.{i}.b -> L.{i}.bias"},
        ],
    }
    return src, spec


def test_parallel_shard_writers_produce_the_same_files(tmp_path):
    src, spec = _layered(tmp_path)
    (tmp_path / "seq").mkdir()
    (tmp_path / "par").mkdir()
    r1 = statemap.convert(spec, src, tmp_path / "seq" / "model.safetensors", max_shard_size="60KB")
    r2 = statemap.convert(spec, src, tmp_path / "par" / "model.safetensors", max_shard_size="60KB", workers=2)
    assert len(r1.files) == len(r2.files) >= 4
    for a, b in zip(sorted(r1.files), sorted(r2.files)):
        assert open(a, "rb").read() == open(b, "rb").read(), (a, b)  # byte-identical shards and index


def test_a_failing_worker_leaves_no_output(tmp_path, monkeypatch):
    """A worker that fails (here: its copy of the source is truncated) fails the whole write."""
    import shutil

    import statemap.api as api_mod

    src, spec = _layered(tmp_path)
    broken = tmp_path / "broken.safetensors"
    shutil.copy(src, broken)
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size - 1000)
    real = api_mod._Producer.__getstate__

    def to_broken(self):
        return {**real(self), "source": str(broken)}

    monkeypatch.setattr(api_mod._Producer, "__getstate__", to_broken)  # what the spawned workers receive
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(statemap.CheckpointError, match=r"broken\.safetensors: .*truncated"):
        statemap.convert(spec, src, out / "model.safetensors", max_shard_size="60KB", workers=2)
    assert list(out.iterdir()) == []


def test_parallel_writers_are_safe_in_a_threaded_parent(tmp_path):
    """torch and jax start threads; forking such a process can deadlock. Workers are spawned."""
    import threading

    import torch

    torch.ones(2) @ torch.ones(2)  # torch's thread pools are up
    assert threading.active_count() >= 1
    src, spec = _layered(tmp_path)
    r = statemap.convert(spec, src, tmp_path / "model.safetensors", max_shard_size="60KB", workers=2)
    assert len(r.files) >= 4
