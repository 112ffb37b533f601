"""The reader interface: tensor metadata up front, bytes on demand."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dtypes import dtype as lookup_dtype
from ..errors import CheckpointError
from ..meta import TensorMeta


@dataclass(frozen=True)
class ByteTensor:
    """Where a tensor's bytes live in a file: enough to read it with one mmap view."""

    file: str
    offset: int  # absolute byte offset of element 0 (after storage offset)
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None  # in elements; None = C-contiguous
    storage: str = ""  # identity of the underlying storage, for tie detection

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


class MappedFiles:
    """One read-only mmap per file, opened lazily, closed together."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[Any, mmap.mmap | None]] = {}

    def get(self, path: str) -> mmap.mmap | None:
        if path not in self._maps:
            f = open(path, "rb")
            size = os.fstat(f.fileno()).st_size
            self._maps[path] = (f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None)
        return self._maps[path][1]

    def read(self, t: ByteTensor) -> np.ndarray:
        dt = lookup_dtype(t.dtype)
        n = 1
        for d in t.shape:
            n *= d
        if n == 0:
            return np.zeros(t.shape, dtype=dt.np)
        mm = self.get(t.file)
        assert mm is not None
        if t.contiguous:
            if t.offset + n * dt.itemsize > len(mm):
                raise CheckpointError(f"{t.file}: tensor data runs past the end of the file (truncated?)")
            return np.frombuffer(mm, dtype=dt.np, count=n, offset=t.offset).reshape(t.shape)
        assert t.stride is not None
        span = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
        if t.offset + span * dt.itemsize > len(mm):
            raise CheckpointError(f"{t.file}: tensor data runs past the end of the file (truncated?)")
        base = np.frombuffer(mm, dtype=dt.np, count=span, offset=t.offset)
        strides = tuple(s * dt.itemsize for s in t.stride)
        return np.lib.stride_tricks.as_strided(base, shape=t.shape, strides=strides, writeable=False)

    def close(self) -> None:
        for f, mm in self._maps.values():
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a numpy view still holds it; the GC will release it
                    pass
            f.close()
        self._maps.clear()


@dataclass
class Checkpoint:
    """An opened checkpoint: ``metas`` without bytes; ``read(name)`` gives a numpy array.

    Arrays hold bytes in the storage form of :mod:`statemap.dtypes` (bfloat16 as uint16).
    Arrays read from files are read-only views of a memory map.

    Example::

        >>> with open_checkpoint("model.safetensors") as ck:
        ...     print(len(ck.metas), ck.metas["lm_head.weight"].shape)
    """

    path: str
    format: str
    metas: dict[str, TensorMeta]
    reader: Callable[[str], np.ndarray]
    container: str = ""  # unwrap path used, e.g. "model"
    stripped_prefix: str = ""  # prefix removed from every key, e.g. "module."
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    extras: dict[str, Any] = field(default_factory=dict)  # non-tensor content, plain data
    skipped: list[str] = field(default_factory=list)  # non-tensor entries inside the state dict
    storage_ids: dict[str, str] = field(default_factory=dict)  # key -> storage, for ties
    locations: dict[str, ByteTensor] = field(default_factory=dict)
    closer: Callable[[], None] | None = None

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
        """Keys that share one storage (same bytes), as found in the file's metadata."""
        groups: dict[str, list[str]] = {}
        for k, sid in self.storage_ids.items():
            groups.setdefault(sid, []).append(k)
        return [g for g in groups.values() if len(g) > 1]
