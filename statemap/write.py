"""write: stream planned tensors into safetensors (single or sharded) or a torch .pt file.

Every file is written to a temporary name in the target folder, flushed and fsynced,
its header re-read and checked against the plan, and only then renamed into place. On any
failure (an exception, Ctrl-C, SIGTERM) the temporary files are removed: no partial output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dtypes import dtype as lookup_dtype
from .dtypes import st_shape
from .errors import OutputError
from .meta import TensorMeta

if TYPE_CHECKING:
    import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class Written:
    files: tuple[str, ...]
    n_tensors: int
    n_bytes: int


def output_format(path: str | os.PathLike[str]) -> str:
    name = os.fspath(path)
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    if name.endswith(".msgpack"):
        return "flax"
    raise OutputError(f"{name}: unknown output format; name it *.safetensors, *.pt / *.bin, or *.msgpack (Flax)")


def parse_size(text: str | int | None) -> int | None:
    """'5GB' / '500MB' / '2GiB' / 1000000 -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.I)
    if not m:
        raise OutputError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


def check_output(path: str | os.PathLike[str], inputs: Sequence[str], force: bool) -> Path:
    out = Path(path)
    for src in inputs:
        try:
            if Path(src).exists() and out.exists() and os.path.samefile(src, out):
                raise OutputError(f"{out}: is an input; statemap never writes over its inputs")
        except OSError:
            pass
        if Path(src).resolve() == out.resolve():
            raise OutputError(f"{out}: is an input; statemap never writes over its inputs")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force (force=True) to replace it")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; name an output file")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: output folder does not exist")
    return out


# -- atomic files --------------------------------------------------------------------------


