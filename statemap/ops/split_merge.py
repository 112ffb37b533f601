"""split and merge: cut one tensor into several, join several into one — by listed keys, or
over a capture (experts, tensor-parallel ranks, replicas)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from ..errors import PlanError, SpecError
from ..meta import Node
from ..rules import Rule
from ..template import Template
from .base import Ctx, Gathered, LintFact, Op, int_or_none, norm_dim, register
from .fields import DimOf, Field, IntValue, int_yaml
from .keymap import KeyMap, NotInvertible


def _over_index(rule: Rule, key: str, caps: Mapping[str, str], over: str) -> int:
    text = caps.get(over, "")
    if not text.isdigit():
        raise PlanError(f"{rule.where()}{key!r}: capture {{{over}}} = {text!r} is not an index (0, 1, 2, ...)")
    return int(text)


def _check_count(ctx: Ctx, p: OverParams, n: int, what: str) -> None:
    if p.count is not None:
        want = ctx.to_int(p.count)
        if want != n:
            raise ctx.fail(f"count is {want}, but {what} {n}")


@dataclass(frozen=True)
class SplitParams:
    dim: IntValue = 0
    sizes: tuple[IntValue, ...] | None = None
    over: str | None = None
    mode: str = "concat"
    count: IntValue | None = None


@dataclass(frozen=True)
class MergeParams:
    dim: IntValue = 0
    mode: str = "concat"
    over: str | None = None
    count: IntValue | None = None
    sizes: tuple[IntValue, ...] | str | None = None


OverParams = Union[SplitParams, MergeParams]  # noqa: UP007


@register
class Split(Op[SplitParams]):
    name = "split"
    summary = (
        "Cut one tensor along a dim into several targets: equal chunks, or explicit sizes (one may be -1). "
        "With `over: CAPTURE`, write one target per index (mode concat: equal chunks, stack: unstack, same: copies)."
    )
    example = (
        "split: {from: 'layers.{i}.self_attn.in_proj_weight', dim: 0,\n"
        "        to: ['layers.{i}.self_attn.q_proj.weight', 'layers.{i}.self_attn.k_proj.weight', "
        "'layers.{i}.self_attn.v_proj.weight']}"
    )
    fields = {
        "from": Field("pattern", True),
        "to": Field("templates", True),
        "dim": Field("axis", default=0),
        "sizes": Field("exprs"),
        "over": Field("name", doc="write one target per index of this name, which 'to' uses: {over} = 0 .. count-1"),
        "mode": Field(
            "choice",
            default="concat",
            choices=("concat", "stack", "same"),
            doc="with over: concat cuts equal chunks, stack removes the dim, same writes copies (a tie group)",
        ),
        "count": Field("expr", doc="with over: the number of targets (stack: asserted, the dim's length is used)"),
    }
    n_targets = "n"
    Params = SplitParams

    def check_rule(self, p: SplitParams, sources: tuple[Any, ...], targets: tuple[Template, ...], where: str) -> None:
        over = p.over
        if over is None:
            if p.mode != "concat" or p.count is not None:
                raise SpecError(f"{where}'mode' and 'count' go with 'over: CAPTURE' (one target per index)")
            if len(targets) < 2 and p.sizes is None:
                raise SpecError(f"{where}split into fewer than 2 targets; list the targets in 'to'")
            return
        if len(targets) != 1:
            raise SpecError(f"{where}with 'over', 'to' is one template using {{{over}}}, got {len(targets)} targets")
        if over not in targets[0].names:
            raise SpecError(f"{where}'to' {targets[0].text!r} must use {{{over}}} (the index of each piece)")
        if over in sources[0].captures:
            raise SpecError(f"{where}{{{over}}} is already a capture of {sources[0].text!r}; 'over' names a new index")
        if p.sizes is not None:
            raise SpecError(f"{where}'sizes' does not go with 'over' (the pieces are equal)")
        if p.mode in ("concat", "same") and p.count is None:
            raise SpecError(f"{where}split over {over} with mode {p.mode} needs 'count' (how many pieces)")

    def target_kinds(self, p: SplitParams) -> dict[str, str]:
        return {p.over: "int"} if p.over else {}

    def _count(self, src: Node, p: SplitParams, ctx: Ctx) -> int:
        if p.mode == "stack":
            dim = norm_dim(ctx, p.dim, len(src.shape), f"{ctx.key!r} of shape {list(src.shape)}")
            n = src.shape[dim]
            _check_count(ctx, p, n, f"dim {dim} of {list(src.shape)} has length")
            return n
        assert p.count is not None  # check_rule: concat and same need count
        n = ctx.to_int(p.count)
        if not 1 <= n <= 1 << 16:
            raise ctx.fail(f"count {n} is not between 1 and {1 << 16}")
        return n

    def target_names(self, rule: Rule, inputs: list[Node], p: SplitParams, ctx: Ctx) -> list[str]:
        if p.over is None:
            return super().target_names(rule, inputs, p, ctx)
        return [ctx.fill(rule.targets[0], {p.over: v}) for v in range(self._count(inputs[0], p, ctx))]

    def plan(self, inputs: list[Node], targets: list[str], p: SplitParams, ctx: Ctx) -> list[Node]:
        src = inputs[0]
        if p.over is not None and p.mode == "same":
            ctx.tie = True
            return [src] * len(targets)
        dim = norm_dim(ctx, p.dim, len(src.shape), f"{ctx.key!r} of shape {list(src.shape)}")
        length, n = src.shape[dim], len(targets)
        if p.over is not None and p.mode == "stack":
            shape = list(src.shape)
            del shape[dim]
            one = list(src.shape)
            one[dim] = 1
            return [
                Node(
                    "reshape",
                    tuple(shape),
                    src.dtype,
                    (Node("slice", tuple(one), src.dtype, (src,), (dim, v, v + 1, 1)),),
                    (tuple(shape),),
                )
                for v in range(n)
            ]
        if p.sizes is None:
            if length % n:
                raise ctx.fail(
                    f"can't split dim {dim} of length {length} into {n} equal chunks "
                    f"({length} % {n} = {length % n}); give explicit 'sizes'"
                )
            sizes = [length // n] * n
        else:
            sizes = [ctx.to_int(s) for s in p.sizes]
            if len(sizes) != n:
                raise ctx.fail(f"{len(sizes)} sizes for {n} targets")
            if sizes.count(-1) > 1:
                raise ctx.fail("only one size may be -1")
            if -1 in sizes:
                rest = length - sum(s for s in sizes if s != -1)
                if rest < 0:
                    raise ctx.fail(f"sizes {sizes} exceed dim {dim} of length {length}")
                sizes[sizes.index(-1)] = rest
            if any(s < 0 for s in sizes) or sum(sizes) != length:
                raise ctx.fail(
                    f"sizes {' + '.join(map(str, sizes))} = {sum(sizes)} do not add up to dim {dim} of length {length}"
                )
        out, start = [], 0
        for s in sizes:
            shape = list(src.shape)
            shape[dim] = s
            out.append(Node("slice", tuple(shape), src.dtype, (src,), (dim, start, start + s, 1)))
            start += s
        return out

    def inverse(self, rule: Rule, km: KeyMap, p: SplitParams) -> list[dict[str, Any]]:
        if p.over:  # merge over the same name
            over = p.over
            src = km.pattern(rule.targets[0])
            if km.solution.get(over) != over:
                raise NotInvertible(f"the target uses {{{over}}} with arithmetic; declare `inverse:`")
            body = {"from": src, "over": over, "mode": p.mode, "to": km.template(rule.sources[0])}
            if p.mode != "same":
                body["dim"] = int_yaml(p.dim)
            if p.count is not None:
                body["count"] = int_yaml(p.count)
            return [{"merge": {**body, **self.extras(rule)}}]
        first = km.pattern(rule.targets[0])
        others = [km.template(t) for t in rule.targets[1:]]
        km.same_captures(rule.targets[1:])
        to = km.template(rule.sources[0])
        return [{"merge": {"from": [first, *others], "to": to, "dim": int_yaml(p.dim), **self.extras(rule)}}]

    def lint(self, rule: Rule, vars_: Mapping[str, Any]) -> list[LintFact]:
        p = self.params(rule)
        out: list[LintFact] = []
        if p.over:
            count = None if p.count is None else int_or_none(p.count, vars_)
            if count is not None and count < 1:
                out.append(LintFact(f"count {count} must be at least 1"))
        elif p.sizes is not None:
            sizes = p.sizes
            n = len(rule.targets)
            if len(sizes) != n:
                out.append(LintFact(f"{len(sizes)} sizes for {n} targets", "give one size per target"))
            vals = [int_or_none(s, vars_) for s in sizes]
            if vals.count(-1) > 1:
                out.append(LintFact(f"sizes {vals} have more than one -1", "only one size may be 'the rest'"))
            neg = [v for v in vals if v is not None and v < -1]
            if neg:
                out.append(LintFact(f"sizes {vals} include a negative size {neg[0]}"))
        return out


@register
class Merge(Op[MergeParams]):
    name = "merge"
    summary = (
        "Join several tensors into one along a dim (mode: concat or stack). Captures bind in the "
        "first source; the other sources reuse them. With `over: CAPTURE`, join every key the source "
        "matches, in index order (mode same: replicas verified equal, one written)."
    )
    example = "merge: {from: ['h.{i}.q.weight', 'h.{i}.k.weight', 'h.{i}.v.weight'], to: 'h.{i}.qkv.weight', dim: 0}"
    fields = {
        "from": Field("sources", True),
        "to": Field("template", True),
        "dim": Field("axis", default=0),
        "mode": Field(
            "choice",
            default="concat",
            choices=("concat", "stack", "same"),
            doc="concat along dim, stack into a new dim, or same (with over: replicas, verified equal)",
        ),
        "over": Field("name", doc="a capture of the source: join every matched key, ordered by it (0 .. n-1)"),
        "count": Field("expr", doc="with over: the number of pieces, asserted"),
        "sizes": Field(
            "sizes_or_equal",
            doc="concat of a list: each part's length along dim (or 'equal'), checked; the derived reverse cuts the same parts",
        ),
    }
    n_sources = "n"
    Params = MergeParams

    def check_rule(self, p: MergeParams, sources: tuple[Any, ...], targets: tuple[Template, ...], where: str) -> None:
        over = p.over
        if p.sizes is not None and (over is not None or p.mode != "concat"):
            raise SpecError(f"{where}'sizes' goes with a concat of a list of sources (pieces over a capture are equal)")
        if isinstance(p.sizes, tuple) and len(p.sizes) != len(sources):
            raise SpecError(f"{where}{len(p.sizes)} sizes for {len(sources)} sources; give one length per source")
        if over is None:
            if p.mode == "same" or p.count is not None:
                raise SpecError(f"{where}'mode: same' and 'count' go with 'over: CAPTURE' (join every index)")
            return
        if len(sources) != 1:
            raise SpecError(f"{where}with 'over', 'from' is one pattern (every key it matches is joined)")
        if over not in sources[0].captures:
            raise SpecError(f"{where}'over: {over}' is not a capture of {sources[0].text!r}")
        if over in targets[0].names:
            raise SpecError(f"{where}'to' {targets[0].text!r} uses {{{over}}}, but the pieces over {over} become one key")

    def gather(self, rule: Rule, found: list[tuple[str, dict[str, str]]], p: MergeParams) -> list[Gathered]:
        over = p.over
        if over is None:
            return super().gather(rule, found, p)
        groups: dict[tuple[tuple[str, str], ...], list[tuple[int, str, dict[str, str]]]] = {}
        for key, caps in found:
            ident = tuple(sorted((k, v) for k, v in caps.items() if k != over))
            groups.setdefault(ident, []).append((_over_index(rule, key, caps, over), key, caps))
        out: list[Gathered] = []
        for members in groups.values():
            members.sort(key=lambda m: m[0])
            idx = [m[0] for m in members]
            if idx != list(range(len(idx))):
                dup = sorted({i for i in idx if idx.count(i) > 1})
                missing = sorted(set(range(max(idx) + 1)) - set(idx))
                what = (
                    f"index {dup[0]} twice ({', '.join(m[1] for m in members if m[0] == dup[0])})"
                    if dup
                    else (f"no index {', '.join(map(str, missing))} (found {', '.join(map(str, idx))})")
                )
                raise PlanError(f"{rule.where()}merging over {over}: {what}; the indices must be 0 .. n-1, each once")
            caps = {k: v for k, v in members[0][2].items() if k != over}
            out.append((members[0][1], caps, tuple(m[1] for m in members[1:])))
        return out

    def plan(self, inputs: list[Node], targets: list[str], p: MergeParams, ctx: Ctx) -> list[Node]:
        first = inputs[0]
        if p.over is not None:
            _check_count(ctx, p, len(inputs), f"merging over {p.over} found")
        if any(n.dtype != first.dtype for n in inputs):
            raise ctx.fail(f"can't merge dtypes {[n.dtype for n in inputs]}; cast first")
        ndim = len(first.shape)
        if p.mode == "same":
            if any(n.shape != first.shape for n in inputs):
                raise ctx.fail(f"replicas have different shapes {[list(n.shape) for n in inputs]}")
            ctx.equal.extend((ctx.keys[0], k, "replica") for k in ctx.keys[1:])
            return [first]
        if p.mode == "stack":
            dim = norm_dim(ctx, p.dim, ndim + 1, "the stacked result")
            if any(n.shape != first.shape for n in inputs):
                raise ctx.fail(f"can't stack shapes {[list(n.shape) for n in inputs]}: they must be equal")
            shape = list(first.shape)
            shape.insert(dim, len(inputs))
            return [Node("stack", tuple(shape), first.dtype, tuple(inputs), (dim,))]
        dim = norm_dim(ctx, p.dim, ndim, f"{ctx.key!r} of shape {list(first.shape)}")
        for n in inputs:
            other = [d for i, d in enumerate(n.shape) if i != dim]
            if len(n.shape) != ndim or other != [d for i, d in enumerate(first.shape) if i != dim]:
                raise ctx.fail(
                    f"can't concat shapes {[list(x.shape) for x in inputs]} along dim {dim}: all other dims must agree"
                )
        lengths = [n.shape[dim] for n in inputs]
        if p.over is not None and p.count is not None and len(set(lengths)) > 1:
            # the derived reverse (a split over with count) cuts equal pieces: unequal ones would come back wrong
            raise ctx.fail(
                f"pieces over {p.over} have lengths {lengths} along dim {dim}; with 'count' they must be equal "
                "(the reverse cuts equal pieces); drop 'count' to merge unequal pieces"
            )
        if p.sizes == "equal" and len(set(lengths)) > 1:
            raise ctx.fail(f"parts have lengths {lengths} along dim {dim}, but 'sizes: equal' says they are equal")
        if isinstance(p.sizes, tuple):
            want = [ctx.to_int(x) for x in p.sizes]
            if want != lengths:
                raise ctx.fail(f"parts have lengths {lengths} along dim {dim}, but 'sizes' says {want}")
        shape = list(first.shape)
        shape[dim] = sum(lengths)
        return [Node("concat", tuple(shape), first.dtype, tuple(inputs), (dim,))]

    def joined(self, p: MergeParams) -> set[str]:
        return {p.over} if p.over else set()

    def inverse(self, rule: Rule, km: KeyMap, p: MergeParams) -> list[dict[str, Any]]:
        if p.over:  # split over the same name
            over = p.over
            src = km.pattern(rule.targets[0])
            km.solution[over] = over
            body = {"from": src, "over": over, "mode": p.mode, "to": km.template(rule.sources[0])}
            if p.mode != "same":
                body["dim"] = int_yaml(p.dim)
            if p.count is not None:
                body["count"] = int_yaml(p.count)
            elif p.mode != "stack":
                raise NotInvertible(f"the number of pieces over {over} is not in the spec; give `count:`")
            return [{"split": {**body, **self.extras(rule)}}]
        if p.mode != "concat":
            raise NotInvertible("merge with mode: stack needs a declared `inverse:` (a split and a reshape)")
        if p.sizes is None:
            raise NotInvertible(
                "the parts' lengths along dim are not in the spec; give `sizes:` (a list, or `equal`; checked when "
                "converting) so the reverse cuts them back exactly"
            )
        if isinstance(p.sizes, tuple) and any(isinstance(x, DimOf) for x in p.sizes):
            raise NotInvertible("`sizes:` names other tensors ({dim, of}), which the reverse does not have; give numbers or vars")
        src = km.pattern(rule.targets[0])
        targets = [km.template(rule.sources[0])] + [km.template(t) for t in rule.sources[1:]]
        sizes = {} if p.sizes == "equal" else {"sizes": [int_yaml(x) for x in p.sizes]}
        return [{"split": {"from": src, "to": targets, "dim": int_yaml(p.dim), **sizes, **self.extras(rule)}}]

    def lint(self, rule: Rule, vars_: Mapping[str, Any]) -> list[LintFact]:
        p = self.params(rule)
        if p.over:
            count = None if p.count is None else int_or_none(p.count, vars_)
            return [LintFact(f"count {count} must be at least 1")] if count is not None and count < 1 else []
        if len(rule.sources) < 2:
            return [LintFact("merges a single source", "use rename (or reshape) instead", "warning")]
        return []
