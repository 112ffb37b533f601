"""The transpose kernels (statemap.xpose): blocked, two-threaded and read-fused transposes write
exactly the bytes of numpy's own ``swapaxes`` copy, for every storage dtype and awkward shape."""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref

import numpy as np
import pytest

import statemap
import statemap.apply
import statemap.buffers
import statemap.write
import statemap.xpose as xp
from statemap.api import plan_for
from statemap.dtypes import dtype as lookup_dtype
from statemap.errors import CheckpointError
from statemap.load import open_checkpoint
from statemap.meta import TensorMeta
from statemap.write import write_checkpoint

# storage dtypes: bf16 travels as uint16 bits, fp8 as uint8, bool / ints / floats as themselves
DTYPES = ["float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "int64", "bool", "uint8"]
SHAPES = [(1, 1), (1, 37), (37, 1), (17, 33), (16, 16), (33, 17), (40, 1000), (3, 5, 7), (2, 1, 9), (4, 33, 18)]


def _random(shape: tuple[int, ...], name: str, rng: np.random.Generator) -> np.ndarray:
    dt = lookup_dtype(name).np
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    a = raw.view(dt).reshape(shape)
    return a if name != "bool" else (a.view(np.uint8) & 1).astype(bool)


def _expected(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_blocked_transpose_equals_numpy(name, shape):
    a = _random(shape, name, np.random.default_rng(len(shape) * 100 + shape[-1]))
    got = xp.transpose_last_two(a)
    assert got.flags.c_contiguous and got.dtype == a.dtype
    assert got.shape == _expected(a).shape and got.tobytes() == _expected(a).tobytes()


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (37, 1), (300, 77), (2, 65, 31)], ids=str)
def test_read_transposed_equals_numpy(tmp_path, name, shape, monkeypatch):
    monkeypatch.setattr(xp, "CHUNK", 256)  # many small preads: chunk edges inside and across blocks
    a = _random(shape, name, np.random.default_rng(7))
    p = tmp_path / "t.bin"
    p.write_bytes(b"x" * 13 + a.tobytes() + b"tail")  # an odd offset, bytes after the tensor
    fd = os.open(p, os.O_RDONLY)
    try:
        got = xp.read_transposed(fd, 13, shape, a.dtype, str(p))
    finally:
        os.close(fd)
    assert got.tobytes() == _expected(a).tobytes() and got.shape == _expected(a).shape


