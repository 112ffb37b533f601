"""apply: run a plan's recipes, producing one output tensor at a time.

Sources are read through the checkpoint (memory-mapped views for files), so a tensor that
is only renamed or sliced is never copied here; computing ops (concat, permute + write,
cast, pad) hold only the tensor they produce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from .dtypes import cast as cast_values
from .dtypes import dtype as lookup_dtype
from .dtypes import from_compute
from .errors import CheckpointError
from .meta import Node
from .plan import PlannedTensor


def run_node(node: Node, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """Evaluate one recipe. Arrays are in storage form (see :mod:`statemap.dtypes`)."""
    k = node.kind
    if k == "source":
        a = read(node.args[0])
        if tuple(a.shape) != node.shape:
            raise CheckpointError(f"tensor {node.args[0]!r} has shape {list(a.shape)}, its header said {list(node.shape)}")
        return a
    if k == "fill":
        dt = lookup_dtype(node.dtype)
        bits = from_compute(np.array([node.args[0]]), dt)[0]
        return np.full(node.shape, bits, dtype=dt.np)
    ins = [run_node(n, read) for n in node.inputs]
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
        return np.transpose(ins[0], node.args[0])
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
    if k == "cast":
        return cast_values(ins[0], lookup_dtype(node.inputs[0].dtype), lookup_dtype(node.dtype))
    raise AssertionError(f"unknown node kind {k!r}")


def execute(outputs: Iterable[PlannedTensor], read: Callable[[str], np.ndarray]) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    """Yield (planned output, array) for ``plan.outputs`` (or a subset), one at a time."""
    for out in outputs:
        a = run_node(out.node, read)
        if tuple(a.shape) != out.node.shape:  # the planner and the kernels disagree: a bug
            raise AssertionError(f"{out.name}: planned {out.node.shape}, produced {a.shape}")
        yield out, a