class _Staging:
    """Temporary files that become real only when every one of them is complete."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []

    def reserve(self, final: Path) -> Path:
        """A temporary name for ``final``, removed on abort, renamed on commit."""
        tmp = final.with_name(f".{final.name}.statemap-{os.getpid()}-{threading.get_ident() % 100000}.tmp")
        self.pending.append((tmp, final))
        return tmp

    def open(self, final: Path) -> tuple[Path, Any]:
        tmp = self.reserve(final)
        return tmp, open(tmp, "wb", buffering=0)  # unbuffered: byte-range copies use the fd directly

    def commit(self) -> None:
        for tmp, final in self.pending:
            os.replace(tmp, final)
        if self.pending:
            _fsync_dir(self.pending[0][1].parent)
        self.pending.clear()

    def abort(self) -> None:
        for tmp, _ in self.pending:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.pending.clear()


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into an exception while writing, so temporary files get removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise OutputError("interrupted by SIGTERM; partial output removed")

    old = signal.signal(signal.SIGTERM, handler)
    # a file-size limit (ulimit -f) would kill the process mid-write; make it an EFBIG error instead
    old_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN) if hasattr(signal, "SIGXFSZ") else None
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        if old_xfsz is not None:
            signal.signal(signal.SIGXFSZ, old_xfsz)


def _copy_range(fd_out: int, src: str, offset: int, n: int, fds: dict[str, int]) -> None:
    """Copy n bytes of ``src`` at ``offset`` to ``fd_out``'s position, in the kernel when possible."""
    if src not in fds:
        fds[src] = os.open(src, os.O_RDONLY)
    fd_in = fds[src]
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < n:
        chunk = min(n - done, 1 << 30)
        k = 0
        if use_cfr:
            try:
                k = os.copy_file_range(fd_in, fd_out, chunk, offset + done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                    raise
                use_cfr = False
                continue
        else:
            data = os.pread(fd_in, min(chunk, 64 << 20), offset + done)
            k = os.write(fd_out, data) if data else 0
        if k == 0:
            raise OutputError(f"{src}: ended early while copying tensor bytes (file changed or truncated?)")
        done += k


def _write_all(f: Any, a: Any, want: TensorMeta, fds: dict[str, int] | None = None) -> int:
    import numpy as np

    if hasattr(a, "parts"):  # Segments: byte ranges of input files
        if a.nbytes != want.nbytes:
            raise AssertionError(f"{want.name}: {a.nbytes} bytes planned as {want.nbytes}")
        for src, off, n in a.parts:
            _copy_range(f.fileno(), src, off, n, fds if fds is not None else {})
        return int(a.nbytes)
    dt = lookup_dtype(want.dtype)
    if a.dtype != dt.np:
        a = a.astype(dt.np)
    a = np.asarray(a, order="C")
    if tuple(a.shape) != want.shape:
        raise AssertionError(f"{want.name}: writing {a.shape}, planned {want.shape}")
    buf = memoryview(a).cast("B") if a.size else b""
    f.write(buf)
    return len(buf)


# -- safetensors ---------------------------------------------------------------------------


def _st_header(metas: Sequence[TensorMeta], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for m in metas:
        n = m.nbytes
        dt = lookup_dtype(m.dtype)
        if not dt.st_name:
            raise OutputError(
                f"tensor {m.name!r} is {dt.name}, which safetensors cannot hold; cast it (op 'cast') or write a .pt file"
            )
        header[m.name] = {"dtype": dt.st, "shape": list(st_shape(dt, m.shape)), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_safetensors(
    final: Path, stage: _Staging, metas: Sequence[TensorMeta], arrays: Iterator[Any], metadata: dict[str, str], fsync: bool = True
) -> int:
    from .load.safetensors_format import read_header

    tmp, f = stage.open(final)
    total = 0
    fds: dict[str, int] = {}
    try:
        with f:
            f.write(_st_header(metas, metadata))
            for m in metas:
                total += _write_all(f, next(arrays), m, fds)
            if fsync:
                os.fsync(f.fileno())
    finally:
        for fd in fds.values():
            os.close(fd)
    got, _, _ = read_header(str(tmp))  # re-read and check before it becomes real
    if [(g.name, g.shape, g.dtype) for g in got.values()] != [(m.name, m.shape, m.dtype) for m in metas]:
        raise OutputError(f"{final}: written header does not match the plan (bug); output removed")
    return total


def write_checkpoint(
    path: str | os.PathLike[str],
    metas: Sequence[TensorMeta],
    arrays: Iterable[Any],
    *,
    metadata: dict[str, str] | None = None,
    max_shard_size: int | str | None = None,
    ties: Sequence[Sequence[str]] = (),
    inputs: Sequence[str] = (),
    force: bool = False,
    on_tensor: Callable[[TensorMeta], None] | None = None,
    fsync: bool = True,
    workers: int = 1,
    get: Callable[[int], Any] | None = None,
) -> Written:
    """Write tensors, given in the order of ``metas``, atomically to ``path``.

    ``ties``: groups of names that are one tensor. In a .pt output they share storage;
    for safetensors the caller decides (clone: all listed in ``metas``; dedupe: only one).
    ``fsync=False`` skips flushing to disk before the rename (faster; a power loss right after
    may leave an empty file under the final name). Still atomic against crashes of statemap.
    ``workers > 1`` with a sharded safetensors output writes whole shards in parallel processes
    (started with ``spawn``); it needs a picklable ``get(i)`` that produces the i-th tensor.

    Example::

        >>> write_checkpoint("out.safetensors", [TensorMeta("w", (2,), "float32")], [np.zeros(2, "f4")])
    """
    fmt = output_format(path)
    out = check_output(path, inputs, force)
    limit = parse_size(max_shard_size)
    stage = _Staging()
    it = iter(arrays)

    def counted() -> Iterator[np.ndarray]:
        for m in metas:
            try:
                a = next(it)
            except StopIteration:
                raise AssertionError("fewer arrays than planned tensors") from None
            if on_tensor:
                on_tensor(m)
            yield a

    try:
        with _sigterm_as_exception():
            if fmt != "safetensors" and limit:
                raise OutputError(f"{out}: sharding is supported for safetensors outputs only")
            if fmt == "torch":
                files, nbytes = _write_torch(out, stage, metas, counted(), ties)
            elif fmt == "flax":
                files, nbytes = _write_flax(out, stage, metas, counted(), fsync)
            else:
                files, nbytes = _write_safetensors_maybe_sharded(
                    out, stage, metas, counted(), metadata or {}, limit, fsync, workers, get
                )
            stage.commit()
    except OSError as e:
        stage.abort()
        raise OutputError(f"{out}: write failed: {e.strerror or e}; no output left behind") from None
    except BaseException:
        stage.abort()
        raise
    return Written(tuple(files), len(metas), nbytes)


def shard_groups(metas: Sequence[TensorMeta], limit: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each at most ``limit`` bytes (a bigger tensor alone)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, m in enumerate(metas):
        if groups[-1] and size + m.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += m.nbytes
    return groups


def _worker_init() -> None:
    """Workers die on SIGTERM (Pool.terminate) instead of running the parent's handler."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _shard_task(job: tuple[Path, list[TensorMeta], list[int], dict[str, str], bool, Callable[[int], Any]]) -> int:
    """Worker: write one shard to its reserved temporary file; return its data bytes."""
    tmp, metas, idxs, md, fsync, get = job
    total = 0
    fds: dict[str, int] = {}
    try:
        with open(tmp, "wb", buffering=0) as f:
            f.write(_st_header(metas, md))
            for i, m in zip(idxs, metas):
                total += _write_all(f, get(i), m, fds)
            if fsync:
                os.fsync(f.fileno())
    finally:
        for fd in fds.values():
            os.close(fd)
    return total


def _write_safetensors_maybe_sharded(
    out: Path,
    stage: _Staging,
    metas: Sequence[TensorMeta],
    arrays: Iterator[Any],
    metadata: dict[str, str],
    limit: int | None,
    fsync: bool = True,
    workers: int = 1,
    get: Callable[[int], Any] | None = None,
) -> tuple[list[str], int]:
    from .load.safetensors_format import read_header

    md = {"format": "pt", **metadata}
    if not limit or sum(m.nbytes for m in metas) <= limit:
        return [str(out)], _write_safetensors(out, stage, metas, arrays, md, fsync)
    groups = shard_groups(metas, limit)
    stem, n = out.name[: -len(".safetensors")], len(groups)
    names = [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    files, total = [], 0
    if workers > 1 and get is not None and n > 1:
        import multiprocessing

        tmps = [stage.reserve(out.with_name(name)) for name in names]
        jobs = [(tmp, [metas[i] for i in idxs], idxs, md, fsync, get) for tmp, idxs in zip(tmps, groups)]
        # spawn, not fork: a forked child can deadlock on locks held by the parent's threads
        with multiprocessing.get_context("spawn").Pool(min(workers, n), initializer=_worker_init) as pool:
            sizes = pool.map(_shard_task, jobs, chunksize=1)
        for tmp, idxs in zip(tmps, groups):  # re-read every shard header before anything is renamed
            got, _, _ = read_header(str(tmp))
            if [(g.name, g.shape, g.dtype) for g in got.values()] != [
                (metas[i].name, metas[i].shape, metas[i].dtype) for i in idxs
            ]:
                raise OutputError(f"{out}: a written shard does not match the plan (bug); output removed")
        total = sum(sizes)
    else:
        for name, idxs in zip(names, groups):
            total += _write_safetensors(out.with_name(name), stage, [metas[i] for i in idxs], arrays, md, fsync)
    files = [str(out.with_name(name)) for name in names]
    weight_map = {metas[i].name: name for name, idxs in zip(names, groups) for i in idxs}
    index = out.with_name(out.name + ".index.json")
    tmp, f = stage.open(index)
    with f:
        f.write(json.dumps({"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}, indent=2).encode())
        if fsync:
            os.fsync(f.fileno())
    files.append(str(index))
    return files, total


def _write_torch(
    out: Path, stage: _Staging, metas: Sequence[TensorMeta], arrays: Iterator[np.ndarray], ties: Sequence[Sequence[str]]
) -> tuple[list[str], int]:
    import numpy as np
    import torch

    from .torch_adapter import to_torch

    alias: dict[str, str] = {}
    for group in ties:
        for name in group[1:]:
            alias[name] = group[0]
    state: dict[str, Any] = {}
    total = 0
    for m in metas:
        a = next(arrays)
        if hasattr(a, "parts"):
            raise AssertionError("byte-range outputs are for safetensors only")
        if m.name in alias and alias[m.name] in state:
            state[m.name] = state[alias[m.name]]
            continue
        state[m.name] = to_torch(np.array(a, copy=True), m.dtype)
        total += m.nbytes
    tmp, f = stage.open(out)
    with f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    from .load import open_checkpoint

    with open_checkpoint(tmp, unwrap=(), strip_prefix=()) as ck:
        if [(k, v.shape, v.dtype) for k, v in ck.metas.items()] != [(m.name, m.shape, m.dtype) for m in metas]:
            raise OutputError(f"{out}: written file does not match the plan (bug); output removed")
    return [str(out)], total


def _write_flax(
    out: Path, stage: _Staging, metas: Sequence[TensorMeta], arrays: Iterator[Any], fsync: bool
) -> tuple[list[str], int]:
    """Flax msgpack: one nested map; built in memory (the format has no streaming layout)."""
    from .load.flax_format import pack_msgpack, read_msgpack

    items = []
    for m in metas:
        a = next(arrays)
        if hasattr(a, "parts"):
            raise AssertionError("byte-range outputs are for safetensors only")
        items.append((m.name, a, m.dtype))
    data = pack_msgpack(items)
    tmp, f = stage.open(out)
    with f:
        f.write(data)
        if fsync:
            os.fsync(f.fileno())
    tree = read_msgpack(str(tmp))  # re-read and check before it becomes real
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(tree, "")
    if sorted((k, tuple(v.shape)) for k, v in flat.items()) != sorted((m.name, m.shape) for m in metas):
        raise OutputError(f"{out}: written file does not match the plan (bug); output removed")
    return [str(out)], sum(m.nbytes for m in metas)