@pytest.mark.parametrize("rows,cols", [(512, 1030), (1030, 512), (64, 16385)])
def test_two_threads_write_the_same_bytes(tmp_path, monkeypatch, rows, cols):
    """Large enough to be split over two threads (rows not a multiple of the block); forced on."""
    monkeypatch.setattr(xp, "PARALLEL_MIN", 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    a = np.random.default_rng(1).random((rows, cols), dtype=np.float32)
    assert xp.transpose_last_two(a).tobytes() == _expected(a).tobytes()
    p = tmp_path / "t.bin"
    p.write_bytes(a.tobytes())
    fd = os.open(p, os.O_RDONLY)
    try:
        assert xp.read_transposed(fd, 0, (rows, cols), np.float32).tobytes() == _expected(a).tobytes()
    finally:
        os.close(fd)


def test_the_comparison_can_fail():
    """The checks above compare bytes: a kernel that skips one block would be caught."""
    a = np.random.default_rng(2).random((40, 70), dtype=np.float32)
    wrong = xp.transpose_last_two(a)
    wrong[:, 16:32] = 0
    assert wrong.tobytes() != _expected(a).tobytes()
    assert xp.transpose_last_two(a).tobytes() != a.tobytes()  # a transpose is not the identity copy


def test_parts_are_shared_and_a_helper_threads_error_is_raised(monkeypatch):
    calls = []

    def work(r0, r1):
        calls.append((r0, r1))

    xp._split(100, 2, 16, work)  # two threads take 16-row parts as they go: each part once
    assert sorted(calls) == [(i, min(i + 16, 100)) for i in range(0, 100, 16)]

    def bad(r0, r1):
        if r0 == 32:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        xp._split(100, 2, 16, bad)


def test_the_helper_thread_is_kept_between_matrices_and_ends_when_idle(monkeypatch):
    monkeypatch.setattr(xp._Helper, "IDLE", 0.3)
    seen: list[threading.Thread] = []
    lock = threading.Lock()
    me = threading.current_thread()

    def work(r0: int, r1: int) -> None:
        with lock:
            seen.append(threading.current_thread())
        time.sleep(0.002)  # both threads get parts

    for _ in range(3):
        xp._split(160, 2, 16, work)
    helpers = {t for t in seen if t is not me}
    assert len(helpers) == 1  # one helper thread served all three matrices
    (helper,) = helpers
    assert helper.is_alive() and helper.daemon
    helper.join(5)
    assert not helper.is_alive()  # gone after IDLE without work
    xp._split(160, 2, 16, work)  # and a new one starts when needed
    assert len({t for t in seen if t is not me}) == 2


class _Held:
    pass


@pytest.mark.parametrize("helper_busy", [False, True])
def test_no_thread_holds_the_callers_work_once_split_returns(monkeypatch, helper_busy):
    """What a matrix's work refers to (its output array) is the caller's alone when _split returns:
    the helper let go of the job before saying it is done (it kept a transposed 8 MiB tensor alive
    until the next matrix otherwise)."""
    if helper_busy:
        monkeypatch.setattr(xp._helper, "busy", True)  # the part goes to a thread of its own
    held = _Held()
    ref = weakref.ref(held)

    def work(r0: int, r1: int, held: _Held = held) -> None:
        time.sleep(0.001)

    xp._split(160, 2, 16, work)
    del work, held
    assert ref() is None


def test_callers_at_once_each_get_their_matrix(monkeypatch):
    monkeypatch.setattr(xp, "PARALLEL_MIN", 1)
    rng = np.random.default_rng(3)
    mats = [rng.random((257, 129), dtype=np.float32) for _ in range(4)]
    got: list[np.ndarray | None] = [None] * 4

    def one(k: int) -> None:
        got[k] = xp.transpose_last_two(mats[k])

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for m, g in zip(mats, got):
        assert g is not None and np.array_equal(g, m.T)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_starts_its_own_helper(monkeypatch):
    monkeypatch.setattr(xp, "PARALLEL_MIN", 1)
    a = np.arange(300 * 70, dtype=np.float32).reshape(300, 70)
    xp.transpose_last_two(a)  # the parent's helper is running
    pid = os.fork()
    if pid == 0:  # the child: no helper thread exists here, one must be started
        ok = np.array_equal(xp.transpose_last_two(a), a.T)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda fd: xp.read_transposed(fd, 0, (8, 8), np.float32, "t.bin"), r"t\.bin: tensor data runs past the end"),
        (lambda fd: xp.read_transposed(fd, 0, (8,), np.float32), "at least 2 dims"),
        (lambda fd: xp.transpose_last_two(np.zeros(3)), "at least 2 dims"),
        (lambda fd: xp.transpose_last_two(np.zeros((2, 3)), out=np.zeros((2, 3))), "out must be"),
    ],
)
def test_bad_inputs(tmp_path, call, match):
    p = tmp_path / "t.bin"
    p.write_bytes(bytes(100))  # 25 floats: an 8 x 8 tensor runs past the end
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises((CheckpointError, ValueError), match=match):
            call(fd)
    finally:
        os.close(fd)


def test_swaps_last_two():
    assert xp.swaps_last_two((1, 0)) and xp.swaps_last_two((0, 1, 3, 2))
    assert not any(xp.swaps_last_two(a) for a in [(0, 1), (2, 1, 0), (1, 0, 2), (0,), ()])


def test_convert_uses_the_fused_read_and_matches_in_memory(tmp_path, monkeypatch):
    """A file conversion transposes straight from the file (the fused path runs), and its output
    equals map_state_dict's in-memory result, for fp32, bf16 (as stored bits) and a 3-D `dims`."""
    rng = np.random.default_rng(3)
    sd = {
        "a": rng.random((70, 33), dtype=np.float32),
        "b": rng.integers(0, 1 << 16, (19, 50), dtype=np.uint16),
        "c": rng.random((3, 20, 9), dtype=np.float32),
    }
    metas = [TensorMeta("a", (70, 33), "float32"), TensorMeta("b", (19, 50), "bfloat16"), TensorMeta("c", (3, 20, 9), "float32")]
    write_checkpoint(tmp_path / "s.safetensors", metas, [sd["a"], sd["b"], sd["c"]], fsync=False)
    spec = {
        "name": "t",
        "version": 1,
        "rules": [{"transpose": "a"}, {"transpose": "b"}, {"transpose": {"from": "c", "dims": [1, 2]}}],
    }
    used = []
    real = xp.read_transposed
    monkeypatch.setattr("statemap.apply.read_transposed", lambda *a, **k: used.append(a[2]) or real(*a, **k))
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.safetensors", fsync=False)
    assert sorted(used) == [(3, 20, 9), (19, 50), (70, 33)]
    with open_checkpoint(tmp_path / "o.safetensors") as ck:
        got = {k: ck.read(k) for k in ck.metas}
        assert ck.metas["b"].dtype == "bfloat16" and ck.metas["b"].shape == (50, 19)
    assert got["a"].tobytes() == sd["a"].T.tobytes()
    assert got["b"].tobytes() == np.ascontiguousarray(sd["b"].T).tobytes()
    assert got["c"].tobytes() == np.ascontiguousarray(sd["c"].transpose(0, 2, 1)).tobytes()
    with open_checkpoint(tmp_path / "s.safetensors") as ck:  # the in-memory path, from the same source
        mem = dict(statemap.apply.execute(plan_for(statemap.load_spec(spec), ck).outputs, ck.read))
    assert {o.name: a.tobytes() for o, a in mem.items()} == {k: v.tobytes() for k, v in got.items()}


