"""Transposes at memory speed: cache-blocked, split over two threads, fused with the read.

numpy's copy of a transposed view walks one side with a large stride and is not cache-blocked
(~1 GB/s here for a 16 MB fp32 matrix). These kernels copy 16 source rows at a time (each
block's reads and writes stay in L1/L2: 2-3x faster), let a second thread take half the rows
of a large matrix (numpy releases the GIL while copying), and, for a tensor stored in a file,
read its rows with ``pread`` in chunks that stay in cache and transpose each chunk at once,
instead of reading the whole tensor into memory first (one pass over memory fewer).

Every kernel writes exactly the bytes of ``np.ascontiguousarray(np.swapaxes(a, -1, -2))``;
arrays are in storage form (bfloat16 as uint16, float8 as uint8: only bytes move).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .buffers import BufferPool
from .errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OutputPool", "read_transposed", "swaps_last_two", "transpose_last_two"]

BLOCK = 16  # source rows per block: measured fastest here (16-256 tried) for fp32 and bf16 matrices
CHUNK = 256 << 10  # bytes of source rows read per pread in the fused path (fits L2 with its transpose)
PARALLEL_MIN = 4 << 20  # matrices smaller than this (bytes) are transposed on the calling thread only


def swaps_last_two(axes: tuple[int, ...]) -> bool:
    """Whether ``axes`` keeps every leading dim in place and swaps the last two.

    Example::

        >>> swaps_last_two((1, 0)), swaps_last_two((0, 2, 1)), swaps_last_two((2, 1, 0))
        (True, True, False)
    """
    n = len(axes)
    return n >= 2 and tuple(axes[:-2]) == tuple(range(n - 2)) and tuple(axes[-2:]) == (n - 1, n - 2)


def _threads(nbytes: int) -> int:
    return 2 if nbytes >= PARALLEL_MIN and (os.cpu_count() or 1) > 1 else 1


def _rows_into(src: Any, out: Any, at: int) -> None:
    """``out[:, at : at + len(src)] = src.T`` in blocks of :data:`BLOCK` rows (2-D arrays)."""
    rows = src.shape[0]
    for i in range(0, rows, BLOCK):
        e = min(i + BLOCK, rows)
        out[:, at + i : at + e] = src[i:e].T


class _Helper:
    """The thread that takes part of each large matrix beside the caller, kept between matrices:
    a thread started per matrix cost ~0.3 ms of the producer's time each (96 matrices in GPT-2
    medium -> nanoGPT: 0.828 -> 0.817 s median of 12 interleaved runs, measured here, within this
    machine's noise; 96 threads fewer started and stopped). It ends
    after :attr:`IDLE` seconds without work (a library call leaves no thread behind for long), is
    a daemon, and is started afresh in a forked child. One caller at a time: while it is busy,
    another caller's part goes to a thread of its own, as before."""

    IDLE = 1.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] | None = None  # the running thread's
        self.busy = False

    def submit(self, job: Callable[[], None], done: threading.Event) -> None:
        """Run ``job`` on the helper thread, or on a new thread while the helper is busy; ``done``
        is set once it has run and the thread no longer refers to it (nor to what it holds)."""
        with self.lock:
            if not self.busy:
                self.busy = True
                if self.jobs is None:
                    self.jobs = queue.SimpleQueue()
                    threading.Thread(target=self._serve, args=(self.jobs,), name="statemap-transpose", daemon=True).start()
                self.jobs.put((job, done))
                return
        threading.Thread(target=self._one, args=([job], done), name="statemap-transpose", daemon=True).start()

    @staticmethod
    def _one(job: list[Callable[[], None]], done: threading.Event) -> None:
        try:
            job.pop()()
        finally:
            done.set()

    def _serve(self, jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]]) -> None:
        while True:
            try:
                job, done = jobs.get(timeout=self.IDLE)
            except queue.Empty:
                with self.lock:  # no job can be put in while this thread decides to end
                    if jobs.empty() and self.jobs is jobs:
                        self.jobs = None
                        return
                continue
            try:
                job()
            finally:
                del job  # it refers to the caller's arrays: they are the caller's alone once done is set
                with self.lock:
                    self.busy = False
                done.set()

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.jobs, self.busy = None, False


_helper = _Helper()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_helper.after_fork)


