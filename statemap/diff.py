"""diff: compare two checkpoints by names, shapes, dtypes and (optionally) values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .dtypes import dtype as lookup_dtype
from .dtypes import to_compute
from .load import Checkpoint
from .meta import TensorMeta
from .report import Mismatch, fold

if TYPE_CHECKING:
    import numpy as np


@dataclass
class ValueDiff:
    name: str
    max_abs: float
    allclose: bool


@dataclass
class DiffResult:
    """Sections of a diff; ``same`` is True when there is nothing in any of them."""

    a: str
    b: str
    only_a: list[TensorMeta] = field(default_factory=list)
    only_b: list[TensorMeta] = field(default_factory=list)
    shape: list[Mismatch] = field(default_factory=list)
    dtype: list[Mismatch] = field(default_factory=list)
    values: list[ValueDiff] = field(default_factory=list)
    n_common: int = 0
    compared_values: bool = False
    explanation: Any = None  # correspond.Explanation with --values: every B key explained by A's content

    @property
    def same(self) -> bool:
        return not (self.only_a or self.only_b or self.shape or self.dtype or any(not v.allclose for v in self.values))

    def to_json(self) -> dict[str, Any]:
        def metas(ms: list[TensorMeta]) -> list[dict[str, Any]]:
            return [{"name": m.name, "shape": list(m.shape), "dtype": m.dtype} for m in ms]

        return {
            "a": self.a,
            "b": self.b,
            "same": self.same,
            "n_common": self.n_common,
            "only_in_a": metas(self.only_a),
            "only_in_b": metas(self.only_b),
            "shape_mismatch": [vars(m) for m in self.shape],
            "dtype_mismatch": [vars(m) for m in self.dtype],
            "values": [vars(v) for v in self.values] if self.compared_values else None,
            "explain": self.explanation.to_json() if self.explanation is not None else None,
        }


def diff_checkpoints(
    a: Checkpoint,
    b: Checkpoint,
    values: bool = False,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    rule_of: dict[str, str] | None = None,
) -> DiffResult:
    """Compare two opened checkpoints. ``values`` also reads every tensor once and explains each B
    key by A's content (:func:`statemap.correspond.explain`), and compares common keys' values.
    ``rule_of``: A key -> the rule (file:line) that produced it, when A is a planned spec.

    Example::

        >>> with open_checkpoint("a.pt") as a, open_checkpoint("b.safetensors") as b:
        ...     print(diff_checkpoints(a, b).same)
    """
    r = DiffResult(a.path, b.path)
    r.only_a = [m for k, m in a.metas.items() if k not in b.metas]
    r.only_b = [m for k, m in b.metas.items() if k not in a.metas]
    common = [k for k in a.metas if k in b.metas]
    r.n_common = len(common)
    for k in common:
        ma, mb = a.metas[k], b.metas[k]
        if ma.shape != mb.shape:
            r.shape.append(Mismatch(k, list(ma.shape), list(mb.shape)))
        if ma.dtype != mb.dtype:
            r.dtype.append(Mismatch(k, ma.dtype, mb.dtype))
    if values:
        import numpy as np

        from .correspond import explain

        r.compared_values = True
        r.explanation = explain(a.metas, a.read, b.metas, b.read, rule_of, names=(a.path, b.path))
        for k in common:
            ma, mb = a.metas[k], b.metas[k]
            if ma.shape != mb.shape:
                continue
            if k in r.explanation.equal:  # equal values, proven by the fingerprints: not read again
                r.values.append(ValueDiff(k, 0.0, True))
                continue
            xa = _values(a.read(k), ma.dtype)
            xb = _values(b.read(k), mb.dtype)
            if xa.size == 0:
                r.values.append(ValueDiff(k, 0.0, True))
                continue
            d = np.abs(xa - xb)
            max_abs = float(np.nanmax(d)) if not np.isnan(d).all() else float("nan")
            close = bool(np.allclose(xa, xb, atol=atol, rtol=rtol, equal_nan=True))
            r.values.append(ValueDiff(k, max_abs, close))
    return r


def _values(a: np.ndarray, dt_name: str) -> np.ndarray:
    import numpy as np

    dt = lookup_dtype(dt_name)
    if dt.native or dt.name == "bfloat16":
        return to_compute(a, dt).astype(np.float64)
    return a.astype(np.float64)  # float8: compare the bits as numbers


def render_diff(r: DiffResult, console: Any) -> None:
    from rich.table import Table

    from .textsafe import styled

    console.print(styled(("A", "bold"), f" {r.a}"))
    console.print(styled(("B", "bold"), f" {r.b}"))
    console.print(f"{r.n_common} common keys, {len(r.only_a)} only in A, {len(r.only_b)} only in B")
    for title, metas in (("only in A", r.only_a), ("only in B", r.only_b)):
        if metas:
            t = Table(title=f"{title} ({len(metas)})", title_justify="left", title_style="red", show_edge=False)
            for c in ("key", "shape", "dtype", "count"):
                t.add_column(c)
            for row in fold((m.name, m) for m in metas):
                t.add_row(row.name, str(list(row.shape or ())), row.dtype or "", f"x{row.count}" if row.count > 1 else "")
            console.print(t)
    for title, mism in (("shape mismatch", r.shape), ("dtype mismatch", r.dtype)):
        if mism:
            t = Table(title=f"{title} ({len(mism)})", title_justify="left", title_style="red", show_edge=False)
            for c in ("key", "A", "B"):
                t.add_column(c)
            for m in mism:
                t.add_row(m.name, str(m.expected), str(m.got))
            console.print(t)
    if r.compared_values:
        bad = [v for v in r.values if not v.allclose]
        worst = max((v.max_abs for v in r.values), default=0.0)
        console.print(f"values: {len(r.values) - len(bad)}/{len(r.values)} allclose; max abs diff {worst:.3g}")
        if bad:
            t = Table(title=f"value mismatch ({len(bad)})", title_justify="left", title_style="red", show_edge=False)
            t.add_column("key")
            t.add_column("max abs diff", justify="right")
            for v in bad:
                t.add_row(v.name, f"{v.max_abs:.4g}")
            console.print(t)
    if r.explanation is not None:
        from .correspond import render_explanation

        render_explanation(r.explanation, console)
    console.print("same" if r.same else "different", style="green" if r.same else "red")
