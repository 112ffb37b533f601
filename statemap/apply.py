"""apply: run a plan's recipes, producing one output tensor at a time.

Outputs that only move contiguous bytes (renamed, split or sliced along dim 0, merged along
dim 0) become :class:`Segments`: file ranges the writer copies in the kernel, never loaded.
Injected zeros become :class:`Zeros`: the writer writes zero bytes, no array is made.
Computing ops (transpose, cast, pad, other merges) read their sources with ``pread`` and hold
only the tensor they produce.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .dtypes import cast as cast_values
from .dtypes import dtype as lookup_dtype
from .dtypes import from_compute
from .errors import CheckpointError
from .load.checkpoint import ByteTensor
from .meta import Node
from .plan import PlannedTensor
from .xpose import OutputPool, read_transposed, swaps_last_two, transpose_last_two

if TYPE_CHECKING:
    import numpy as np


def run_node(
    node: Node,
    read: Callable[[str], np.ndarray],
    locations: Mapping[str, ByteTensor] | None = None,
    pool: OutputPool | None = None,
) -> np.ndarray:
    """Evaluate one recipe. Arrays are in storage form (see :mod:`statemap.dtypes`).

    With ``locations`` (where each source's bytes are in its file), a transpose of a source is
    read and transposed in one pass (:func:`statemap.xpose.read_transposed`), into an array from
    ``pool`` when given (reused memory: the caller must not keep results it is done with)."""
    import numpy as np

    k = node.kind
    if k == "source":
        if lookup_dtype(node.dtype).value_bits:  # quint4x2 / quint2x4: several values per byte
            raise CheckpointError(
                f"tensor {node.args[0]!r} is {node.dtype} (packed values): statemap reads it, but cannot convert or write it"
            )
        a = read(node.args[0])
        if tuple(a.shape) != node.shape:
            raise CheckpointError(f"tensor {node.args[0]!r} has shape {list(a.shape)}, its header said {list(node.shape)}")
        return a
    if k == "fill":
        dt = lookup_dtype(node.dtype)
        bits = from_compute(np.array([node.args[0]]), dt)[0]
        return np.full(node.shape, bits, dtype=dt.np)
    if k == "permute" and locations is not None and swaps_last_two(node.args[0]):
        fused = _read_transposed(node, locations, pool)
        if fused is not None:
            return fused
    ins = [run_node(n, read, locations) for n in node.inputs]
    if k == "slice":
        dim, start, stop, step = node.args
        idx = [slice(None)] * ins[0].ndim
        idx[dim] = slice(start, stop, step)
        return ins[0][tuple(idx)]
    if k == "concat":
        return np.concatenate(ins, axis=node.args[0])
    if k == "stack":
        return np.stack(ins, axis=node.args[0])
    if k == "permute":
        if swaps_last_two(node.args[0]):
            return transpose_last_two(ins[0])
        return np.asarray(np.transpose(ins[0], node.args[0]), order="C")
    if k == "reshape":
        return np.reshape(ins[0], node.args[0])
    if k == "pad":
        dim, size, value = node.args
        dt = lookup_dtype(node.dtype)
        bits = from_compute(np.array([value]), dt)[0]
        out = np.full(node.shape, bits, dtype=dt.np)
        idx = [slice(None)] * out.ndim
        idx[dim] = slice(0, ins[0].shape[dim])
        out[tuple(idx)] = ins[0]
        return out
    if k == "view":
        return ins[0].view(lookup_dtype(node.dtype).np)
    if k == "cast":
        return cast_values(ins[0], lookup_dtype(node.inputs[0].dtype), lookup_dtype(node.dtype))
    raise AssertionError(f"unknown node kind {k!r}")


def _read_transposed(node: Node, locations: Mapping[str, ByteTensor], pool: OutputPool | None = None) -> np.ndarray | None:
    """A transpose (last two dims) of a source stored contiguously, read and transposed in one
    pass; None when the source is another case (run_node reads it whole)."""
    src = node.inputs[0]
    if src.kind != "source":
        return None
    loc = locations.get(src.args[0])
    dt = lookup_dtype(src.dtype)
    if loc is None or not loc.contiguous or dt.value_bits or tuple(loc.shape) != src.shape or loc.dtype != src.dtype:
        return None
    try:
        fd = os.open(loc.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # the checkpoint's own reader (its open descriptor) reads it, or says why not
    try:
        *lead, rows, cols = src.shape
        out = pool.take((*lead, cols, rows), dt.np) if pool is not None else None
        return read_transposed(fd, loc.offset, src.shape, dt.np, loc.file, out)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Segments:
    """An output whose bytes are ranges of input files, in order: copied without entering Python."""

    parts: tuple[tuple[str, int, int], ...]  # (file, offset, nbytes)

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.parts)


@dataclass(frozen=True)
class Zeros:
    """An output whose bytes are all zero (an ``inject`` of 0, ``final_logits_bias``): written as
    zero bytes without numpy, which a conversion that otherwise only copies then never imports
    (~0.08 s of CPU, holding the GIL the copying thread needs: DeltaLM's conversion, measured
    here, 0.62 -> 0.57 s median of 6)."""

    nbytes: int


def zero_bits(node: Node) -> bool:
    """Whether ``node`` is a fill whose value is stored as all-zero bytes in its dtype: 0 and
    False are, in every dtype statemap computes (numpy's and bfloat16); -0.0 is not (its sign bit
    is set). Other dtypes (float8 kinds, where zero bytes need not be 0) are left to
    :func:`run_node`, which says it cannot produce them.

    Example::

        >>> zero_bits(Node("fill", (2,), "float32", (), (0,))), zero_bits(Node("fill", (2,), "float32", (), (-0.0,)))
        (True, False)
    """
    dt = lookup_dtype(node.dtype)
    if node.kind != "fill" or not (dt.native or dt.name == "bfloat16"):
        return False
    v = node.args[0]
    return v == 0 and not (isinstance(v, float) and math.copysign(1.0, v) < 0)


def byte_segments(node: Node, locations: Mapping[str, ByteTensor]) -> list[tuple[str, int, int]] | None:
    """The file ranges holding ``node``'s bytes, when it only moves contiguous bytes: a renamed
    source, a slice whose leading dims are 1 (dim 0 split / vocab slice), a reshape of such,
    or a concat of such along its first non-unit dim (dim-0 merge). Else None."""
    k = node.kind
    if k == "source":
        loc = locations.get(node.args[0])
        if loc is None or not loc.contiguous:
            return None
        return [(loc.file, loc.offset, node.meta_numel * lookup_dtype(node.dtype).itemsize)]
    if k in ("reshape", "view"):
        return byte_segments(node.inputs[0], locations)
    if k == "slice":
        dim, start, stop, step = node.args
        src = node.inputs[0]
        if step != 1 or math.prod(src.shape[:dim]) != 1:
            return None
        inner = byte_segments(src, locations)
        if inner is None:
            return None
        row = math.prod(src.shape[dim + 1 :]) * lookup_dtype(src.dtype).itemsize
        return _sub_range(inner, start * row, (stop - start) * row)
    if k == "concat":
        dim = node.args[0]
        if math.prod(node.shape[:dim]) != 1:
            return None
        out: list[tuple[str, int, int]] = []
        for n in node.inputs:
            seg = byte_segments(n, locations)
            if seg is None:
                return None
            for f, off, nb in seg:
                if out and out[-1][0] == f and out[-1][1] + out[-1][2] == off:
                    out[-1] = (f, out[-1][1], out[-1][2] + nb)  # adjacent: one copy
                else:
                    out.append((f, off, nb))
        return out
    return None


def _sub_range(parts: list[tuple[str, int, int]], start: int, length: int) -> list[tuple[str, int, int]]:
    out = []
    for f, off, n in parts:
        if length <= 0:
            break
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append((f, off + start, take))
        length -= take
        start = 0
    return out


def execute_streaming(
    outputs: Iterable[PlannedTensor], read: Callable[[str], np.ndarray], locations: Mapping[str, ByteTensor]
) -> Iterator[tuple[PlannedTensor, np.ndarray | Segments | Zeros]]:
    """Like :func:`execute`, but yields :class:`Segments` for outputs that are pure byte moves
    and :class:`Zeros` for injected zeros.
    Transposed tensors are computed into reused memory (:class:`statemap.xpose.OutputPool`, freed
    with the generator): an array is reused once the consumer no longer refers to it."""
    pool = OutputPool()
    for out in outputs:
        yield out, produce(out, read, locations, pool)


def produce(
    out: PlannedTensor, read: Callable[[str], np.ndarray], locations: Mapping[str, ByteTensor], pool: OutputPool | None = None
) -> np.ndarray | Segments | Zeros:
    """One output for a writer: file ranges when it only moves bytes, :class:`Zeros` when it is
    all zero bytes, else the computed array."""
    seg = byte_segments(out.node, locations)
    if seg is not None:
        return Segments(tuple(seg))
    if zero_bits(out.node):
        return Zeros(lookup_dtype(out.node.dtype).nbytes(out.node.meta_numel))
    return run_node(out.node, read, locations, pool)


def execute(outputs: Iterable[PlannedTensor], read: Callable[[str], np.ndarray]) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    """Yield (planned output, array) for ``plan.outputs`` (or a subset), one at a time."""
    for out in outputs:
        a = run_node(out.node, read)
        if tuple(a.shape) != out.node.shape:  # the planner and the kernels disagree: a bug
            raise AssertionError(f"{out.name}: planned {out.node.shape}, produced {a.shape}")
        yield out, a
