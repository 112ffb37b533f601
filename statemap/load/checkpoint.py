"""The reader interface: tensor metadata up front, bytes on demand."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from ..buffers import BufferPool, free_refcount
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


class _BufferPool(BufferPool):
    """:class:`statemap.buffers.BufferPool` for reads while :func:`reuse_buffers` is active, plus
    one buffer of its own for reads larger than the pooled sizes (embeddings), kept while free for
    the next such read of at most its size (no page of it is faulted in and zeroed again: ~0.1 s
    per 400 MB here); a larger one replaces it (the free one is dropped first, so two are never
    held for nothing)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.big: list[Any] = []  # at most one buffer for reads above the pooled sizes

    def take_big(self, nbytes: int) -> Any:
        """A buffer of ``nbytes`` for a read above the pooled sizes: the big buffer when it is free and
        large enough; else a new one (the free buffers dropped first) that becomes the big buffer."""
        import numpy as np

        with self.lock:
            if self.big and sys.getrefcount(self.big[0]) == free_refcount() and self.big[0].nbytes >= nbytes:
                return self.big[0][:nbytes]
        self.trim()
        with self.lock:
            buf = np.empty(nbytes, dtype=np.uint8)
            self.big[:] = [buf]  # a big buffer still in use is its users' alone from now on
            return buf[:nbytes]

    def trim(self) -> None:
        """Drop the free buffers (before a large read the pool does not serve: peak memory stays as without the pool)."""
        super().trim()
        with self.lock:
            free_count = free_refcount()
            self.big = [self.big[i] for i in range(len(self.big)) if sys.getrefcount(self.big[i]) != free_count]


_pool: list[_BufferPool] = []
# tensors of these sizes (bytes) are pooled: smaller ones malloc's arenas reuse anyway; larger ones
# (embeddings: few) share one buffer of their own (_BufferPool.take_big)
_POOLED = (1 << 20, 1 << 26)


@contextmanager
def reuse_buffers(limit: int = 4) -> Iterator[None]:
    """While active, :class:`FileReader` reads into reused buffers (see :class:`_BufferPool`) rather
    than a fresh allocation per tensor; arrays read stay valid as long as they are referenced.

    Example::

        >>> with reuse_buffers(), open_checkpoint("model.safetensors") as ck:
        ...     for k in ck.metas:
        ...         _ = ck.read(k).sum()
    """
    _pool.append(_BufferPool(limit))
    try:
        yield
    finally:
        _pool.pop()


class FileReader:
    """Reads tensors with ``pread`` into a buffer of their own: memory in use is the tensor,
    not the file (no whole-file mmap, so address space and RSS stay bounded). Under
    :func:`reuse_buffers`, into a reused buffer."""

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
        if _pool and not dt.value_bits and _POOLED[0] <= span * dt.itemsize:
            npdt = dt.np
            nb = span * npdt.itemsize
            buf = (_pool[-1].take(nb) if nb <= _POOLED[1] else _pool[-1].take_big(nb)).view(npdt)
        else:
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


class Columns:
    """Per-key metadata of a large checkpoint as parallel lists, no object per key (a 200k-key
    sharded index): :class:`MetaView`, :class:`LocationView` and :class:`StorageView` build a
    key's :class:`TensorMeta` / :class:`ByteTensor` / storage id when it is asked for.

    ``names`` in checkpoint order; ``keyset`` a dict whose keys are ``names`` in that order (the
    index's weight_map: membership and key views in C); ``kind_of[i]`` a key of ``kinds``
    (one entry per distinct dtype and shape: torch dtype, shape, bytes); ``file_of[i]`` an index
    into ``files`` (path, first data byte); ``begins[i]`` the tensor's offset in that file's data.
    """

    __slots__ = ("names", "keyset", "kinds", "kind_of", "files", "file_of", "begins", "_at", "_counts")

    def __init__(
        self,
        names: list[str],
        keyset: dict[str, Any],
        kinds: dict[Any, tuple[str, tuple[int, ...], int]],
        kind_of: list[Any],
        files: list[tuple[str, int]],
        file_of: list[int],
        begins: list[int],
    ) -> None:
        self.names, self.keyset, self.kinds, self.kind_of = names, keyset, kinds, kind_of
        self.files, self.file_of, self.begins = files, file_of, begins
        self._at: dict[str, int] | None = None
        self._counts: list[tuple[tuple[str, tuple[int, ...], int], int]] | None = None

    def position(self, name: str) -> int:
        """The key's position (KeyError for a name that is not a key)."""
        if self._at is None:  # built on the first lookup by name (a command that only lists keys never needs it)
            self._at = dict(zip(self.names, range(len(self.names))))
        return self._at[name]

    def kind_counts(self) -> list[tuple[tuple[str, tuple[int, ...], int], int]]:
        """((torch dtype, shape, bytes), keys of that kind), in order of first appearance (counted once)."""
        if self._counts is None:
            from collections import Counter

            self._counts = [(self.kinds[k], n) for k, n in Counter(self.kind_of).items()]
        return self._counts

    def total_bytes(self) -> int:
        return sum(kind[2] * n for kind, n in self.kind_counts())

    def all_distinct(self) -> bool:
        """No two keys share a storage id (true when no tensor is empty: the data is tiled)."""
        return all(v[2] > 0 for v in self.kinds.values())