def _split(rows: int, n: int, step: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(r0, r1)`` over ``rows`` in parts of ``step`` rows (a multiple of :data:`BLOCK`),
    with ``n`` (1 or 2) threads taking the next part as they go: the caller's and the helper
    (:class:`_Helper`; a thread the machine runs late costs its share, not half the matrix). The
    first exception is raised here, after both threads stopped."""
    if n < 2 or rows <= step:
        for r0 in range(0, rows, step):
            work(r0, min(r0 + step, rows))
        return
    parts = itertools.count()  # next() on a count is atomic: each part is taken once
    err: list[BaseException] = []
    helper_done = threading.Event()

    def loop() -> None:
        try:
            while not err:
                r0 = next(parts) * step
                if r0 >= rows:
                    return
                work(r0, min(r0 + step, rows))
        except BaseException as e:  # raised in the caller's thread below
            err.append(e)

    _helper.submit(loop, helper_done)
    try:
        loop()
    finally:
        helper_done.wait()
    if err:
        raise err[0]


def _step(row_bytes: int) -> int:
    """Rows per part: about :data:`CHUNK` bytes of source rows, a multiple of :data:`BLOCK`."""
    return max(BLOCK, CHUNK // max(row_bytes, 1) // BLOCK * BLOCK)


def transpose_last_two(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``np.swapaxes(a, -1, -2)`` as a new C-contiguous array (or written into ``out``), copied in
    cache-sized blocks, large matrices on two threads.

    Example::

        >>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> transpose_last_two(a).tolist()
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """
    import numpy as np

    if a.ndim < 2:
        raise ValueError(f"transpose_last_two needs at least 2 dims, got shape {list(a.shape)}")
    shape = (*a.shape[:-2], a.shape[-1], a.shape[-2])
    if out is None:
        out = np.empty(shape, dtype=a.dtype)
    elif out.shape != shape or out.dtype != a.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {a.dtype} array of shape {list(shape)}")
    if a.size == 0:
        return out
    src = a.reshape(-1, *a.shape[-2:])
    dst = out.reshape(-1, *shape[-2:])
    rows = src.shape[1]
    n = _threads(a.nbytes // len(src))
    step = _step(src.shape[2] * a.itemsize)
    for s, d in zip(src, dst):

        def work(r0: int, r1: int, s: np.ndarray = s, d: np.ndarray = d) -> None:
            _rows_into(s[r0:r1], d, r0)

        _split(rows, n, step, work)
    return out


def read_transposed(
    fd: int, offset: int, shape: tuple[int, ...], dtype: Any, where: str = "", out: np.ndarray | None = None
) -> np.ndarray:
    """The C-contiguous tensor of ``shape`` stored at ``offset`` of ``fd``, with its last two dims
    swapped: its rows are read in cache-sized chunks, each transposed into place right away, on
    two threads for large matrices. Memory: the result plus one chunk per thread. ``out``: a
    C-contiguous array of the result's shape and dtype to write into (e.g. from :class:`OutputPool`).

    ``where`` names the file in errors (a short read: the file was truncated).

    Example::

        >>> np.arange(6, dtype=np.float32).tofile("w.bin")   # a 2 x 3 float32 matrix at offset 0
        >>> fd = os.open("w.bin", os.O_RDONLY)
        >>> read_transposed(fd, 0, (2, 3), np.float32).tolist()
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
        >>> os.close(fd)
    """
    import numpy as np

    dt = np.dtype(dtype)
    if len(shape) < 2:
        raise ValueError(f"read_transposed needs at least 2 dims, got shape {list(shape)}")
    *lead, rows, cols = shape
    want = (*lead, cols, rows)
    if out is None:
        out = np.empty(want, dtype=dt)
    elif out.shape != want or out.dtype != dt or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dt} array of shape {list(want)}")
    if out.size == 0:
        return out
    row_bytes = cols * dt.itemsize
    per = _step(row_bytes)  # rows per pread
    dst = out.reshape(-1, cols, rows)
    n = _threads(rows * row_bytes)
    local = threading.local()  # one read buffer per thread

    def part(base: int, d: np.ndarray) -> Callable[[int, int], None]:
        def work(r0: int, r1: int) -> None:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = np.empty(min(per, rows) * cols, dtype=dt)
            view = buf.data.cast("B")
            k = r1 - r0
            want, got = k * row_bytes, 0
            while got < want:
                m = os.preadv(fd, [view[got:want]], base + r0 * row_bytes + got)
                if m <= 0:
                    raise CheckpointError(f"{where or 'input'}: tensor data runs past the end of the file (truncated?)")
                got += m
            _rows_into(buf[: k * cols].reshape(k, cols), d, r0)

        return work

    for b, d in enumerate(dst):
        _split(rows, n, per, part(offset + b * rows * row_bytes, d))
    return out


class OutputPool:
    """Arrays for computed tensors, reused once nothing else refers to them: a conversion's
    transposes then write into memory that is already mapped, instead of a fresh allocation per
    tensor whose pages the kernel must fault in and zero (1.2 GB of them for GPT-2 medium; the
    transposes took 10-15% less CPU with reuse, measured here). A buffer is free again when
    CPython's reference count says only the pool holds it (no array or view made from it is
    alive: the writer is done with it). At most ``limit`` buffers are kept, each of ``MIN`` to
    ``MAX`` bytes; a buffer serves a tensor of half its size or more. Past that, or when every
    buffer is in use, :meth:`take` allocates as without a pool, so memory in use stays what the
    consumer holds plus the free buffers (at most ``limit``). Drop the pool to free them.

    Example::

        >>> pool = OutputPool()
        >>> a = pool.take((1024, 1024), np.float32)   # 4 MB, pooled
        >>> del a
        >>> b = pool.take((512, 1024), np.float32)    # the same buffer again
    """

    MIN = 1 << 20  # smaller arrays: malloc's arenas reuse their memory anyway
    MAX = 1 << 26  # larger ones are few (embeddings), and would stay in memory beside the next

    def __init__(self, limit: int = 4) -> None:
        self.pool = BufferPool(limit)

    @property
    def bufs(self) -> list[Any]:
        """The kept buffers."""
        return self.pool.bufs

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype``."""
        import numpy as np

        dt = np.dtype(dtype)
        n = 1
        for d in shape:
            n *= d
        nbytes = n * dt.itemsize
        if not self.MIN <= nbytes <= self.MAX:
            return np.empty(shape, dtype=dt)
        return self.pool.take(nbytes).view(dt).reshape(shape)
