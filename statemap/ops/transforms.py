"""1 -> 1 transforms: transpose, permute, reshape, slice, pad, view, cast (``to`` optional)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..dtypes import dtype as lookup_dtype
from ..meta import Node
from ..rules import Rule
from ..template import shape_entry_yaml
from .base import Ctx, LintFact, Op, P, int_or_none, norm_dim, permute_node, register, shape_facts
from .fields import Field, IntValue
from .keymap import KeyMap


@dataclass(frozen=True)
class TransposeParams:
    dims: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PermuteParams:
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ShapeParams:
    shape: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class SliceParams:
    dim: IntValue = 0
    start: IntValue = 0
    stop: IntValue | None = None
    step: IntValue = 1


@dataclass(frozen=True)
class PadParams:
    size: IntValue
    dim: IntValue = 0
    value: float = 0


@dataclass(frozen=True)
class DtypeParams:
    dtype: str


def moved_shape_assumption(rule: Rule, axes_for: Callable[[int], list[int] | None]) -> dict[str, Any]:
    """For the inverse of a dim-reordering rule: its ``assume: {shape}`` in the output's dim order
    (``axes_for(rank)``: output dim j is input dim axes[j]), so the reverse refuses an input in the
    wrong layout as the forward rule does. ``equal`` / ``value`` facts are about the forward input
    and are not carried."""
    for a in rule.assume:
        axes = axes_for(len(a.arg)) if a.kind == "shape" else None
        if axes is not None:
            return {"assume": {"shape": [shape_entry_yaml(a.arg[j]) for j in axes]}}
    return {}


class Transform(Op[P]):
    """1 -> 1 ops that change values; ``to`` is optional (default: same key)."""

    n_targets = "same"

    def expand(self, value: Any, where: str) -> list[dict[str, Any]]:
        if isinstance(value, list):
            return [{"from": v} if isinstance(v, str) else dict(v) for v in value]
        return super().expand(value, where)


@register
class Transpose(Transform[TransposeParams]):
    name = "transpose"
    summary = "Swap two dims (default: the two dims of a matrix), e.g. Linear [out, in] <-> Conv1D/Flax [in, out]."
    example = 'transpose: "h.{i}.attn.c_attn.weight"'
    fields = {"from": Field("pattern", True), "to": Field("template"), "dims": Field("axes")}
    Params = TransposeParams

    def plan(self, inputs: list[Node], targets: list[str], p: TransposeParams, ctx: Ctx) -> list[Node]:
        src = inputs[0]
        nd = len(src.shape)
        dims = p.dims
        if dims is None:
            if nd != 2:
                raise ctx.fail(f"shape {list(src.shape)} is not a matrix; give 'dims: [a, b]' to choose two dims")
            dims = (0, 1)
        if len(dims) != 2:
            raise ctx.fail(f"'dims' names two dims to swap, got {list(dims)}")
        a, b = (norm_dim(ctx, d, nd, f"shape {list(src.shape)}") for d in dims)
        axes = list(range(nd))
        axes[a], axes[b] = axes[b], axes[a]
        return [permute_node(src, tuple(axes))]

    def inverse(self, rule: Rule, km: KeyMap, p: TransposeParams) -> list[dict[str, Any]]:
        def axes(n: int) -> list[int] | None:
            if p.dims is None:
                return [1, 0] if n == 2 else None
            if len(p.dims) != 2 or not all(-n <= d < n for d in p.dims):
                return None
            out = list(range(n))
            a, b = (d % n for d in p.dims)
            out[a], out[b] = out[b], out[a]
            return out

        body = {"dims": list(p.dims)} if p.dims is not None else {}
        return self.one_to_one_inverse(rule, km, {**body, **moved_shape_assumption(rule, axes)})

    def lint(self, rule: Rule, vars_: Mapping[str, Any]) -> list[LintFact]:
        given = self.params(rule).dims
        if given is None:
            return []
        dims = list(given)
        if len(dims) != 2:
            return [LintFact(f"'dims' names two dims to swap, got {dims}")]
        if dims[0] == dims[1]:
            return [LintFact(f"dims {dims} swap a dim with itself: a no-op", severity="warning")]
        return []


@register
class Permute(Transform[PermuteParams]):
    name = "permute"
    summary = "Reorder all dims, e.g. conv OIHW -> HWIO is dims [2, 3, 1, 0]."
    example = "permute: {from: 'embeddings.patch_embeddings.projection.weight', dims: [2, 3, 1, 0]}"
    fields = {"from": Field("pattern", True), "to": Field("template"), "dims": Field("axes", True)}
    Params = PermuteParams

    def plan(self, inputs: list[Node], targets: list[str], p: PermuteParams, ctx: Ctx) -> list[Node]:
        src, dims = inputs[0], tuple(p.dims)
        if sorted(dims) != list(range(len(src.shape))):
            raise ctx.fail(f"dims {list(dims)} is not a permutation of the {len(src.shape)} dims of {list(src.shape)}")
        return [permute_node(src, dims)]

    def inverse(self, rule: Rule, km: KeyMap, p: PermuteParams) -> list[dict[str, Any]]:
        dims = list(p.dims)

        def axes(n: int) -> list[int] | None:
            return [d % n for d in dims] if len(dims) == n and sorted(d % n for d in dims) == list(range(n)) else None

        body = {"dims": [dims.index(i) for i in range(len(dims))]}
        return self.one_to_one_inverse(rule, km, {**body, **moved_shape_assumption(rule, axes)})

    def lint(self, rule: Rule, vars_: Mapping[str, Any]) -> list[LintFact]:
        dims = list(self.params(rule).dims or ())
        if sorted(d % len(dims) if dims else d for d in dims) != list(range(len(dims))):
            return [LintFact(f"dims {dims} is not a permutation of 0..{len(dims) - 1}")]
        return []


@register
class Reshape(Transform[ShapeParams]):
    name = "reshape"
    summary = "Change the shape, keeping the element order; one dim may be -1; dims may use vars."
    example = "reshape: {from: 'cls_token', shape: [1, 1, -1]}"
    fields = {"from": Field("pattern", True), "to": Field("template"), "shape": Field("shape", True)}
    Params = ShapeParams
    inverse_needs = "the original shape is not in the spec"

    def plan(self, inputs: list[Node], targets: list[str], p: ShapeParams, ctx: Ctx) -> list[Node]:
        src = inputs[0]
        shape = ctx.shape(p.shape)
        total = math.prod(src.shape)
        if shape.count(-1) > 1:
            raise ctx.fail(f"only one dim may be -1 in {shape}")
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            if known == 0 or total % known:
                raise ctx.fail(f"can't reshape {list(src.shape)} ({total} elements) into {shape}: {total} % {known} != 0")
            shape[shape.index(-1)] = total // known
        if math.prod(shape) != total or any(d < 0 for d in shape):
            raise ctx.fail(f"can't reshape {list(src.shape)} ({total} elements) into {shape} ({math.prod(shape)} elements)")
        return [Node("reshape", tuple(shape), src.dtype, (src,), (tuple(shape),))]

    def lint(self, rule: Rule, vars_: Mapping[str, Any]) -> list[LintFact]:
        return shape_facts(self.params(rule).shape, vars_, rest_ok=True)


@register
class Slice(Transform[SliceParams]):
    name = "slice"
    summary = "Keep a range along a dim, e.g. the first `vocab` rows of an embedding."
    example = "slice: {from: 'encoder.embed_tokens.weight', dim: 0, stop: vocab}"
    fields = {
        "from": Field("pattern", True),
        "to": Field("template"),
        "dim": Field("axis", default=0),
        "start": Field("expr", default=0),
        "stop": Field("expr"),
        "step": Field("expr", default=1),
    }
    Params = SliceParams
    inverse_needs = "the cut-off part (and the original length) is not in the spec"

    def plan(self, inputs: list[Node], targets: list[str], p: SliceParams, ctx: Ctx) -> list[Node]:
        src = inputs[0]
        dim = norm_dim(ctx, p.dim, len(src.shape), f"{ctx.key!r} of shape {list(src.shape)}")
        length = src.shape[dim]
        start = ctx.to_int(p.start)
        stop = length if p.stop is None else ctx.to_int(p.stop)
        step = ctx.to_int(p.step)
        if step <= 0:
            raise ctx.fail(f"step must be positive, got {step}")
        if not 0 <= start <= stop <= length:
            raise ctx.fail(f"slice [{start}:{stop}] does not fit dim {dim} of length {length}")
        shape = list(src.shape)
        shape[dim] = len(range(start, stop, step))
        return [Node("slice", tuple(shape), src.dtype, (src,), (dim, start, stop, step))]

    def lint(self, rule: Rule, vars_: Mapping[str, Any]) -> list[LintFact]:
        p = self.params(rule)
        start, step = int_or_none(p.start, vars_), int_or_none(p.step, vars_)
        stop = None if p.stop is None else int_or_none(p.stop, vars_)
        out = []
        if step is not None and step <= 0:
            out.append(LintFact(f"step must be positive, got {step}"))
        if start is not None and start < 0:
            out.append(LintFact(f"start {start} is negative"))
        if start is not None and stop is not None and start > stop:
            out.append(LintFact(f"start {start} is after stop {stop}"))
        return out


@register
class Pad(Transform[PadParams]):
    name = "pad"
    summary = "Grow a dim to `size` by appending `value` (e.g. resize a vocab); the inverse of slice."
    example = "pad: {from: 'lm_head.weight', dim: 0, size: vocab, value: 0}"
    fields = {
        "from": Field("pattern", True),
        "to": Field("template"),
        "dim": Field("axis", default=0),
        "size": Field("expr", True),
        "value": Field("number", default=0),
    }
    Params = PadParams
    inverse_needs = "the original length is not in the spec"

    def plan(self, inputs: list[Node], targets: list[str], p: PadParams, ctx: Ctx) -> list[Node]:
        src = inputs[0]
        dim = norm_dim(ctx, p.dim, len(src.shape), f"{ctx.key!r} of shape {list(src.shape)}")
        size = ctx.to_int(p.size)
        if size < src.shape[dim]:
            raise ctx.fail(f"pad size {size} is smaller than dim {dim} of length {src.shape[dim]}; use slice to shrink")
        shape = list(src.shape)
        shape[dim] = size
        return [Node("pad", tuple(shape), src.dtype, (src,), (dim, size, p.value))]

    def lint(self, rule: Rule, vars_: Mapping[str, Any]) -> list[LintFact]:
        size = int_or_none(self.params(rule).size, vars_)
        return [LintFact(f"pad size {size} is negative")] if size is not None and size < 0 else []


@register
class View(Transform[DtypeParams]):
    name = "view"
    summary = (
        "Reinterpret the bits as another dtype of the same width, without converting values "
        "(e.g. Paddle saves bfloat16 as uint16: view them as bfloat16)."
    )
    example = "view: {from: '{k:path}', dtype: bfloat16}"
    fields = {"from": Field("pattern", True), "to": Field("template"), "dtype": Field("dtype", True)}
    Params = DtypeParams
    inverse_needs = "the original dtype is not in the spec"

    def plan(self, inputs: list[Node], targets: list[str], p: DtypeParams, ctx: Ctx) -> list[Node]:
        src = inputs[0]
        a, b = lookup_dtype(src.dtype), lookup_dtype(p.dtype)
        if a.itemsize != b.itemsize:
            raise ctx.fail(f"can't view {a.name} ({a.itemsize} bytes) as {b.name} ({b.itemsize} bytes): widths differ; use cast")
        if a == b:
            return [src]
        return [Node("view", src.shape, b.name, (src,), (b.name,))]

    def invert(self, rule: Rule, vars_: dict[str, Any]) -> list[dict[str, Any]]:
        """``view ... when: {dtype: X}`` knows the original dtype: view back, on keys of the new dtype."""
        dtypes = [c.arg for c in rule.when if c.kind == "dtype"]
        if not (len(rule.when) == 1 and dtypes and len(dtypes[0]) == 1):
            return super().invert(rule, vars_)
        km = self.keymap(rule, vars_)
        to = rule.targets[0] if rule.targets else None
        src = km.pattern(to) if to is not None else rule.sources[0].text
        view: dict[str, Any] = {"from": src, "dtype": dtypes[0][0], "when": {"dtype": self.params(rule).dtype}}
        back = km.template(rule.sources[0]) if to is not None else None
        if back is not None and back != src:
            view["to"] = back
        return [{"view": {**view, "optional": True, "note": f"inverse of {rule.label} at {rule.loc}"}}]


@register
class Cast(Transform[DtypeParams]):
    name = "cast"
    summary = "Convert values to another dtype (bfloat16 rounds to nearest even)."
    example = "cast: {from: '{x:path}', dtype: float16}"
    fields = {"from": Field("pattern", True), "to": Field("template"), "dtype": Field("dtype", True)}
    Params = DtypeParams
    inverse_needs = "the original dtype (and precision) is not in the spec"

    def plan(self, inputs: list[Node], targets: list[str], p: DtypeParams, ctx: Ctx) -> list[Node]:
        src = inputs[0]
        dst = lookup_dtype(p.dtype)
        if src.dtype == dst.name:
            return [src]
        for d in (lookup_dtype(src.dtype), dst):
            if not d.native and d.name != "bfloat16":
                raise ctx.fail(f"can't cast {src.dtype} -> {dst.name}: {d.name} values can be moved, not converted")
        return [Node("cast", src.shape, dst.name, (src,), (dst.name,))]
