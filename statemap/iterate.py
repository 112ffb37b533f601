"""Mapped tensors one at a time, for loaders that consume weights lazily.

vLLM's ``model.load_weights(weights: Iterable[tuple[str, torch.Tensor]])`` and similar loaders
take ``(name, tensor)`` pairs and copy each into the model's parameters. :func:`iter_state_dict`
yields them from a checkpoint file (each tensor read and computed when it is asked for, so memory
holds one tensor, not the checkpoint) or from an in-memory state dict (torch tensors come back
as the same objects / views, computed with torch ops on their own device, as with
:func:`statemap.map_state_dict`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .load import Checkpoint
from .plan import Plan
from .report import Report


class MappedTensors:
    """An iterator of ``(name, torch.Tensor)``, planned and checked before the first tensor is read.

    ``report`` is the conversion's report (available before iterating). Close it (or use it as a
    context manager, or exhaust it) to close the source file.
    """

    def __init__(self, report: Report, names: list[str], produce: Any, closer: Any = None) -> None:
        self.report = report
        self._names = names
        self._produce = produce
        self._closer = closer
        self._i = 0

    def __iter__(self) -> MappedTensors:
        return self

    def __len__(self) -> int:
        return len(self._names)

    def __next__(self) -> tuple[str, Any]:
        if self._i >= len(self._names):
            self.close()
            raise StopIteration
        i = self._i
        self._i += 1
        try:
            return self._names[i], self._produce(i)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        closer, self._closer = self._closer, None
        if closer is not None:
            closer()

    def __enter__(self) -> MappedTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def iter_state_dict(
    spec: Any,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    vars: Mapping[str, Any] | None = None,
    tied: str | None = None,
    expect: Any = None,
    vars_from: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> MappedTensors:
    """Yield ``(name, torch.Tensor)`` for each output of ``spec`` applied to ``source``, one at a time.

    ``source`` is a checkpoint file (any format statemap reads; nothing is read until a tensor is
    asked for, then only what that tensor needs) or a state dict (torch tensors or numpy arrays;
    for a spec with ``inputs:``, one state dict per file, keyed as :func:`statemap.map_state_dict`
    takes them). ``vars_from``: a config for the spec's ``{config: KEY}`` vars.
    Every check runs before the first tensor: the plan, the spec's ``expect`` / ``expect``, and
    ``assume:`` facts (read from the source when the metadata cannot prove them). Names tied by the
    spec are yielded as the spec's ``tied`` policy (or ``tied``) says: ``dedupe`` yields each tied
    group once (the loader re-ties, as ``from_pretrained`` and vLLM do), ``clone`` yields every name.

    Example::

        >>> with iter_state_dict("deltalm-fairseq-to-hf", "checkpoint_best.pt") as weights:
        ...     names = [name for name, tensor in weights]   # vLLM: model.load_weights(weights)
        >>> len(names) == len(weights)
        True
    """
    from .api import _report, _to_write, memory_source, plan_for
    from .source import open_source
    from .spec import load_spec
    from .verify import run_checks

    spec = load_spec(spec, vars)
    if isinstance(source, Mapping):
        spec, ck, input_rows, torch_device = memory_source(spec, source, vars_from, "iter_state_dict")
        if torch_device is None:
            return _from_checkpoint(spec, ck, tied, expect, close=False)
        from .torch_apply import as_numpy, run_node_torch

        device = torch_device[0]
        plan = plan_for(spec, ck)
        report = _report(spec, ck, plan, expect)
        report.inputs = input_rows
        report.assumptions = run_checks(plan, ck.read, lambda node: as_numpy(run_node_torch(node, ck.read, device)))
        outs = _to_write(spec, plan, tied)
        if (tied or spec.tied) == "dedupe":
            report.written_once = [list(g) for g in plan.same]
        return MappedTensors(report, [o.name for o in outs], _torch_producer(outs, ck, device))
    ck, spec = open_source(spec, source, vars_from)
    try:
        return _from_checkpoint(spec, ck, tied, expect, close=True)
    except BaseException:
        ck.close()
        raise


def _torch_producer(outs: list[Any], ck: Checkpoint, device: Any) -> Any:
    from .torch_apply import run_node_torch

    emitted: set[int] = set()

    def produce(i: int) -> Any:
        t = run_node_torch(outs[i].node, ck.read, device)
        if id(t) in emitted:  # `copy`: independent tensors, even of an untouched source
            t = t.clone()
        emitted.add(id(t))
        return t

    return produce


def _from_checkpoint(spec: Any, ck: Checkpoint, tied: str | None, expect: Any, close: bool) -> MappedTensors:
    from .api import _report, _to_write, plan_for
    from .apply import run_node
    from .torch_adapter import to_torch
    from .verify import run_checks

    plan: Plan = plan_for(spec, ck)
    report = _report(spec, ck, plan, expect)
    report.assumptions = run_checks(plan, ck.read)
    outs = _to_write(spec, plan, tied)
    if (tied or spec.tied) == "dedupe":
        report.written_once = [list(g) for g in plan.same]

    def produce(i: int) -> Any:
        o = outs[i]
        a = run_node(o.node, ck.read)
        if tuple(a.shape) != o.node.shape:  # the planner and the kernels disagree: a bug
            raise AssertionError(f"{o.name}: planned {o.node.shape}, produced {a.shape}")
        return to_torch(a, o.node.dtype)

    return MappedTensors(report, [o.name for o in outs], produce, ck.close if close else None)


__all__ = ["iter_state_dict", "MappedTensors"]
