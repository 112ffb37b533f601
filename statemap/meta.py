"""Metadata types shared by load -> plan -> apply: names, shapes and dtypes, no bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .dtypes import dtype as _dtype


@dataclass(frozen=True)
class TensorMeta:
    """What a reader knows about a tensor before reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch spelling, e.g. "float32"

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        # what the generated __init__ does, without a setattr call per field: one is built per
        # key (200k for a large MoE index), several times over
        d = self.__dict__
        d["name"] = name
        d["shape"] = shape
        d["dtype"] = dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes; computed once (the writers ask ~9 times per tensor: 200k-tensor
        outputs spent seconds here). Kept in the instance dict by hand: ``functools.cached_property``
        takes a lock at each first access on Python 3.11."""
        d = self.__dict__
        n = d.get("_nbytes")
        if n is None:
            n = d["_nbytes"] = _dtype(self.dtype).nbytes(math.prod(self.shape))
        return n


@dataclass(frozen=True)
class Node:
    """A recipe for one tensor, built by the planner, run by :mod:`statemap.apply`.

    ``kind`` is one of the primitives below; ``args`` are concrete (vars resolved):

    ========  =========================================  ===========================
    kind      args                                       inputs
    ========  =========================================  ===========================
    source    (key,)                                     none
    slice     (dim, start, stop, step)                   1
    concat    (dim,)                                     n
    stack     (dim,)                                     n
    permute   (axes,)                                    1
    reshape   (shape,)                                   1
    pad       (dim, size, value)                         1
    cast      (dtype,)                                   1
    view      (dtype,)  same bits, another type          1
    fill      (value,)                                   none
    ========  =========================================  ===========================
    """

    kind: str
    shape: tuple[int, ...]
    dtype: str
    inputs: tuple[Node, ...] = ()
    args: tuple[Any, ...] = ()

    @property
    def meta_numel(self) -> int:
        return math.prod(self.shape)

    def sources(self) -> list[str]:
        """Source keys this recipe reads, in order."""
        if self.kind == "source":
            return [self.args[0]]
        out: list[str] = []
        for n in self.inputs:
            out.extend(k for k in n.sources() if k not in out)
        return out

    def describe(self) -> str:
        if self.kind == "source":
            return self.args[0]
        inner = ", ".join(n.describe() for n in self.inputs)
        args = ", ".join(map(str, self.args))
        return f"{self.kind}({inner}{'; ' if inner and args else ''}{args})"
