"""kernel_copy: copy byte ranges of input files into an output file without passing them through
Python, and the hints that keep the page cache and the disk busy while doing it.

The writers (:mod:`statemap.write`) call :func:`copy_range` for every tensor whose bytes are a
range of an input file. On Linux a range goes through a 256 KiB pipe with ``splice`` (file ->
pipe -> file: the source pages are only referenced, then copied once into the output's page
cache). ``copy_file_range`` moves data through the kernel's own 16-buffer pipe, and where the
source and output offsets differ within a page (every storage of a ``.pt`` zip) it builds the
output's page cache a 4 KiB page at a time. Measured here, DeltaLM's 391 storages (1.45 GB)
into a fresh file, warm memory: 0.45 s through 256 KiB, 0.36-0.39 s through 1 MiB, 0.65 s
through 64 KiB, 0.59-0.68 s with one ``copy_file_range`` per range (``cp`` of the whole file:
0.46 s). 1 MiB is not used: its writes build large folios, each taking a free 2 MiB block, and
on a VM that hands free memory back to its host those blocks fault in the host again; there,
6 interleaved runs of the whole conversion: 256 KiB 0.85 s, 1 MiB 1.24 s, ``copy_file_range``
0.90 s (docs/performance.md, "Tenth run"). Where ``splice`` cannot be used (not Linux, a pipe
that cannot be made 256 KiB, a file system without splice support) ``copy_file_range`` is used,
then ``pread`` / ``write``.

Example::

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "in"), "wb") as f:
    ...     _ = f.write(b"headerPAYLOAD")
    >>> out = os.open(os.path.join(d, "out"), os.O_WRONLY | os.O_CREAT)
    >>> with Sources() as sources:
    ...     copy_range(out, sources, os.path.join(d, "in"), 6, 7)
    >>> os.close(out)
    >>> open(os.path.join(d, "out"), "rb").read()
    b'PAYLOAD'
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .errors import OutputError

__all__ = ["MAX_SOURCE_FDS", "CopyJob", "Sources", "Writeback", "copy_range", "join_ranges", "preallocate", "write_fully"]

MAX_SOURCE_FDS = 64  # input files held open at once while copying tensor bytes
PIPE_BYTES = 256 << 10  # the splice pipe's size (module docstring); under pipe-max-size (1 MiB by default): allowed to anyone
PIPE_MIN = 256 << 10  # a smaller pipe (F_SETPIPE_SZ refused: the user's pipe quota is spent) is no faster than copy_file_range

# a call that fails with one of these says "not supported for these files": the next method is tried
_UNSUPPORTED = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF)


class _Pipe:
    """A pipe of at least PIPE_MIN bytes for ``splice``; empty between calls of :func:`copy_range`."""

    def __init__(self) -> None:
        import fcntl

        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass  # EPERM over the user's pipe quota or pipe-max-size: the size is checked below
            self.size = int(fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


class Sources:
    """The read descriptors of the input files being copied from (at most MAX_SOURCE_FDS open at
    once) and the splice pipe; :meth:`close` (or ``with``) releases them."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self._pipe: _Pipe | None = None
        self.splice = hasattr(os, "splice") and sys.platform.startswith("linux")

    def fd(self, src: str) -> int:
        """A read descriptor for ``src``."""
        fds = self.fds
        if src not in fds:
            while len(fds) >= MAX_SOURCE_FDS:  # many input files (`inputs:`): keep few descriptors open
                os.close(fds.pop(next(iter(fds))))
            fds[src] = os.open(src, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return fds[src]

    def pipe(self) -> _Pipe | None:
        """The splice pipe, made on first use; None where splice is not used."""
        if not self.splice:
            return None
        if self._pipe is None:
            try:
                p = _Pipe()
            except OSError:  # out of descriptors or no pipes: copy_file_range does without
                self.splice = False
                return None
            if p.size < PIPE_MIN:
                p.close()
                self.splice = False
                return None
            self._pipe = p
        return self._pipe

    def drop_pipe(self) -> None:
        """Forget the pipe (it may hold bytes of a copy that failed half way)."""
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    def close(self) -> None:
        self.drop_pipe()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def sync_file_range() -> Callable[..., int] | None:
    """libc's ``sync_file_range`` (Linux), or None where it does not exist."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


EXT4_MAGIC = 0xEF53
FALLOC_FL_KEEP_SIZE = 1


@functools.cache
def libc_fallocate() -> tuple[Callable[..., int], Callable[..., int]] | None:
    """libc's ``fallocate`` and ``fstatfs`` (Linux), or None where they do not exist."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fallocate, fstatfs = libc.fallocate, libc.fstatfs
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
    fstatfs.restype = ctypes.c_int
    return fallocate, fstatfs


def preallocate(fd: int, size: int) -> None:
    """Reserve the disk blocks of the ``size`` bytes about to be written to ``fd`` (a new file on
    ext4), without changing its size (``FALLOC_FL_KEEP_SIZE``: the file grows only as bytes are
    written). Measured here: copying DeltaLM's 391 storages into a preallocated file takes
    0.47-0.50 s instead of 0.58-0.63 s with ``copy_file_range`` (ext4 then skips its per-page
    delayed-allocation work).

    Only a hint: elsewhere (other file systems, not Linux) or on any error nothing happens. Never
    glibc's ``posix_fallocate``, which writes zeros where the file system cannot preallocate."""
    fns = libc_fallocate()
    if fns is None or size <= 0:
        return
    import ctypes

    fallocate, fstatfs = fns
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type (a C long) comes first
    if fstatfs(fd, buf) != 0 or ctypes.c_long.from_buffer(buf).value != EXT4_MAGIC:
        return
    fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, size)  # a hint: errors (e.g. ENOSPC, checked before) ignored