class _ColumnView(Mapping[str, Any]):
    """A read-only mapping over :class:`Columns`; values built on access and cached."""

    def __init__(self, cols: Columns) -> None:
        self.columns = cols
        self._cache: dict[str, Any] = {}

    def _build(self, name: str, i: int) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, name: str) -> Any:
        got = self._cache.get(name)
        if got is None:
            got = self._cache[name] = self._build(name, self.columns.position(name))
        return got

    def __contains__(self, name: object) -> bool:
        return name in self.columns.keyset

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns.names)

    def __len__(self) -> int:
        return len(self.columns.names)

    def keys(self) -> KeysView[str]:
        return self.columns.keyset.keys()  # a dict's keys (set operations and == run in C), in key order

    def values(self) -> ValuesView[Any]:
        return _Values(self)

    def items(self) -> ItemsView[str, Any]:
        return _Items(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {len(self)} keys>"


class _Values(ValuesView[Any]):
    def __iter__(self) -> Iterator[Any]:
        view: Any = cast(Any, self)._mapping
        return map(view.__getitem__, view.columns.names)


class _Items(ItemsView[str, Any]):
    def __iter__(self) -> Iterator[tuple[str, Any]]:
        view: Any = cast(Any, self)._mapping
        names = view.columns.names
        return zip(names, map(view.__getitem__, names))


class MetaView(_ColumnView):
    """name -> :class:`TensorMeta`, over :class:`Columns`."""

    def _build(self, name: str, i: int) -> TensorMeta:
        dt, shape, _ = self.columns.kinds[self.columns.kind_of[i]]
        return TensorMeta(name, shape, dt)


class LocationView(_ColumnView):
    """name -> :class:`ByteTensor`, over :class:`Columns`."""

    def _build(self, name: str, i: int) -> ByteTensor:
        c = self.columns
        dt, shape, _ = c.kinds[c.kind_of[i]]
        path, start = c.files[c.file_of[i]]
        begin = c.begins[i]
        return ByteTensor(path, start + begin, dt, shape, None, f"{path}@{begin}")


class StorageView(_ColumnView):
    """name -> storage id (``{file}@{offset}``), over :class:`Columns`."""

    def _build(self, name: str, i: int) -> str:
        c = self.columns
        return f"{c.files[c.file_of[i]][0]}@{c.begins[i]}"


def columns_of(metas: Mapping[str, Any]) -> Columns | None:
    """The :class:`Columns` behind a checkpoint's ``metas`` (None for a plain dict)."""
    return metas.columns if isinstance(metas, MetaView) else None


@dataclass
class Checkpoint:
    """An opened checkpoint: ``metas`` without bytes; ``read(name)`` gives a numpy array.

    Arrays hold bytes in the storage form of :mod:`statemap.dtypes` (bfloat16 as uint16).
    Arrays read from files are read-only; each read allocates only that tensor.

    ``metas``, ``locations`` and ``storage_ids`` are read-only mappings: dicts, or, for a sharded
    safetensors index, views over :class:`Columns` that build a key's entry when it is read.

    Example::

        >>> with open_checkpoint("model.safetensors") as ck:
        ...     print(len(ck.metas), ck.metas["final_logits_bias"].shape)
        393 (1, 64)
    """

    path: str
    format: str
    metas: Mapping[str, TensorMeta]  # a dict, or a MetaView over Columns (a large index)
    reader: Callable[[str], np.ndarray]
    container: str = ""  # unwrap path used, e.g. "model"
    alternatives: list[str] = field(default_factory=list)  # other candidates, e.g. ["state_dict_ema"]; pick with unwrap
    stripped_prefix: str = ""  # prefix removed from every key, e.g. "module."
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    extras: dict[str, Any] = field(default_factory=dict)  # non-tensor content, plain data
    skipped: list[str] = field(default_factory=list)  # non-tensor entries inside the state dict
    storage_ids: Mapping[str, str] = field(default_factory=dict)  # key -> storage, for ties
    locations: Mapping[str, ByteTensor] = field(default_factory=dict)
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

        if isinstance(self.storage_ids, StorageView) and self.storage_ids.columns.all_distinct():
            return []  # a tiled index: every key its own bytes
        shared = {sid for sid, n in Counter(self.storage_ids.values()).items() if n > 1}
        groups: dict[object, list[str]] = {}
        for k, sid in self.storage_ids.items():
            if sid not in shared:  # a storage of its own: no tie (most keys; skipped cheaply)
                continue
            loc = self.locations.get(k)
            ident = (sid, loc.offset, loc.shape, loc.stride) if loc is not None else sid
            groups.setdefault(ident, []).append(k)
        return [g for g in groups.values() if len(g) > 1]
