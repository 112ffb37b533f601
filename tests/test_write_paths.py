"""The fast paths of the writer: adjacent byte ranges joined into one kernel copy, header padding
that keeps large copies page-aligned with their source, and the next tensor produced on a thread
while the current one is written (at most two alive)."""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import statemap
import statemap.write as w
from statemap.meta import TensorMeta


def _count_copies(monkeypatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    real = os.copy_file_range

    def spy(src, dst, count, offset_src=None, *a):
        calls.append((count, offset_src))
        return real(src, dst, count, offset_src, *a)

    monkeypatch.setattr(os, "copy_file_range", spy)
    return calls


def test_adjacent_ranges_are_one_kernel_copy(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    sd = {f"l.{i}.w": rng.random((64, 64), dtype=np.float32) for i in range(10)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    calls = _count_copies(monkeypatch)
    spec = {"name": "t", "version": 1, "rules": [{"rename": "l.{i}.w -> m.{i}.w"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.safetensors", fsync=False)
    assert len(calls) == 1 and calls[0][0] == 10 * 64 * 64 * 4  # ten adjacent tensors: one copy
    got = load_file(str(tmp_path / "o.safetensors"))
    assert all(np.array_equal(got[f"m.{i}.w"], sd[f"l.{i}.w"]) for i in range(10))


def test_a_transpose_between_ranges_splits_the_copy(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    sd = {"a": rng.random((8, 4), dtype=np.float32), "b": rng.random((4, 2), dtype=np.float32)}
    sd["c"] = rng.random(5, dtype=np.float32)
    save_file(sd, str(tmp_path / "s.safetensors"))
    calls = _count_copies(monkeypatch)
    spec = {"name": "t", "version": 1, "rules": [{"transpose": "b"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.safetensors", fsync=False)
    got = load_file(str(tmp_path / "o.safetensors"))
    assert np.array_equal(got["b"], sd["b"].T) and np.array_equal(got["a"], sd["a"]) and np.array_equal(got["c"], sd["c"])
    assert len(calls) == 2  # a, then c (b is computed in between)


def test_header_padding_page_aligns_the_largest_copy(tmp_path):
    """The output header is padded so the 2 MiB tensor sits at its source's offset within a page;
    the file is still a valid safetensors file (the header a multiple of 8 bytes)."""
    rng = np.random.default_rng(2)
    sd = {"small": rng.random(3, dtype=np.float32), "big": rng.random((512, 1024), dtype=np.float32)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    spec = {"name": "t", "version": 1, "rules": [{"rename": "big -> renamed.with.a.long.name.big"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.safetensors", fsync=False)
    with statemap.open_checkpoint(tmp_path / "s.safetensors") as a, statemap.open_checkpoint(tmp_path / "o.safetensors") as b:
        src_off = a.locations["big"].offset
        out_off = b.locations["renamed.with.a.long.name.big"].offset
    assert (src_off - out_off) % 4096 == 0
    header_len = int.from_bytes((tmp_path / "o.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0
    got = load_file(str(tmp_path / "o.safetensors"))
    assert np.array_equal(got["renamed.with.a.long.name.big"], sd["big"]) and np.array_equal(got["small"], sd["small"])


def test_aligned_header_without_ranges_is_the_plain_header():
    metas = [TensorMeta("w", (3,), "float32")]
    from statemap.load.safetensors_format import encode_header

    assert w.aligned_header(metas, {}, None) == encode_header(metas, {})
    assert w.aligned_header(metas, {}, [None]) == encode_header(metas, {})


class _Big(np.ndarray):
    pass


def test_ahead_keeps_order_and_at_most_two_tensors_alive():
    alive: list[weakref.ref] = []
    peak = 0

    def produce():
        nonlocal peak
        for i in range(12):
            gc.collect()
            n_alive = sum(r() is not None for r in alive)
            peak = max(peak, n_alive + 1)
            a = np.full(4, i, np.float32).view(_Big)
            alive.append(weakref.ref(a))
            yield a

    metas = [TensorMeta(f"t{i}", (4,), "float32") for i in range(12)]
    ahead = w._Ahead(produce(), metas)
    got = []
    for _ in range(12):
        a = next(ahead)
        got.append(int(a[0]))
        del a
    ahead.close()
    assert got == list(range(12))
    assert peak <= 2, peak


def test_ahead_makes_large_tensors_wait_and_passes_errors_on(monkeypatch):
    monkeypatch.setattr(w._Ahead, "LIMIT", 8)
    order: list[str] = []

    def produce():
        for i in range(3):
            order.append(f"produce {i}")
            yield i
        raise ValueError("cannot read tensor 3")

    metas = [TensorMeta(f"t{i}", (4,), "float32") for i in range(4)]  # 16 bytes each: over the limit
    ahead = w._Ahead(produce(), metas)
    for i in range(3):
        assert next(ahead) == i
        order.append(f"write {i}")
    with pytest.raises(ValueError, match="cannot read tensor 3"):
        next(ahead)
    ahead.close()
    assert order == ["produce 0", "write 0", "produce 1", "write 1", "produce 2", "write 2"]  # never ahead
