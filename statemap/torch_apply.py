"""apply, on torch tensors: run a plan's recipes with torch ops, on the tensors' own device and dtype.

The zero-copy path of :func:`statemap.map_state_dict`: a renamed tensor comes back as the *same*
tensor object, dim-0 slices as views, and every other recipe runs as torch ops (bf16, fp8, cuda
and meta tensors stay what they are; nothing goes through numpy). Like :mod:`statemap.apply`,
this module only evaluates recipes the planner has already checked.

Example::

    >>> import torch
    >>> from statemap import load_spec, make_plan
    >>> sd = {"enc.w": torch.ones(2, 3)}
    >>> metas, ties = torch_metas(sd)
    >>> plan = make_plan(load_spec("name: t\\nversion: 1\\nrules:\\n  - rename: enc.w -> model.enc.w\\n"), metas.values())
    >>> run_node_torch(plan.outputs[0].node, sd.__getitem__) is sd["enc.w"]   # a rename: the same tensor
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .dtypes import dtype as lookup_dtype
from .errors import CheckpointError
from .meta import Node, TensorMeta


def _torch_dtype(name: str) -> Any:
    import torch

    dt = getattr(torch, lookup_dtype(name).name, None)
    if dt is None:
        raise CheckpointError(f"this torch has no dtype {name!r}")
    return dt


def torch_metas(state: Mapping[str, Any], name: str = "<state_dict>") -> tuple[dict[str, TensorMeta], list[list[str]]]:
    """Names, shapes and dtypes of a dict of torch tensors, and the groups that are one tensor
    (same storage, offset, shape and stride; ``meta`` tensors have no storage, so never tied)."""
    import torch

    metas: dict[str, TensorMeta] = {}
    groups: dict[tuple[Any, ...], list[str]] = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{name}: key {k!r} is not a string")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{name}: value of {k!r} is {type(v).__name__}, not a tensor")
        metas[k] = TensorMeta(k, tuple(int(d) for d in v.shape), lookup_dtype(str(v.dtype).removeprefix("torch.")).name)
        if v.device.type != "meta" and v.numel():
            ident = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
            groups.setdefault(ident, []).append(k)
    return metas, [g for g in groups.values() if len(g) > 1]


def run_node_torch(node: Node, get: Callable[[str], Any], device: Any = None) -> Any:
    """Evaluate one recipe with torch ops. ``get(key)`` returns the source tensor (not copied)."""
    import torch

    k = node.kind
    if k == "source":
        t = get(node.args[0])
        if tuple(t.shape) != node.shape:
            raise CheckpointError(f"tensor {node.args[0]!r} has shape {list(t.shape)}, the plan says {list(node.shape)}")
        return t
    if k == "fill":
        return torch.full(node.shape, node.args[0], dtype=_torch_dtype(node.dtype), device=device)
    ins = [run_node_torch(n, get, device) for n in node.inputs]
    if k == "slice":
        dim, start, stop, step = node.args
        idx = [slice(None)] * ins[0].dim()
        idx[dim] = slice(start, stop, step)
        return ins[0][tuple(idx)].contiguous()  # a view when the slice is contiguous (dim-0 splits)
    if k == "concat":
        return torch.cat(ins, dim=node.args[0])
    if k == "stack":
        return torch.stack(ins, dim=node.args[0])
    if k == "permute":
        return ins[0].permute(*node.args[0]).contiguous()
    if k == "reshape":
        return ins[0].reshape(node.args[0])
    if k == "pad":
        dim, size, value = node.args
        out = torch.full(node.shape, value, dtype=_torch_dtype(node.dtype), device=ins[0].device)
        out.narrow(dim, 0, ins[0].shape[dim]).copy_(ins[0])
        return out
    if k == "view":
        return ins[0].view(_torch_dtype(node.dtype))
    if k == "cast":
        return ins[0].to(_torch_dtype(node.dtype))
    raise AssertionError(f"unknown node kind {k!r}")


def as_numpy(t: Any) -> Any:
    """A torch tensor's bits as numpy (for verifying ``assume:`` facts); refuses ``meta`` tensors."""
    if t.device.type == "meta":
        raise CheckpointError("a meta tensor holds no values, so an `assume:` fact about it cannot be verified")
    from .torch_adapter import to_numpy

    return to_numpy(t)[0]


__all__ = ["torch_metas", "run_node_torch", "as_numpy"]