class Writeback:
    """Starts the disk writing an output's bytes while later bytes are still being copied, so
    the final ``fsync`` waits only for the last few: measured here, ``fsync`` of a 1.46 GB file
    written without it took 0.6-1.1 s after the copy; with it the copy and the disk overlap.

    Only a hint (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which waits for nothing and never
    reports success): durability still comes from the ``fsync`` before the rename. A no-op
    without ``fsync`` (``--no-fsync`` leaves writing to the kernel) or where the call is missing."""

    STEP = 32 << 20  # start writing once this many new bytes are in the page cache

    def __init__(self, fd: int, enabled: bool = True, start: int = 0) -> None:
        self.fd = fd
        self.fn = sync_file_range() if enabled else None
        self.started = start  # the bytes of this region before this offset are already on their way to the disk

    def kick(self, pos: int | None = None) -> None:
        """``pos``: where the bytes written so far end (the file position when None). A writer that
        fills one region of the file in order has a Writeback of its own, started at the region."""
        if self.fn is None:
            return
        if pos is None:
            pos = os.lseek(self.fd, 0, os.SEEK_CUR)
        if pos - self.started >= self.STEP:
            self.fn(self.fd, self.started, pos - self.started, _SYNC_FILE_RANGE_WRITE)  # a hint: errors ignored
            self.started = pos


WRITE_STEP = 256 << 10  # bytes per write() call (see write_fully)


