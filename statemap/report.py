"""report: what a conversion produced, what it left out, and how that compares to a target.

Layer indices are folded so a 24-layer model reads as one row per tensor kind::

    encoder.layers.{0-11}.fc1.weight  [3072, 768]  float32  x12
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .meta import TensorMeta

_INDEX = re.compile(r"^\d+$")


# -- folding -------------------------------------------------------------------------------


def _ranges(values: Sequence[int]) -> str:
    vs = sorted(set(values))
    parts: list[str] = []
    start = prev = vs[0]
    for v in [*vs[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return "{" + ",".join(parts) + "}"


def _split_key(name: str) -> tuple[str, tuple[int, ...]]:
    segs = name.split(".")
    idx = tuple(int(s) for s in segs if _INDEX.match(s))
    pattern = ".".join("{}" if _INDEX.match(s) else s for s in segs)
    return pattern, idx


@dataclass(frozen=True)
class FoldedRow:
    name: str  # e.g. encoder.layers.{0-11}.fc1.weight
    count: int
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    extra: str = ""

    def __str__(self) -> str:
        parts = [self.name]
        if self.shape is not None:
            parts.append(str(list(self.shape)))
        if self.dtype:
            parts.append(self.dtype)
        if self.count > 1:
            parts.append(f"x{self.count}")
        if self.extra:
            parts.append(self.extra)
        return " ".join(parts)


def fold(items: Iterable[tuple[str, Any]]) -> list[FoldedRow]:
    """Fold (name, info) pairs whose names differ only in integer segments and whose info agree.

    ``info`` is a TensorMeta, a (shape, dtype) tuple, a string, or None.
    """
    groups: dict[tuple[str, Any], list[tuple[int, ...]]] = {}
    single: dict[tuple[str, Any], str] = {}
    for name, info in items:
        pattern, idx = _split_key(name)
        if isinstance(info, TensorMeta):
            info = (info.shape, info.dtype)
        key = (pattern, info)
        groups.setdefault(key, []).append(idx)
        single.setdefault(key, name)
    rows: list[FoldedRow] = []
    for (pattern, info), idxs in groups.items():
        if len(idxs) == 1:
            name = single[(pattern, info)]
        else:
            cols = list(zip(*idxs))
            labels = [_ranges(list(c)) if len(set(c)) > 1 else str(c[0]) for c in cols]
            pieces = pattern.split("{}")
            name = "".join(p + (labels[i] if i < len(labels) else "") for i, p in enumerate(pieces))
        shape = dtype = None
        extra = ""
        if isinstance(info, tuple) and len(info) == 2:
            shape, dtype = info
        elif isinstance(info, str):
            extra = info
        rows.append(FoldedRow(name, len(idxs), shape, dtype, extra))
    return rows


def fold_names(names: Iterable[str]) -> list[str]:
    return [str(r) for r in fold((n, None) for n in names)]


def human_size(n: int) -> str:
    """Bytes for people, in the units ``--max-shard-size`` reads (1 KB = 1000 bytes).

    Example::

        >>> [human_size(n) for n in (0, 999, 1500, 231_400, 12_345_678, 3_000_000_000)]
        ['0 bytes', '999 bytes', '1.5 KB', '231.4 KB', '12.3 MB', '3.00 GB']
    """
    if n < 1000:
        return f"{n} byte{'' if n == 1 else 's'}"
    if n < 1e6:
        return f"{n / 1e3:.1f} KB"
    if n < 1e9:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.2f} GB" if n < 1e12 else f"{n / 1e12:.2f} TB"


# -- the report ------------------------------------------------------------------------------


@dataclass
class Mismatch:
    name: str
    expected: Any
    got: Any


@dataclass
class Report:
    """Everything a conversion did, for people (:func:`render`) and scripts (:meth:`to_json`)."""

    spec: str = ""
    source: str = ""
    output: str = ""
    source_format: str = ""
    container: str = ""
    alternatives: list[str] = field(default_factory=list)  # other state dicts in the file (EMA ...): pick with unwrap
    stripped_prefix: str = ""
    dry_run: bool = False
    produced: Sequence[TensorMeta] = field(default_factory=list)  # a list, or the plan's lazy sequence
    passthrough: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unmatched_rules: list[str] = field(default_factory=list)
    tied: list[list[str]] = field(default_factory=list)
    source_ties: list[list[str]] = field(default_factory=list)  # one tensor under several names in the source
    # tied: dedupe: one tensor written once under its first name; the loader re-ties the rest
    written_once: list[list[str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    expected: str = ""
    missing: list[TensorMeta] = field(default_factory=list)
    unexpected: list[TensorMeta] = field(default_factory=list)
    shape_mismatch: list[Mismatch] = field(default_factory=list)
    dtype_mismatch: list[Mismatch] = field(default_factory=list)
    not_restored: list[str] = field(default_factory=list)  # with --reverse: rules the reverse cannot undo
    conditions_not_met: list[str] = field(default_factory=list)  # rules whose `when:` held for no matched key
    assumptions: list[str] = field(default_factory=list)  # `assume:` facts and how each was verified
    # several input files (`inputs:`): one row each {file, captures, format, container, n_tensors, keys}
    inputs: list[dict[str, Any]] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)  # the spec's vars as used
    vars_from: str = ""  # the config the vars were read from
    files: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # --force: files of an earlier output at this name, replaced
    n_bytes: int = 0
    seconds: float = 0.0
    # shape and dtype of passed-through and dropped keys, for the tables (not in --json: the names are)
    metas: dict[str, TensorMeta] = field(default_factory=dict, repr=False)

    @property
    def written_to(self) -> str:
        """The output as written: the file, or ``INDEX and N shards`` for a sharded output."""
        if len(self.files) <= 1:
            return self.files[0] if self.files else self.output or "(memory)"
        index = [f for f in self.files if f.endswith(".index.json")]
        shards = len(self.files) - len(index)
        return f"{index[0]} and {shards} shards" if index else ", ".join(self.files)

    def summary(self) -> str:
        """The last line of a report: what happened, then ``-> ok`` or ``-> differs``.

        Example::

            >>> Report(produced=[TensorMeta("w", (2,), "float32")], output="out.safetensors", n_bytes=8).summary()
            'apply: wrote 1 tensor (8 bytes) to out.safetensors -> ok'
            >>> two = [TensorMeta("a", (2,), "float32"), TensorMeta("b", (2,), "float32")]
            >>> Report(produced=two, output="o.safetensors", n_bytes=8, written_once=[["a", "b"]]).summary()  # tied: dedupe
            'apply: wrote 1 tensor for 2 names (8 bytes) to o.safetensors -> ok'
            >>> r = Report(expected="ref.safetensors", missing=[TensorMeta("b", (2,), "float32")])
            >>> r.dtype_mismatch = [Mismatch("w", "float32", "uint16")]
            >>> r.summary()
            'expect: 1 missing, 0 unexpected, 0 shape mismatches, 1 dtype mismatch -> differs'
        """
        if not self.ok:
            counts = (
                (len(self.missing), "missing", "missing"),
                (len(self.unexpected), "unexpected", "unexpected"),
                (len(self.shape_mismatch), "shape mismatch", "shape mismatches"),
                (len(self.dtype_mismatch), "dtype mismatch", "dtype mismatches"),
            )
            return "expect: " + ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts) + " -> differs"
        n = len(self.produced)
        once = sum(len(g) - 1 for g in self.written_once)  # tied: dedupe stores each tied group once
        what = f"{n - once} tensor{'' if n - once == 1 else 's'}" + (f" for {n} names" if once else "")
        if self.dry_run:
            head = f"apply (dry run): would write {what}"
        else:
            head = f"apply: wrote {what} ({human_size(self.n_bytes)}) to {self.written_to}"
        if self.expected:
            head += f"; matches {self.expected}"
        return f"{head} -> ok"

    @property
    def ok(self) -> bool:
        """True when the output matches the expectation (or none was given)."""
        return not (self.missing or self.unexpected or self.shape_mismatch or self.dtype_mismatch)

    def compare(self, expected: Mapping[str, TensorMeta], label: str) -> None:
        """Fill missing / unexpected / mismatch sections against an expected key listing."""
        self.expected = label
        got = {m.name: m for m in self.produced}
        self.missing = [m for k, m in expected.items() if k not in got]
        self.unexpected = [m for k, m in got.items() if k not in expected]
        self.shape_mismatch, self.dtype_mismatch = [], []
        for k, e in expected.items():
            if k in got:
                g = got[k]
                if e.shape != g.shape:
                    self.shape_mismatch.append(Mismatch(k, list(e.shape), list(g.shape)))
                if e.dtype and g.dtype != e.dtype:
                    self.dtype_mismatch.append(Mismatch(k, e.dtype, g.dtype))

    def to_json(self) -> dict[str, Any]:
        # asdict without the metadata lists (it would deep-copy a planner's lazy sequence of
        # 200k outputs); those are listed below, in the same key order
        d = asdict(replace(self, produced=[], missing=[], unexpected=[], metas={}))
        d.pop("metas", None)
        if not self.removed:
            d.pop("removed")
        for key in ("produced", "missing", "unexpected"):
            d[key] = [{"name": m.name, "shape": list(m.shape), "dtype": m.dtype} for m in getattr(self, key)]
        d["ok"] = self.ok
        d["n_tensors"] = len(self.produced)
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


# -- rendering ---------------------------------------------------------------------------------


def table(title: str, heads: Sequence[str], cells: Sequence[Sequence[str]], style: str = "") -> Any:
    """A rich table of text cells with no empty column (the first is always kept); a ``count``
    column is right-aligned.

    Example::

        >>> t = table("dropped (1)", ("key", "shape", "count"), [("w", "[2]", "")])
        >>> [c.header for c in t.columns]
        ['key', 'shape']
    """
    from rich.table import Table

    t = Table(title=title, title_justify="left", title_style=style, show_edge=False, pad_edge=False)
    keep = [i for i in range(len(heads)) if i == 0 or any(c[i] for c in cells)]
    for i in keep:
        t.add_column(heads[i], justify="right" if heads[i] == "count" else "left", overflow="fold")  # never cut with …
    for c in cells:
        t.add_row(*(c[i] for i in keep))
    return t


def _rows_table(title: str, rows: list[FoldedRow], style: str) -> Any:
    cells = [
        (r.name, "" if r.shape is None else str(list(r.shape)), r.dtype or r.extra, f"x{r.count}" if r.count > 1 else "")
        for r in rows
    ]
    return table(f"{title} ({sum(r.count for r in rows)})", ("key", "shape", "dtype", "count"), cells, style)


def render(report: Report, console: Any, verbose: bool = False) -> None:
    """Print a report with rich: what was written first, then one folded table per non-empty
    section, then the one-line summary with the verdict (:meth:`Report.summary`)."""
    from rich.table import Table

    from .textsafe import styled

    action = "would write" if report.dry_run else "wrote"
    target = report.output or "(memory)"
    if report.files:  # sharded: there is no file named OUTPUT; say what was written
        target = report.written_to
    where = ("", (f" (from {report.container!r})", "dim")) if report.container else ("",)
    console.print(styled((report.spec or "statemap", "bold"), f": {report.source}", *where, f" -> {target}"))
    if report.alternatives:
        console.print(
            styled(("also in the file: " + ", ".join(map(repr, report.alternatives)) + " (choose one with unwrap)", "dim"))
        )
    if report.inputs:
        t = Table(title=f"input files ({len(report.inputs)})", title_justify="left", show_edge=False, pad_edge=False)
        for c in ("file", "captures", "format", "tensors", "keys"):
            t.add_column(c, overflow="fold")
        for row in report.inputs:
            caps = ", ".join(f"{k}={v}" for k, v in row["captures"].items())
            keys = fold_names(row["keys"]) if verbose else [row["keys"][0]] if row["keys"] else []
            more = "" if verbose or len(row["keys"]) < 2 else f" (+{len(row['keys']) - 1})"
            t.add_row(row["file"], caps, row["format"], str(row["n_tensors"]), "\n".join(keys) + more)
        console.print(t)
    if report.vars_from:
        shown = ", ".join(f"{k}={v}" for k, v in report.vars.items())
        console.print(styled((f"vars from {report.vars_from}: ", "dim"), (shown, "dim")))
    size = f", {human_size(report.n_bytes)}" if report.n_bytes else ""
    once = sum(len(g) - 1 for g in report.written_once)
    stored = f" ({len(report.produced) - once} stored: each tied group once)" if once else ""
    console.print(
        f"{action} {len(report.produced)} tensors{stored}{size}" + (f" in {report.seconds:.2f}s" if report.seconds else "")
    )
    if len(report.files) > 1:
        for f in report.files:
            console.print(f"  {f}")
    if report.removed:
        console.print(f"removed {len(report.removed)} file(s) of the earlier output at this name (--force):", style="yellow")
        for f in report.removed:
            console.print(f"  {f}", style="yellow")
    if verbose:
        console.print(_rows_table("produced", fold((m.name, m) for m in report.produced), "bold"))
    info = report.metas
    for title, names, style in (
        ("passed through unchanged (no rule touched them)", report.passthrough, "yellow"),
        ("dropped", report.dropped, "dim"),
        ("skipped non-tensor entries", report.skipped, "dim"),
    ):
        if names:
            console.print(_rows_table(title, fold((n, info.get(n)) for n in names), style))
    if report.unmatched_rules:
        console.print("optional rules that matched nothing:", style="yellow")
        for r in report.unmatched_rules:
            console.print(f"  {r}")
    if report.conditions_not_met:
        console.print("rules not applied (their `when:` held for no key):", style="dim")
        for r in report.conditions_not_met:
            console.print(f"  {r}", style="dim")
    if report.assumptions:
        console.print(f"assumptions ({len(report.assumptions)}):", style="dim")
        for line in report.assumptions:
            console.print(f"  {line}", style="dim")
    if report.not_restored:
        console.print("the reverse cannot restore what these rules removed (declare `inverse:` on them):", style="yellow")
        for line in report.not_restored:
            console.print(f"  {line}")
    if report.source_ties and (verbose or not report.written_once):  # with dedupe, "written once" says it all
        console.print(
            "tied in the source (one tensor, several names): "
            + "; ".join(" = ".join(g) for g in report.source_ties)
            + ("" if report.written_once else " — each name is written as its own tensor (tied: clone)"),
            style="dim",
        )
    if report.tied:
        console.print(f"tied tensors: {'; '.join(' = '.join(g) for g in report.tied)}", style="dim")
    for g in report.written_once:  # tied: dedupe
        console.print(f"written once: {g[0]}; re-tied on load: {', '.join(g[1:])}", markup=False)
    if report.expected:
        if report.ok:
            console.print(
                f"matches {report.expected}: every expected key present with the expected shape (and dtype, where given)",
                style="green",
            )
        for title, metas in (
            ("missing (expected, not produced)", report.missing),
            ("unexpected (produced, not expected)", report.unexpected),
        ):
            if metas:
                console.print(_rows_table(title, fold((m.name, m) for m in metas), "red"))
        for title, mism in (("shape mismatch", report.shape_mismatch), ("dtype mismatch", report.dtype_mismatch)):
            if mism:
                cells = [(m.name, str(m.expected), str(m.got)) for m in mism]
                console.print(table(f"{title} ({len(mism)})", ("key", "expected", "got"), cells, "red"))
    console.print(report.summary(), style="green" if report.ok else "red")
