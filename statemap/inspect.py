"""inspect: tensors and parameters per module, folded by layer index.

The numbers people count by hand ("16 x 12 = 192") in one table::

    roberta.encoder.layer.{0-11}   16 x12   192 tensors   85,054,464 params
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

from .load import Checkpoint
from .load.checkpoint import Columns

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
        if cols is None or not _fold_columns(cols, depth, groups, params):
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


def _fold_columns(cols: Columns, depth: int, groups: dict[str, dict[int | None, int]], params: dict[str, int]) -> bool:
    """:func:`module_rows`' grouping for many keys without a Python call per key: one regex pass
    over the newline-joined keys gives each key's head and layer index as one text (what
    ``_FIRST_INDEX``'s search finds in it) or, for a key without one, the key itself; ``Counter`` then counts the
    (head, index, dtype and shape) combinations in C, in order of first appearance (the order
    the per-key loop inserts modules and indexes in). False when a key holds a newline."""
    from collections import Counter

    names = cols.names
    joined = "\n".join(names)
    if joined.count("\n") != len(names) - 1:
        return False
    found = _FIRST_INDEX_LINES.findall(joined)
    if len(found) != len(names):  # pragma: no cover - one match per line, always
        return False
    numel = {k: math.prod(v[1]) for k, v in cols.kinds.items()}
    if len(numel) == 1:  # one dtype and shape for every key: count the matches alone
        counted: Any = zip(Counter(found).items(), itertools.repeat(next(iter(numel))))
        counted = (((f, kind), n) for (f, n), kind in counted)
    else:
        counted = Counter(zip(found, cols.kind_of)).items()
    for (found_text, kind), n in counted:
        split = _HEAD_INDEX.fullmatch(found_text)  # (once per distinct text, not per key)
        mod, idx = (split[1] + "{}", int(split[2])) if split else _module_of(found_text, depth)
        inst = groups.setdefault(mod, {})
        inst[idx] = inst.get(idx, 0) + n
        params[mod] = params.get(mod, 0) + numel[kind] * n
    return True


# per line of newline-joined keys: the text up to the first all-digit segment that is not the last
# one and the dot after it -- `_FIRST_INDEX`'s search -- or the whole key when there is none (which
# never ends with such a segment and its dot); _HEAD_INDEX splits the first kind into head and digits
_FIRST_INDEX_LINES = re.compile(r"^(?:(?:[^.\n]*\.)*?\d+\.|.*)", re.M)
_HEAD_INDEX = re.compile(r"((?:[^.\n]*\.)*?)(\d+)\.")


def dtype_counts(ck: Checkpoint) -> dict[str, int]:
    """Tensors per dtype, in order of first appearance."""
    from collections import Counter

    from .load.checkpoint import columns_of

    cols = columns_of(ck.metas)
    if cols is None:
        return dict(Counter(m.dtype for m in ck.metas.values()))
    out: dict[str, int] = {}
    for (dt, _, _), n in cols.kind_counts():  # kinds in order of first appearance: so are their dtypes
        out[dt] = out.get(dt, 0) + n
    return out


def totals(ck: Checkpoint) -> tuple[int, int]:
    """(parameters, bytes) of every tensor of ``ck``.

    Example::

        >>> from statemap import open_checkpoint
        >>> totals(open_checkpoint("model.safetensors"))
        (56640, 226560)
    """

    from .load.checkpoint import columns_of

    cols = columns_of(ck.metas)
    if cols is None:
        return sum(m.numel for m in ck.metas.values()), sum(m.nbytes for m in ck.metas.values())
    return sum(math.prod(shape) * n for (_, shape, _), n in cols.kind_counts()), cols.total_bytes()


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