def write_fully(fd: int, data: Any, at: int | None = None) -> int:
    """Write all of ``data`` to ``fd`` at ``at`` (the file position when None),
    :data:`WRITE_STEP` bytes per call; return its length.

    Whole tensors per call (16 MB for GPT-2 medium's MLP weights) made the kernel build the
    output's page cache from large folios, each taking a free 2 MiB block; on this machine kind (a
    VM whose free memory is handed back to the host) those blocks are the ones the host must fault
    in again. Measured here, GPT-2 medium -> nanoGPT, 6 interleaved runs each: 1.99 s median with
    whole tensors, 1.05 s with 1 MiB per call, 1.09 s with 256 KiB, 1.28 s with 64 KiB (``cp``
    0.51 s); 256 KiB as for the splice pipe, where 1 MiB lost (module docstring)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        part = view[done : done + WRITE_STEP]
        k = os.write(fd, part) if at is None else os.pwrite(fd, part, at + done)
        if k <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += k
    return done


def _splice(sources: Sources, pipe: _Pipe, fd_in: int, fd_out: int, offset: int, n: int, at: int | None) -> int:
    """Move up to ``n`` bytes of ``fd_in`` at ``offset`` to ``fd_out`` at ``at`` (its position when
    None) through ``pipe``; return how many (0 at the end of the input). Raises OSError(EINVAL...)
    with the pipe empty when the files do not support splice; on any other failure the pipe is
    dropped."""
    k = os.splice(fd_in, pipe.w, min(n, pipe.size), offset_src=offset)
    moved = 0
    try:
        while moved < k:
            moved += os.splice(pipe.r, fd_out, k - moved, offset_dst=None if at is None else at + moved)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            sources.drop_pipe()
            raise
        while moved < k:  # the output does not take splice: hand over what the pipe holds, then stop using it
            data = os.read(pipe.r, k - moved)
            write_fully(fd_out, data, None if at is None else at + moved)
            moved += len(data)
        sources.splice = False
    except BaseException:
        sources.drop_pipe()
        raise
    return k


def copy_range(
    fd_out: int, sources: Sources, src: str, offset: int, n: int, wb: Writeback | None = None, at: int | None = None
) -> None:
    """Copy ``n`` bytes of ``src`` at ``offset`` to ``fd_out`` at ``at`` (at its position, which
    moves on, when None), in the kernel when possible (splice, else copy_file_range, else pread /
    write).

    With an active ``wb``, in steps of :attr:`Writeback.STEP` bytes, each handed to the disk
    as soon as it is copied."""
    fd_in = sources.fd(src)
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    step = Writeback.STEP if wb is not None and wb.fn is not None else 1 << 30
    while done < n:
        chunk = min(n - done, step)
        dst = None if at is None else at + done
        pipe = sources.pipe()
        k = 0
        if pipe is not None:
            try:
                k = _splice(sources, pipe, fd_in, fd_out, offset + done, chunk, dst)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                sources.splice = False  # the input does not give splice its pages: nothing was moved
                continue
        elif use_cfr:
            try:
                k = os.copy_file_range(fd_in, fd_out, chunk, offset + done, dst)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                use_cfr = False
                continue
        else:
            data = os.pread(fd_in, min(chunk, 64 << 20), offset + done)
            if data:
                write_fully(fd_out, data, dst)
            k = len(data)
        if k == 0:
            raise OutputError(f"{src}: ended early while copying tensor bytes (file changed or truncated?)")
        done += k
        if wb is not None:
            wb.kick(None if at is None else at + done)


def join_ranges(ranges: Iterable[tuple[str, int, int, int]]) -> list[tuple[str, int, int, int]]:
    """``(src, offset, n, at)`` ranges (``n`` bytes of ``src`` at ``offset`` go to ``at``), each
    that continues the previous one in both files joined to it, empty ones left out: adjacent
    tensors of one source file become one kernel copy.

    Example::

        >>> join_ranges([("a", 0, 8, 100), ("a", 8, 4, 108), ("a", 20, 4, 112), ("b", 0, 0, 116)])
        [('a', 0, 12, 100), ('a', 20, 4, 112)]
    """
    out: list[tuple[str, int, int, int]] = []
    for src, off, n, at in ranges:
        if not n:
            continue
        if out:
            s0, o0, n0, a0 = out[-1]
            if s0 == src and o0 + n0 == off and a0 + n0 == at:
                out[-1] = (s0, o0, n0 + n, a0)
                continue
        out.append((src, off, n, at))
    return out


class CopyJob:
    """Copies ``(src, offset, n, at)`` ranges into ``fd_out`` at their places, in order: a
    :attr:`STEP` at a time in the caller's thread (:meth:`step`), all at once (:meth:`run`), or on
    a thread (:meth:`start`) while the caller writes other parts of the file. The region the
    ranges fill is handed to the disk as it is copied with ``fsync`` (a :class:`Writeback` from
    ``start``).

    A writer that waits for computed tensors (transposes) copies with :meth:`step` while it
    waits: one thread writes the file, so copies and writes no longer queue on the output's inode
    lock, and no thread is started (GPT-2 medium -> nanoGPT, measured here in docs/performance.md,
    "Eleventh run"). Where nothing produces beside the writer (a ``--workers`` shard computes its
    tensors in the writer's own thread) the copy runs on a thread instead. Stop with
    :meth:`cancel` (a thread returns within one piece of :attr:`PIECE` bytes) or end with
    :meth:`finish`, which waits for the thread or copies what is left, and raises what the copy
    raised (:meth:`check` raises a thread's failure as soon as it happened). Both release the
    input descriptors."""

    PIECE = 64 << 20  # a cancelled thread stops after at most this many more bytes
    STEP = 8 << 20  # bytes per step(): a few ms, so a computed tensor that is ready waits little

    def __init__(self, fd_out: int, ranges: Sequence[tuple[str, int, int, int]], fsync: bool, start: int = 0) -> None:
        self.fd_out, self.ranges = fd_out, list(ranges)
        self.stop = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.sources = Sources()
        self.wb = Writeback(fd_out, fsync, start)
        self.next, self.done = 0, 0  # the range being copied, and its bytes already copied

    def _copy(self, most: int) -> bool:
        """Copy up to ``most`` bytes of what is left, in order; False when nothing was left."""
        while self.next < len(self.ranges):
            src, off, n, at = self.ranges[self.next]
            if self.done >= n:
                self.next, self.done = self.next + 1, 0
                continue
            k = min(most, n - self.done)
            copy_range(self.fd_out, self.sources, src, off + self.done, k, self.wb, at + self.done)
            self.done += k
            return True
        return False

    def step(self) -> bool:
        """Copy the next :attr:`STEP` bytes in this thread; False once everything is copied."""
        return self._copy(self.STEP)

    def run(self) -> None:
        """Copy everything left in this thread."""
        while not self.stop and self._copy(self.PIECE):
            pass

    def _run(self) -> None:
        try:
            self.run()
        except BaseException as e:  # raised by finish() in the caller's thread
            self.error = e

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="statemap-copy", daemon=True)
        self.thread.start()

    def check(self) -> None:
        """Raise what the copy thread raised, if it has failed already (the writer stops early)."""
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Wait for the thread, or copy what is left in this thread; then release the sources."""
        try:
            if self.thread is not None:
                self.thread.join()
                self.check()
            else:
                self.run()
        finally:
            self.sources.close()

    def cancel(self) -> None:
        self.stop = True
        if self.thread is not None:
            self.thread.join()
        self.sources.close()
