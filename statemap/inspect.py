"""inspect: tensors and parameters per module, folded by layer index.

The numbers people count by hand ("16 x 12 = 192") in one table::

    roberta.encoder.layer.{0-11}   16 x12   192 tensors   85,054,464 params
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from .load import Checkpoint
from .meta import TensorMeta

_INDEX = re.compile(r"^\d+$")
_FIRST_INDEX = re.compile(r"(?<![^.])(\d+)\.")  # the first all-digit segment that is not the last one


@dataclass(frozen=True)
class ModuleRow:
    module: str  # folded, e.g. "encoder.layers.{0-11}"
    per_instance: int  # tensors in one instance
    instances: int
    tensors: int
    params: int

    def to_json(self) -> dict[str, Any]:
        return vars(self)


def _module_of(name: str, depth: int) -> tuple[str, int | None]:
    """('encoder.layers.3.fc1.weight', 2) -> ('encoder.layers.{}', 3)."""
    if "\n" not in name:  # one search instead of a match per segment (`$` also matches before a newline)
        m = _FIRST_INDEX.search(name)
        if m is not None:
            return name[: m.start()] + "{}", int(m.group(1))
        return ".".join(name.split(".")[:-1][:depth]) or "(top level)", None
    segs = name.split(".")[:-1]
    for i, s in enumerate(segs):
        if _INDEX.match(s):
            return ".".join(segs[:i] + ["{}"]), int(s)
    return ".".join(segs[:depth]) or "(top level)", None


def module_rows(ck: Checkpoint, depth: int = 2) -> list[ModuleRow]:
    """Group a checkpoint's tensors by module (first layer index folded, else ``depth`` segments).

    Example::

        >>> from statemap import open_checkpoint
        >>> for row in module_rows(open_checkpoint("model.pt"))[:3]:     # fairseq DeltaLM, 6 + 6 layers
        ...     print(row.module, row.per_instance, row.instances)
        encoder 1 1
        encoder.embed_tokens 1 1
        encoder.embed_positions 1 1
    """
    from .gcpause import paused
    from .load.checkpoint import columns_of

    groups: dict[str, dict[int | None, int]] = {}  # module -> instance index -> tensors
    params: dict[str, int] = {}
    with paused():
        cols = columns_of(ck.metas)
        if cols is not None and "\n" not in "".join(cols.names):
            _fold_columns(cols.names, cols.numels(), depth, groups, params)
        else:
            for name, m in ck.metas.items():
                mod, idx = _module_of(name, depth)
                inst = groups.setdefault(mod, {})
                inst[idx] = inst.get(idx, 0) + 1
                params[mod] = params.get(mod, 0) + m.numel
    rows = []
    for mod, inst in groups.items():
        keys = [k for k in inst if k is not None]
        label = mod
        if keys:
            from .report import _ranges

            label = mod.replace("{}", _ranges(keys))
        counts = list(inst.values())
        total = sum(counts)
        per = counts[0] if len(set(counts)) == 1 else total
        rows.append(ModuleRow(label, per, len(inst) if len(set(counts)) == 1 else 1, total, params[mod]))
    return rows


def _fold_columns(
    names: list[str], numels: Iterator[int], depth: int, groups: dict[str, dict[int | None, int]], params: dict[str, int]
) -> None:
    """:func:`module_rows`' grouping for many keys with no Python call per key (keys hold no
    newline, so the search finds what :func:`_module_of` finds): modules and instance indexes
    come from one regex search per key run by ``map``, counted with ``Counter`` (in C, in order of
    first appearance, as the per-key loop inserts them)."""
    from collections import Counter

    found = list(map(_FIRST_INDEX.search, names))
    if None in found:  # some keys have no layer index: those take the per-key path, in order
        sizes = list(numels)
        for name, m, n in zip(names, found, sizes):
            if m is None:
                mod, idx = _module_of(name, depth)
            else:
                mod, idx = name[: m.start()] + "{}", int(m.group(1))
            inst = groups.setdefault(mod, {})
            inst[idx] = inst.get(idx, 0) + 1
            params[mod] = params.get(mod, 0) + n
        return
    matches = cast("list[re.Match[str]]", found)
    heads = map(str.__getitem__, names, map(slice, itertools.repeat(0), map(re.Match.start, matches)))
    mods = list(map(str.__add__, heads, itertools.repeat("{}")))
    idxs = map(int, map(re.Match.group, matches, itertools.repeat(1)))
    for (mod, idx), n in Counter(zip(mods, idxs)).items():
        groups.setdefault(mod, {})[idx] = n
    for (mod, size), n in Counter(zip(mods, numels)).items():
        params[mod] = params.get(mod, 0) + size * n


def dtype_counts(ck: Checkpoint) -> dict[str, int]:
    """Tensors per dtype, in order of first appearance."""
    from collections import Counter

    from .load.checkpoint import columns_of

    cols = columns_of(ck.metas)
    return dict(Counter(cols.dtypes() if cols is not None else (m.dtype for m in ck.metas.values())))


def totals(ck: Checkpoint) -> tuple[int, int]:
    """(parameters, bytes) of every tensor of ``ck``.

    Example::

        >>> from statemap import open_checkpoint
        >>> totals(open_checkpoint("model.safetensors"))
        (124439808, 497759232)
    """
    from collections import Counter

    from .load.checkpoint import columns_of

    cols = columns_of(ck.metas)
    if cols is None:
        return sum(m.numel for m in ck.metas.values()), sum(m.nbytes for m in ck.metas.values())
    params = 0
    for (dt, shape, _), n in Counter(map(cols.kinds.__getitem__, cols.kind_of)).items():
        params += TensorMeta("", shape, dt).numel * n
    return params, cols.total_bytes()


def render_inspect(ck: Checkpoint, rows: list[ModuleRow], console: Any, show_extras: bool = True) -> None:
    from rich.table import Table

    total_t = sum(r.tensors for r in rows)
    total_p = sum(r.params for r in rows)
    dtypes = dtype_counts(ck)
    from .textsafe import styled

    where = (f" (state dict under {ck.container!r})", "dim") if ck.container else ""
    strip = (f" (prefix {ck.stripped_prefix!r} stripped)", "dim") if ck.stripped_prefix else ""
    console.print(styled((str(ck.path), "bold"), f" {ck.format}", where, strip))
    if ck.alternatives:
        console.print(
            styled(("also in the file: " + ", ".join(map(repr, ck.alternatives)) + " (choose one with --unwrap)", "dim"))
        )
    console.print(f"{total_t} tensors, {total_p:,} parameters, dtypes: " + ", ".join(f"{k} x{v}" for k, v in dtypes.items()))
    t = Table(show_edge=False)
    t.add_column("module", overflow="fold")
    t.add_column("tensors", justify="right")
    t.add_column("x", justify="right")
    t.add_column("total", justify="right")
    t.add_column("params", justify="right")
    for r in rows:
        t.add_row(r.module, str(r.per_instance), f"x{r.instances}" if r.instances > 1 else "", str(r.tensors), f"{r.params:,}")
    console.print(t)
    if show_extras and ck.extras:
        console.print("other entries: " + ", ".join(f"{k} ({_kind(v)})" for k, v in ck.extras.items()))
    if ck.metadata:
        console.print("metadata: " + ", ".join(f"{k}={v}" for k, v in ck.metadata.items()))
    if ck.skipped:
        console.print(f"non-tensor entries in the state dict: {', '.join(ck.skipped[:8])}", style="dim")


def _kind(v: Any) -> str:
    if isinstance(v, dict):
        return f"{len(v)} fields"
    if isinstance(v, list):
        return f"{len(v)} items"
    return type(v).__name__