def test_output_pool_reuses_only_buffers_nothing_refers_to(monkeypatch):
    """A pooled buffer is handed out again only when no array or view made from it is alive:
    an array still held keeps its bytes (fails for a pool that ignores references)."""
    monkeypatch.setattr(xp.OutputPool, "MIN", 64)
    pool = xp.OutputPool(limit=2)
    a = pool.take((8, 8), np.float32)
    a[...] = 1
    b = pool.take((8, 8), np.float32)  # a is alive: another buffer
    assert not np.shares_memory(a, b)
    b[...] = 2
    view = a[2:]  # a view keeps a's buffer busy too
    del a
    c = pool.take((8, 8), np.float32)  # both busy, pool full: a fresh, unpooled array
    assert not np.shares_memory(c, view) and not np.shares_memory(c, b) and len(pool.bufs) == 2
    c[...] = 3
    assert (view == 1).all() and (b == 2).all()
    del view
    d = pool.take((4, 16), np.float32)  # a's buffer is free now: reused, any shape of that size
    assert d.shape == (4, 16) and d.flags.c_contiguous and (d == 1).all()
    assert pool.take((2, 3), np.float32).base is None  # under MIN bytes: never pooled


def test_output_pool_check_can_fail(monkeypatch):
    """Handing out a buffer that is still in use (as a pool without the reference check would)
    changes an array someone holds: the check above would notice."""
    monkeypatch.setattr(xp.OutputPool, "MIN", 64)
    pool = xp.OutputPool(limit=1)
    a = pool.take((8, 8), np.float32)
    a[...] = 1
    monkeypatch.setattr(statemap.buffers, "free_refcount", lambda: 10**9)  # a broken check: every buffer looks free
    monkeypatch.setattr(sys, "getrefcount", lambda x: 10**9)
    b = pool.take((8, 8), np.float32)
    b[...] = 2
    assert np.shares_memory(a, b) and (a == 2).all()


def test_streamed_transposes_reuse_memory_and_write_the_same_bytes(tmp_path, monkeypatch):
    """A conversion's transposes go into pooled memory (fewer allocations than tensors) and the
    file equals the in-memory result, tensor by tensor."""
    monkeypatch.setattr(xp.OutputPool, "MIN", 1024)
    # the producer thread computes only the tensor the writer asks for (no running ahead), so
    # which buffers are free again does not depend on how the two threads are scheduled: with
    # the default 32 MB ahead, a busy machine let it compute all nine first (nine allocations)
    monkeypatch.setattr(statemap.write._Ahead, "LIMIT", 0)
    rng = np.random.default_rng(11)
    sd = {f"m.{i}.w": rng.random((48, 40 + 8 * (i % 3)), dtype=np.float32) for i in range(9)}
    metas = [TensorMeta(k, v.shape, "float32") for k, v in sd.items()]
    write_checkpoint(tmp_path / "s.safetensors", metas, list(sd.values()), fsync=False)
    made: list[int] = []
    real_empty = np.empty

    def counting_empty(shape, dtype=float, *a, **k):
        if dtype is np.uint8:
            made.append(1)
        return real_empty(shape, dtype, *a, **k)

    monkeypatch.setattr(np, "empty", counting_empty)
    spec = {"name": "t", "version": 1, "rules": [{"transpose": "m.{i}.w"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.safetensors", fsync=False)
    monkeypatch.setattr(np, "empty", real_empty)
    assert 1 <= len(made) < len(sd)
    with open_checkpoint(tmp_path / "o.safetensors") as ck:
        for k, v in sd.items():
            assert ck.read(k).tobytes() == np.ascontiguousarray(v.T).tobytes(), k
