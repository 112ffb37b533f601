"""The reader interface: tensor metadata up front, bytes on demand."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..dtypes import dtype as lookup_dtype
from ..errors import CheckpointError
from ..meta import TensorMeta

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class ByteTensor:
    """Where a tensor's bytes live in a file: enough to read it with one pread, or copy it as a byte range."""

    file: str
    offset: int  # absolute byte offset of element 0 (after storage offset)
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None  # in elements; None = C-contiguous
    storage: str = ""  # identity of the underlying storage, for tie detection

    def __init__(
        self,
        file: str,
        offset: int,
        dtype: str,
        shape: tuple[int, ...],
        stride: tuple[int, ...] | None = None,
        storage: str = "",
    ) -> None:
        # the generated __init__ without a setattr call per field (one per tensor of a large index)
        d = self.__dict__
        d["file"] = file
        d["offset"] = offset
        d["dtype"] = dtype
        d["shape"] = shape
        d["stride"] = stride
        d["storage"] = storage

    @property
    def contiguous(self) -> bool:
        if self.stride is None:
            return True
        expect, ok = 1, True
        for d, s in zip(reversed(self.shape), reversed(self.stride)):
            if d != 1 and s != expect:
                ok = False
            expect *= d
        return ok


@dataclass(frozen=True)
class TypedArray:
    """An in-memory array whose element type numpy cannot name (bfloat16 held as uint16 bits)."""

    array: Any
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass(frozen=True)
class LazyTensor:
    """A tensor its format reads itself, not as one byte range (DCP shards stitched together)."""

    shape: tuple[int, ...]
    dtype: str
    read: Callable[[], np.ndarray]


class FileReader:
    """Reads tensors with ``pread`` into a buffer of their own: memory in use is the tensor,
    not the file (no whole-file mmap, so address space and RSS stay bounded)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fds[path]

    def read(self, t: ByteTensor) -> np.ndarray:
        import numpy as np

        dt = lookup_dtype(t.dtype)
        n = 1
        for d in t.shape:
            n *= d
        if n == 0:
            return np.zeros(t.shape, dtype=dt.np)
        if dt.value_bits:  # packed sub-byte values (quint4x2): the bytes as torch stores them, 1-D
            if not t.contiguous:
                raise CheckpointError(f"{t.file}: a non-contiguous {dt.name} view is not supported")
            n = dt.nbytes(n)
        if t.contiguous:
            span = n
        else:
            assert t.stride is not None
            span = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
        buf = np.empty(span, dtype=dt.np)
        view = buf.data.cast("B")
        fd, got = self.fd(t.file), 0
        while got < len(view):
            k = os.preadv(fd, [view[got:]], t.offset + got)
            if k == 0:
                raise CheckpointError(f"{t.file}: tensor data runs past the end of the file (truncated?)")
            got += k
        buf.flags.writeable = False
        if dt.value_bits:
            return buf
        if t.contiguous:
            return buf.reshape(t.shape)
        assert t.stride is not None
        strides = tuple(s * dt.itemsize for s in t.stride)
        return np.lib.stride_tricks.as_strided(buf, shape=t.shape, strides=strides, writeable=False)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass
class Checkpoint:
    """An opened checkpoint: ``metas`` without bytes; ``read(name)`` gives a numpy array.

    Arrays hold bytes in the storage form of :mod:`statemap.dtypes` (bfloat16 as uint16).
    Arrays read from files are read-only; each read allocates only that tensor.

    Example::

        >>> with open_checkpoint("model.safetensors") as ck:
        ...     print(len(ck.metas), ck.metas["final_logits_bias"].shape)
        393 (1, 64)
    """

    path: str
    format: str
    metas: dict[str, TensorMeta]
    reader: Callable[[str], np.ndarray]
    container: str = ""  # unwrap path used, e.g. "model"
    alternatives: list[str] = field(default_factory=list)  # other candidates, e.g. ["state_dict_ema"]; pick with unwrap
    stripped_prefix: str = ""  # prefix removed from every key, e.g. "module."
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    extras: dict[str, Any] = field(default_factory=dict)  # non-tensor content, plain data
    skipped: list[str] = field(default_factory=list)  # non-tensor entries inside the state dict
    storage_ids: dict[str, str] = field(default_factory=dict)  # key -> storage, for ties
    locations: dict[str, ByteTensor] = field(default_factory=dict)
    closer: Callable[[], None] | None = None
    inputs: list[Any] = field(default_factory=list)  # several files read as one: load.multi.InputFile each
    files: dict[str, int] = field(default_factory=dict)  # key -> index in `inputs` (several files only)

    def read(self, name: str) -> np.ndarray:
        if name not in self.metas:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self.reader(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.metas:
            yield name, self.read(name)

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
            self.closer = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tied_groups(self) -> list[list[str]]:
        """Keys that are one tensor in the file (same storage, offset, shape and stride), found in
        the metadata — e.g. fairseq's output_projection saved tied to embed_tokens."""
        from collections import Counter

        shared = {sid for sid, n in Counter(self.storage_ids.values()).items() if n > 1}
        groups: dict[object, list[str]] = {}
        for k, sid in self.storage_ids.items():
            if sid not in shared:  # a storage of its own: no tie (most keys; skipped cheaply)
                continue
            loc = self.locations.get(k)
            ident = (sid, loc.offset, loc.shape, loc.stride) if loc is not None else sid
            groups.setdefault(ident, []).append(k)
        return [g for g in groups.values() if len(g) > 1]
