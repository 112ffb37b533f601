"""What `diff --values` does for speed must not change a value: the reused read buffers (a buffer
still referenced is never read into), the block-wise value comparison (the same max and verdict
as over the whole tensor), and OpenBLAS on one thread (restored afterwards)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from statemap.diff import _BLOCK, diff_checkpoints
from statemap.load import open_checkpoint
from statemap.load.checkpoint import _BufferPool, reuse_buffers


def test_pool_never_hands_out_a_buffer_in_use():
    pool = _BufferPool(2)
    a = pool.take(1000)
    b = pool.take(1000)
    assert a.base is not b.base  # a is alive: b gets another buffer
    base_a = id(a.base)  # not the buffer itself: a reference would keep it in use
    del a
    c = pool.take(800)  # a free buffer at least as large is reused
    assert id(c.base) == base_a
    view = c.view(np.uint32)[:10]  # a view keeps its buffer busy
    del c
    d = pool.take(10)
    assert id(d.base) != base_a and d.base is not b.base  # both busy, the pool full: a fresh one
    assert len(pool.bufs) == 2
    del view
    pool.trim()
    assert len(pool.bufs) == 1  # only b's buffer is still in use


def test_big_buffer_is_reused_only_when_free_and_large_enough():
    pool = _BufferPool(2)
    a = pool.take_big(1000)
    base_a = id(a.base)
    b = pool.take_big(900)  # a is alive: a fresh buffer, which becomes the big one
    assert id(b.base) != base_a and len(pool.big) == 1
    base_b = id(b.base)
    del a, b
    c = pool.take_big(900)  # the free big buffer is reused
    assert id(c.base) == base_b
    del c
    d = pool.take_big(2000)  # too small: dropped, a larger one replaces it
    assert pool.big[0].nbytes == 2000 and d.base is pool.big[0]
    pool.trim()
    assert len(pool.big) == 1  # d is alive: kept
    del d
    pool.trim()
    assert pool.big == []


def test_arrays_read_under_the_pool_keep_their_values(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        f"t{i}": rng.standard_normal((512, 800 - 40 * i), dtype=np.float32) for i in range(6)
    }  # 1.6-1.2 MB each, shrinking: each fits the last one's buffer
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with reuse_buffers(2), open_checkpoint(str(path)) as ck:
        held = [ck.read(k) for k in tensors]  # all alive at once: none may be overwritten
        for k, a in zip(tensors, held):
            np.testing.assert_array_equal(a, tensors[k])
        del held
        again = [ck.read(k).copy() for k in reversed(list(tensors))]  # reused buffers: still right
    for k, a in zip(reversed(list(tensors)), again):
        np.testing.assert_array_equal(a, tensors[k])


def test_arrays_read_into_the_big_buffer_keep_their_values(tmp_path, monkeypatch):
    import statemap.load.checkpoint as ckm

    monkeypatch.setattr(ckm, "_POOLED", (1 << 20, (1 << 20) + 1))  # every tensor here is "big"
    rng = np.random.default_rng(2)
    tensors = {f"t{i}": rng.standard_normal((512, 900 - 50 * i), dtype=np.float32) for i in range(4)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with reuse_buffers(2), open_checkpoint(str(path)) as ck:
        first = ck.read("t0")
        second = ck.read("t1")  # t0 still held: not read into its buffer
        np.testing.assert_array_equal(first, tensors["t0"])
        np.testing.assert_array_equal(second, tensors["t1"])
        del first, second
        for k in tensors:  # one at a time: each reuses the free big buffer
            np.testing.assert_array_equal(ck.read(k), tensors[k])


def test_blockwise_value_comparison_matches_the_whole_tensor(tmp_path):
    rng = np.random.default_rng(1)
    n = 3 * _BLOCK + 17
    a = rng.standard_normal(n).astype(np.float32)
    b = a.copy()
    b[2 * _BLOCK + 5] += 0.5  # the largest difference, in the third block
    b[7] += 1e-3
    a[:_BLOCK] = np.nan  # a whole block of NaN against numbers: skipped by nanmax, as over the whole
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    r = diff_checkpoints(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), values=True)
    (v,) = r.values
    whole = np.abs(a.astype(np.float64) - b.astype(np.float64))
    assert v.max_abs == float(np.nanmax(whole))
    assert v.allclose is False  # NaN against numbers, and 0.5 apart
    same = diff_checkpoints(str(tmp_path / "b.safetensors"), str(tmp_path / "b.safetensors"), values=True)
    assert same.values[0].allclose and same.values[0].max_abs == 0.0


def test_all_nan_difference_stays_nan(tmp_path):
    a = np.full(_BLOCK + 3, np.nan, dtype=np.float32)
    b = np.zeros_like(a)
    b[0] = 1.0  # not equal to a: no content match, so the values are compared
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    r = diff_checkpoints(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), values=True)
    assert math.isnan(r.values[0].max_abs) and not r.values[0].allclose


def test_blas_one_thread_restores_and_only_in_the_command_process():
    """OpenBLAS runs on one thread while hashing, in the statemap command's own process only (a
    library call leaves the host's thread count alone), and the count is restored afterwards."""
    import subprocess
    import sys

    code = (
        "import ctypes, numpy\n"
        "from statemap.correspond import _blas_one_thread\n"
        "from statemap.process import mark_command_process\n"
        "libs = sorted({l.split()[-1] for l in open('/proc/self/maps') if 'openblas' in l.lower() and '.so' in l})\n"
        "get = None\n"
        "for p in libs:\n"
        "    lib = ctypes.CDLL(p)\n"
        "    get = getattr(lib, 'scipy_openblas_get_num_threads64_', None) or getattr(lib, 'openblas_get_num_threads', None)\n"
        "    if get is not None: break\n"
        "if get is None: print('none'); raise SystemExit\n"
        "before = get()\n"
        "with _blas_one_thread(): lib_call = get()\n"
        "mark_command_process()\n"
        "with _blas_one_thread(): cmd = get()\n"
        "print(before, lib_call, cmd, get())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    if out == ["none"]:
        pytest.skip("no OpenBLAS loaded by numpy here")
    before, lib_call, cmd, after = map(int, out)
    assert lib_call == before and cmd == 1 and after == before
