"""diff: compare two checkpoints by names, shapes, dtypes and (optionally) values."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import progress
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
    max_abs: float | None  # None: not compared, ``note`` says why (B is A transposed)
    allclose: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "max_abs": self.max_abs, "allclose": self.allclose} | (
            {"note": self.note} if self.note else {}
        )


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
    retied: dict[str, str] = field(default_factory=dict)  # --spec with tied: dedupe: names left to the loader -> rule

    def summary(self) -> str:
        """The last line of a diff, with the verdict.

        Example::

            >>> DiffResult("a.pt", "b.pt", n_common=3).summary()
            'diff: 3 common keys, 0 only in A, 0 only in B, 0 shape mismatches, 0 dtype mismatches -> same'
        """
        parts = [
            f"{self.n_common} common keys",
            f"{len(self.only_a)} only in A",
            f"{len(self.only_b)} only in B",
            f"{len(self.shape)} shape mismatch{'' if len(self.shape) == 1 else 'es'}",
            f"{len(self.dtype)} dtype mismatch{'' if len(self.dtype) == 1 else 'es'}",
        ]
        if self.compared_values:
            bad = sum(1 for v in self.values if not v.allclose)
            parts.append(f"{bad} value mismatch{'' if bad == 1 else 'es'}")
        return "diff: " + ", ".join(parts) + (" -> same" if self.same else " -> different")

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
            "values": [v.to_json() for v in self.values] if self.compared_values else None,
            "explain": self.explanation.to_json() if self.explanation is not None else None,
        } | ({"retied_on_load": self.retied} if self.retied else {})


def diff_checkpoints(
    a: Checkpoint | str | os.PathLike[str],
    b: Checkpoint | str | os.PathLike[str],
    values: bool = False,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    rule_of: dict[str, str] | None = None,
) -> DiffResult:
    """Compare two checkpoints (paths, or opened checkpoints). ``values`` also reads every tensor
    once and explains each B key by A's content (:func:`statemap.correspond.explain`), and
    compares common keys' values. ``rule_of``: A key -> the rule (file:line) that produced it,
    when A is a planned spec.

    Example::

        >>> diff_checkpoints("model.pt", "model.pt").same
        True
        >>> from statemap import open_checkpoint
        >>> with open_checkpoint("model.pt") as a:
        ...     len(diff_checkpoints(a, "model.pt", values=True).values)
        395
    """
    if not isinstance(a, Checkpoint) or not isinstance(b, Checkpoint):
        from .load import open_checkpoint

        for ref in (a, b):
            if not isinstance(ref, (Checkpoint, str, os.PathLike)):
                raise TypeError(f"diff_checkpoints: expected a path or an opened checkpoint, got {type(ref).__name__}")
        with contextlib.ExitStack() as stack:
            ca = a if isinstance(a, Checkpoint) else stack.enter_context(open_checkpoint(a))
            cb = b if isinstance(b, Checkpoint) else stack.enter_context(open_checkpoint(b))
            return diff_checkpoints(ca, cb, values, atol, rtol, rule_of)
    r = DiffResult(a.path, b.path)
    if rule_of:  # names the spec writes once (tied: dedupe) and B leaves to its loader, as apply writes them
        r.retied = {k: v for k, v in rule_of.items() if k not in a.metas and k not in b.metas}
    if a.metas.keys() == b.metas.keys():  # the same names (compared as sets, in C): every key is common
        common = list(a.metas)
    else:
        r.only_a = [m for k, m in a.metas.items() if k not in b.metas]
        r.only_b = [m for k, m in b.metas.items() if k not in a.metas]
        common = [k for k in a.metas if k in b.metas]
    r.n_common = len(common)
    bm = b.metas
    for k, ma in a.metas.items() if a.metas is not bm else ():  # one checkpoint against itself: nothing differs
        mb = bm.get(k)
        if mb is None:
            continue
        if ma.shape != mb.shape:
            r.shape.append(Mismatch(k, list(ma.shape), list(mb.shape)))
        if ma.dtype != mb.dtype:
            r.dtype.append(Mismatch(k, ma.dtype, mb.dtype))
    if values:
        from .correspond import explain
        from .load.checkpoint import reuse_buffers

        r.compared_values = True
        total = [m for m in a.metas.values()] + [m for m in b.metas.values()]
        with progress.task("reading A and B", len(total), sum(m.nbytes for m in total)) as bar, reuse_buffers():
            with _FileRanges(a, bar) as a_ranges, _FileRanges(b, bar) as b_ranges:
                a_read, b_read = a_ranges.read, b_ranges.read
                r.explanation = explain(
                    a.metas, a_read, b.metas, b_read, rule_of, names=(a.path, b.path), a_ranges=a_ranges, b_ranges=b_ranges
                )
                r.values = _compare_values(r, a_read, b_read, a, b, common, atol, rtol)
    return r


class _FileRanges:
    """``read``: ``ck.read`` that advances ``bar`` the first time each tensor is read. Called with a
    key: a reader of byte ranges of that tensor's data in its file (``rr(offset, count, out)``), for
    a tensor stored contiguously in a file, else None (read it whole); the first call advances
    ``bar`` too. The files are opened once, closed on exit."""

    def __init__(self, ck: Checkpoint, bar: progress.Task) -> None:
        import threading

        self.ck, self.bar = ck, bar
        self.seen: set[str] = set()
        self.fds: dict[str, int] = {}
        self.lock = threading.Lock()

    def _advance(self, k: str) -> None:
        with self.lock:
            if k in self.seen or k not in self.ck.metas:
                return
            self.seen.add(k)
        self.bar.advance(1, self.ck.metas[k].nbytes)

    def read(self, k: str) -> Any:
        a = self.ck.read(k)
        self._advance(k)
        return a

    def __call__(self, k: str) -> Callable[[int, int, Any], Any] | None:
        from .errors import CheckpointError

        loc, meta = self.ck.locations.get(k), self.ck.metas.get(k)
        if loc is None or meta is None or not loc.contiguous or loc.dtype != meta.dtype or tuple(loc.shape) != tuple(meta.shape):
            return None
        with self.lock:
            fd = self.fds.get(loc.file)
            if fd is None:
                try:
                    fd = self.fds[loc.file] = os.open(loc.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    return None  # the checkpoint's own reader reads it whole, or says why not
        self._advance(k)
        base, end, path = loc.offset, meta.nbytes, loc.file

        def rr(offset: int, count: int, out: Any) -> Any:
            if offset < 0 or offset + count > end:
                raise ValueError(f"bytes {offset}:{offset + count} are outside the tensor's {end}")
            view, got = out.data.cast("B")[:count], 0
            while got < count:
                n = os.preadv(fd, [view[got:]], base + offset + got)
                if n <= 0:
                    raise CheckpointError(f"{path}: tensor {k!r}: data runs past the end of the file (truncated?)")
                got += n
            return out

        return rr

    def __enter__(self) -> _FileRanges:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


_BLOCK = 1 << 18  # elements compared at a time (float64 temporaries of 2 MB)


def _compare_values(
    r: DiffResult,
    a_read: Callable[[str], Any],
    b_read: Callable[[str], Any],
    a: Checkpoint,
    b: Checkpoint,
    common: list[str],
    atol: float,
    rtol: float,
) -> list[ValueDiff]:
    import threading

    import numpy as np

    from .correspond import _BIG_ONE, _each

    got: dict[str, ValueDiff] = {}
    todo = []
    transposed = {c.b for c in r.explanation.b if c.kind == "transposed" and c.a == (c.b,) and c.detail == "B = A transposed"}
    for k in common:
        ma, mb = a.metas[k], b.metas[k]
        if ma.shape != mb.shape:
            continue
        if k in r.explanation.equal:  # equal values, proven by the fingerprints: not read again
            got[k] = ValueDiff(k, 0.0, True)
        elif k in transposed:  # a square B that is A transposed: said so, not compared element by element
            got[k] = ValueDiff(k, None, False, "B = A transposed")
        else:
            todo.append(k)
    reading, big = threading.Lock(), threading.Lock()

    def one(k: str) -> None:  # on two threads: one reads (one read at a time) while the other compares
        ma, mb = a.metas[k], b.metas[k]
        with big if ma.nbytes + mb.nbytes > _BIG_ONE else contextlib.nullcontext():  # embeddings one pair at a time
            with reading:
                ra, rb = np.asarray(a_read(k)).reshape(-1), np.asarray(b_read(k)).reshape(-1)
            got[k] = _compare_one(k, ra, rb, ma.dtype, mb.dtype, atol, rtol)

    _each(todo, one, 2 if len(todo) > 1 else 1)
    return [got[k] for k in common if k in got]


def _compare_one(k: str, ra: np.ndarray, rb: np.ndarray, da: str, db: str, atol: float, rtol: float) -> ValueDiff:
    """Max abs difference and allclose of two flat arrays, in blocks (bounded float64 temporaries)."""
    import numpy as np

    if ra.size == 0:
        return ValueDiff(k, 0.0, True)
    # in blocks: bounded float64 temporaries, the same max and verdict as over the whole tensor
    max_abs, close = float("nan"), True
    for i in range(0, ra.size, _BLOCK):
        xa, xb = _values(ra[i : i + _BLOCK], da), _values(rb[i : i + _BLOCK], db)
        d = np.abs(xa - xb)
        if not np.isnan(d).all():
            m = float(np.nanmax(d))
            max_abs = m if math.isnan(max_abs) else max(max_abs, m)
        close = close and bool(np.allclose(xa, xb, atol=atol, rtol=rtol, equal_nan=True))
    return ValueDiff(k, max_abs, close)


def _values(a: np.ndarray, dt_name: str) -> np.ndarray:
    import numpy as np

    dt = lookup_dtype(dt_name)
    if dt.native or dt.name == "bfloat16":
        return to_compute(a, dt).astype(np.float64)
    return a.astype(np.float64)  # float8: compare the bits as numbers


def render_diff(r: DiffResult, console: Any) -> None:
    """Print a diff: each section as a table, then one summary line with the verdict (``-> same`` / ``-> different``)."""
    from .report import table
    from .textsafe import styled

    console.print(styled(("A", "bold"), f" {r.a}"))
    console.print(styled(("B", "bold"), f" {r.b}"))
    console.print(f"{r.n_common} common keys, {len(r.only_a)} only in A, {len(r.only_b)} only in B")
    if r.retied:
        console.print(f"not in B, as the spec writes them (tied: dedupe; the loader re-ties them): {len(r.retied)}", style="dim")
        for k, rule in r.retied.items():
            console.print(f"  {k}: {rule}", style="dim")
    for title, metas in (("only in A", r.only_a), ("only in B", r.only_b)):
        if metas:
            cells: list[tuple[str, ...]] = [
                (row.name, str(list(row.shape or ())), row.dtype or "", f"x{row.count}" if row.count > 1 else "")
                for row in fold((m.name, m) for m in metas)
            ]
            console.print(table(f"{title} ({len(metas)})", ("key", "shape", "dtype", "count"), cells, "red"))
    for title, mism in (("shape mismatch", r.shape), ("dtype mismatch", r.dtype)):
        if mism:
            cells = [(m.name, str(m.expected), str(m.got)) for m in mism]
            console.print(table(f"{title} ({len(mism)})", ("key", "A", "B"), cells, "red"))
    if r.compared_values:
        bad = [v for v in r.values if not v.allclose]
        worst = max((v.max_abs for v in r.values if v.max_abs is not None), default=0.0)
        noted = sum(1 for v in r.values if v.max_abs is None)
        skipped = f" ({noted} not compared: B = A transposed)" if noted else ""
        console.print(f"values: {len(r.values) - len(bad)}/{len(r.values)} allclose; max abs diff {worst:.3g}{skipped}")
        if bad:
            cells = [(v.name, f"{v.max_abs:.4g}" if v.max_abs is not None else v.note) for v in bad]
            console.print(table(f"value mismatch ({len(bad)})", ("key", "max abs diff"), cells, "red"))
    if r.explanation is not None:
        from .correspond import render_explanation

        render_explanation(r.explanation, console)
    console.print(r.summary(), style="green" if r.same else "red")
