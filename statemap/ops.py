"""The op registry: every rule a spec may contain, in one place.

An op knows three things:

* its fields (checked at spec-load time; unknown fields are errors),
* how its shorthand expands into the canonical ``{from, to, ...}`` form,
* how to *plan* itself: given the input tensors' metadata (:class:`~statemap.meta.Node`),
  return one recipe node per target, or raise :class:`PlanError` showing the arithmetic.

Ops never touch tensor bytes. They compile to the few primitives that
:mod:`statemap.apply` runs (slice, concat, stack, permute, reshape, pad, cast, fill).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from .axes import AxisPattern, parse_axes, solve
from .dtypes import NAMES as DTYPE_NAMES
from .dtypes import dtype as lookup_dtype
from .errors import PlanError, SpecError
from .guards import cond_names, parse_assume, parse_when
from .meta import Node
from .spec import Loc, Rule, unknown_field
from .template import Expr, Template, eval_expr, expr_names, expr_str, parse_expr, parse_pattern, parse_template
from .textsafe import short_repr

# -- fields -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    kind: str  # pattern(s) | template(s) | expr(s) | shape | axis | axes | dtype | number | choice | bool | text
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    doc: str = ""


COMMON = {
    "optional": Field("bool", default=False, doc="matching nothing is reported, not an error"),
    "note": Field("text", doc="free text, ignored"),
    "inverse": Field("rule", doc="the rule (or list of rules) that undoes this one, for `statemap invert` (lossy ops)"),
    "when": Field(
        "when",
        doc="conditions on metadata: which matched keys the rule acts on (present, absent, dtype, tied_to, not_tied_to, if)",
    ),
    "assume": Field("assume", doc="facts the rule relies on, verified before anything is written (equal: KEY, value: N)"),
}


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, list) else [v]


def _plain(v: Any) -> Any:
    """YAML values with line info -> plain dicts and lists (for storing in frozen rules)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@dataclass(frozen=True)
class DimOf:
    """``{dim: D, of: KEY}``: the length of dim ``D`` of the tensor named ``KEY`` at that point of the rules."""

    dim: Expr
    of: Template


IntValue = Union[Expr, DimOf]  # noqa: UP007 - an integer, an expression over vars and captures, or DimOf


def int_value(v: Any, where: str = "") -> IntValue:
    """An integer field as written in YAML -> its parsed form: ``3``, ``"n_heads * head_dim"`` or
    ``{dim: 0, of: "lm_head.weight"}`` (``dim`` itself may be an expression)."""
    if isinstance(v, bool):
        raise SpecError(f"{where}expected an integer, an expression or {{dim: D, of: KEY}}, got {v!r}")
    if isinstance(v, int):
        return v
    try:
        if isinstance(v, str):
            return parse_expr(v)
        if isinstance(v, dict) and set(v) == {"dim", "of"} and isinstance(v["of"], str):
            d = int_value(v["dim"])
            if isinstance(d, DimOf):
                raise SpecError("'dim' of {dim, of} is an integer or an expression")
            return DimOf(d, parse_template(v["of"]))
    except SpecError as e:
        raise SpecError(f"{where}{e}") from None
    raise SpecError(f"{where}expected an integer, an expression such as 'n_heads * head_dim', or {{dim: 0, of: KEY}}, got {v!r}")


def int_names(v: IntValue) -> set[str]:
    """The vars and captures an integer field refers to."""
    if isinstance(v, DimOf):
        return expr_names(v.dim) | v.of.names
    return expr_names(v)


def int_yaml(v: IntValue) -> Any:
    """The YAML form of a parsed integer field (for derived specs): parses back to the same value."""
    if isinstance(v, DimOf):
        return {"dim": int_yaml(v.dim), "of": v.of.text}
    if isinstance(v, tuple):
        return expr_str(v)
    return v


def _shape_entry(v: Any, where: str) -> tuple[Any, ...]:
    """A dim of a shape: an int, an expression over vars, or {dim: N, of: KEY}."""
    if isinstance(v, bool):
        raise SpecError(f"{where}shape entry {v!r} is a boolean")
    if isinstance(v, int):
        return ("expr", v)
    if isinstance(v, str):
        try:
            return ("expr", parse_expr(v))
        except SpecError as e:
            raise SpecError(f"{where}{e}") from None
    if isinstance(v, dict) and set(v) == {"dim", "of"}:
        d = int_value(v, where)
        assert isinstance(d, DimOf)
        return ("dim", d.dim, d.of)
    raise SpecError(f"{where}shape entry {v!r} must be an integer, an expression such as 'vocab', or {{dim: 0, of: KEY}}")


def _check_field(name: str, f: Field, v: Any, where: str) -> Any:
    w = f"{where}field {name!r}: "
    try:
        if f.kind == "pattern":
            return parse_pattern(v)
        if f.kind == "patterns":
            return tuple(parse_pattern(x) for x in _as_list(v))
        if f.kind == "template":
            return parse_template(v)
        if f.kind == "templates":
            return tuple(parse_template(x) for x in _as_list(v))
        if f.kind == "sources":  # merge: the first is a pattern (binds captures), the rest are templates
            items = _as_list(v)
            if not items:
                raise SpecError("expected a list of sources")
            return (parse_pattern(items[0]), *(parse_template(x) for x in items[1:]))
    except SpecError as e:
        raise SpecError(f"{w}{e}") from None
    if f.kind in ("expr", "axis"):
        return int_value(v, w)
    if f.kind == "name":
        if not (isinstance(v, str) and v.isidentifier()):
            raise SpecError(f"{w}expected a capture name such as e, got {v!r}")
        return v
    if f.kind == "axes_pattern":
        try:
            return parse_axes(v)
        except SpecError as e:
            raise SpecError(f"{w}{e}") from None
    if f.kind == "axis_sizes":
        if not isinstance(v, dict):
            raise SpecError(f"{w}expected a mapping of axis: size such as {{h: n_heads, two: 2}}, got {v!r}")
        return tuple((str(k), int_value(x, f"{w}axis {k!r}: ")) for k, x in v.items())
    if f.kind == "exprs":
        if not isinstance(v, list) or not v:
            raise SpecError(f"{w}expected a list of integers or expressions, got {v!r}")
        return tuple(_check_field(name, Field("expr"), x, where) for x in v)
    if f.kind == "shape":
        if not isinstance(v, list):
            raise SpecError(f"{w}expected a list such as [1, vocab], got {v!r}")
        return tuple(_shape_entry(x, w) for x in v)
    if f.kind == "axes":
        if not (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            raise SpecError(f"{w}expected a list of integers such as [1, 0], got {v!r}")
        return tuple(v)
    if f.kind == "dtype":
        try:
            return lookup_dtype(v).name
        except Exception:
            raise SpecError(f"{w}unknown dtype {v!r}; valid: {', '.join(DTYPE_NAMES)}") from None
    if f.kind == "number":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if isinstance(v, str) and v.lower() in ("inf", "-inf", "nan"):
                return float(v)
            raise SpecError(f"{w}expected a number, got {v!r}")
        return v
    if f.kind == "choice":
        if v not in f.choices:
            raise SpecError(f"{w}{v!r} is not one of {', '.join(f.choices)}")
        return v
    if f.kind == "bool":
        if not isinstance(v, bool):
            raise SpecError(f"{w}expected true or false, got {v!r}")
        return v
    if f.kind == "text":
        return str(v)
    if f.kind == "rule":
        items = v if isinstance(v, list) else [v]
        if not items or not all(isinstance(x, dict) and x for x in items):
            raise SpecError(f"{w}expected a rule mapping such as {{pad: {{from: K, size: N}}}} or a list of them, got {v!r}")
        return _plain(v)
    if f.kind == "when":
        return parse_when(v, where)
    if f.kind == "assume":
        return parse_assume(v, where)
    raise AssertionError(f.kind)


# -- planning context ------------------------------------------------------------------------


@dataclass
class Ctx:
    """What an op may see while planning: the rule, its bindings, and the current key table."""

    rule: Rule
    env: dict[str, Any]  # vars and captures
    lookup: Callable[[str], Node | None]
    key: str = ""  # the matched source key, for messages
    keys: tuple[str, ...] = ()  # every input key, in order (the matched key first)
    # set by an op while planning: (key, other key, why) facts verified before writing, and
    # whether the targets are one tensor (a tie group)
    equal: list[tuple[str, str, str]] = field(default_factory=list)
    tie: bool = False

    def fail(self, msg: str) -> PlanError:
        at = f" at {self.key!r}" if self.key else ""
        note = f" (note: {self.rule.note})" if self.rule.note else ""
        return PlanError(f"{self.rule.where()}{msg}{at}{note}")

    def fill(self, t: Template, extra: Mapping[str, Any] | None = None) -> str:
        try:
            return t.fill({**self.env, **extra} if extra else self.env)
        except SpecError as e:
            raise PlanError(f"{self.rule.where()}{e}") from None

    def to_int(self, expr: IntValue) -> int:
        if isinstance(expr, DimOf):
            d = self.to_int(expr.dim)
            ref = self.fill(expr.of)
            node = self.lookup(ref)
            if node is None:
                raise self.fail(
                    f"{{dim: {expr_str(expr.dim)}, of: {expr.of.text!r}}} refers to {ref!r}, which does not exist at this point"
                )
            if not -len(node.shape) <= d < len(node.shape):
                raise self.fail(f"{ref!r} has shape {list(node.shape)}; it has no dim {d}")
            return node.shape[d]
        try:
            return eval_expr(expr, self.env)
        except SpecError as e:
            raise self.fail(str(e)) from None

    def shape(self, entries: tuple[tuple[Any, ...], ...]) -> list[int]:
        dims: list[int] = []
        for e in entries:
            if e[0] == "expr":
                dims.append(self.to_int(e[1]))
            else:
                _, d, tmpl = e
                ref = self.fill(tmpl)
                node = self.lookup(ref)
                if node is None:
                    raise self.fail(f"shape refers to {ref!r}, which does not exist at this point")
                d = self.to_int(d)
                if not -len(node.shape) <= d < len(node.shape):
                    raise self.fail(f"{ref!r} has shape {list(node.shape)}; it has no dim {d}")
                dims.append(node.shape[d])
        return dims


def _norm_dim(ctx: Ctx, dim: IntValue, ndim: int, what: str) -> int:
    dim = ctx.to_int(dim)
    if not -ndim <= dim < ndim:
        raise ctx.fail(f"{what} has {ndim} dims; dim {dim} is out of range")
    return dim % ndim


# -- ops -----------------------------------------------------------------------------------


class Op:
    name: ClassVar[str]
    summary: ClassVar[str]
    example: ClassVar[str]
    fields: ClassVar[dict[str, Field]]
    n_sources: ClassVar[str] = "1"  # "0", "1", "n"
    n_targets: ClassVar[str] = "1"  # "0", "1", "n", "same"
    # why `statemap invert` cannot undo this op from the spec alone ("" = it can); read by invert.py
    inverse_needs: ClassVar[str] = ""
    ties: ClassVar[bool] = False
    keeps_sources: ClassVar[bool] = False  # matched keys stay as they are (inject with `for`)
    aliases: ClassVar[dict[str, str]] = {"key": "from"}

    def expand(self, value: Any, where: str) -> list[dict[str, Any]]:
        """Shorthand -> list of field mappings. Default: a mapping, or a pattern string."""
        if isinstance(value, dict):
            return [dict(value)]
        if isinstance(value, str) and "from" in self.fields:
            return [{"from": value}]
        raise SpecError(f"{where}'{self.name}' takes a mapping of {', '.join(self.fields)}; see docs/spec.md")

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        raise NotImplementedError

    def check_rule(self, p: Mapping[str, Any], sources: tuple[Any, ...], targets: tuple[Template, ...], where: str) -> None:
        """Checks across fields, at spec-load time (after each field is checked on its own)."""

    def target_names_extra(self, p: Mapping[str, Any]) -> set[str]:
        """Names a target may use besides the source's captures and the vars (split's ``over``)."""
        return set()

    def gather(self, rule: Rule, found: list[tuple[str, dict[str, str]]], p: Mapping[str, Any]) -> list[Gathered]:
        """Matched keys -> (first key, captures, other input keys) per planning step. Default: one key each."""
        return [(k, caps, ()) for k, caps in found]

    def target_names(self, rule: Rule, inputs: list[Node], p: Mapping[str, Any], ctx: Ctx) -> list[str]:
        """The keys this step writes. Default: the rule's target templates, filled."""
        return [ctx.fill(t) for t in rule.targets]


Gathered = tuple[str, dict[str, str], tuple[str, ...]]

REGISTRY: dict[str, Op] = {}


def register(cls: type[Op]) -> type[Op]:
    REGISTRY[cls.name] = cls()
    return cls


def _arrow(value: str, where: str, op: str) -> dict[str, Any]:
    if "->" not in value:
        raise SpecError(f"{where}'{op}: {value}' needs the form 'SOURCE -> TARGET'")
    a, b = value.split("->", 1)
    return {"from": a.strip(), "to": b.strip()}


@register
class Rename(Op):
    name = "rename"
    summary = "Give matching keys new names; values are untouched."
    example = 'rename: "encoder.layers.{i}.ffn.{rest:path} -> encoder.layers.{i}.{rest}"'
    fields = {"from": Field("pattern", True), "to": Field("template", True)}

    def expand(self, value: Any, where: str) -> list[dict[str, Any]]:
        if isinstance(value, str):
            return [_arrow(value, where, self.name)]
        if isinstance(value, list):
            return [_arrow(v, where, self.name) if isinstance(v, str) else dict(v) for v in value]
        return super().expand(value, where)

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        return [inputs[0]]


@register
class Drop(Op):
    name = "drop"
    summary = "Remove matching keys from the output (they are listed in the report)."
    example = 'drop: "decoder.layers.{i}.attn.masked_bias"'
    fields = {"from": Field("pattern", True)}
    n_targets = "0"
    inverse_needs = "the dropped values are not in the spec"

    def expand(self, value: Any, where: str) -> list[dict[str, Any]]:
        if isinstance(value, list):
            return [{"from": v} if isinstance(v, str) else dict(v) for v in value]
        return super().expand(value, where)

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        return []


@register
class Keep(Drop):
    name = "keep"
    summary = "Pass matching keys through unchanged, and count them as accounted for (for strict specs)."
    example = 'keep: "lm_head.{x:path}"'
    fields = {"from": Field("pattern", True)}
    n_targets = "same"
    inverse_needs = ""

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        return [inputs[0]]


@register
class Copy(Op):
    name = "copy"
    summary = "One source to several targets (independent copies). List the source among the targets to keep it."
    example = "copy: {from: model.shared.weight, to: [model.encoder.embed_tokens.weight, model.decoder.embed_tokens.weight]}"
    fields = {"from": Field("pattern", True), "to": Field("templates", True)}
    n_targets = "n"

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        return [inputs[0]] * len(targets)


@register
class Tie(Copy):
    name = "tie"
    summary = (
        "Like copy, but the targets are one tensor: a .pt output shares their storage; "
        "safetensors writes each (tied: clone) or only the first (tied: dedupe)."
    )
    example = "tie: {from: decoder.embed_tokens.weight, to: [decoder.embed_tokens.weight, decoder.output_projection.weight]}"
    ties = True


@register
class Inject(Op):
    name = "inject"
    summary = (
        "Create a tensor filled with one value; its shape may use vars and other tensors' dims. "
        "With `for`, create one per key matching that pattern (the matched keys are left as they are)."
    )
    example = "inject: {to: final_logits_bias, shape: [1, {dim: 0, of: lm_head.weight}], value: 0}"
    fields = {
        "for": Field("pattern"),
        "to": Field("template", True),
        "shape": Field("shape", True),
        "value": Field("number", default=0),
        "dtype": Field("dtype", default="float32"),
    }
    aliases = {"key": "to"}
    n_sources = "0"
    keeps_sources = True

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        shape = ctx.shape(p["shape"])
        if any(d < 0 for d in shape):
            raise ctx.fail(f"injected shape {shape} has a negative dim")
        dt = lookup_dtype(p["dtype"])
        if len(shape) > 64 or math.prod(shape) * dt.itemsize >= 1 << 62:
            raise ctx.fail(f"injected shape {short_repr(shape, 80)} is too large to create")
        if dt.kind == "bool" and p["value"] not in (0, 1):
            raise ctx.fail(f"value {p['value']!r} does not fit bool")
        return [Node("fill", tuple(shape), dt.name, (), (p["value"],))]


def _over_index(rule: Rule, key: str, caps: Mapping[str, str], over: str) -> int:
    text = caps.get(over, "")
    if not text.isdigit():
        raise PlanError(f"{rule.where()}{key!r}: capture {{{over}}} = {text!r} is not an index (0, 1, 2, ...)")
    return int(text)


def _check_count(ctx: Ctx, p: Mapping[str, Any], n: int, what: str) -> None:
    if p.get("count") is not None:
        want = ctx.to_int(p["count"])
        if want != n:
            raise ctx.fail(f"count is {want}, but {what} {n}")


@register
class Split(Op):
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

    def check_rule(self, p: Mapping[str, Any], sources: tuple[Any, ...], targets: tuple[Template, ...], where: str) -> None:
        over = p.get("over")
        if over is None:
            if p["mode"] != "concat" or p.get("count") is not None:
                raise SpecError(f"{where}'mode' and 'count' go with 'over: CAPTURE' (one target per index)")
            if len(targets) < 2 and p.get("sizes") is None:
                raise SpecError(f"{where}split into fewer than 2 targets; list the targets in 'to'")
            return
        if len(targets) != 1:
            raise SpecError(f"{where}with 'over', 'to' is one template using {{{over}}}, got {len(targets)} targets")
        if over not in targets[0].names:
            raise SpecError(f"{where}'to' {targets[0].text!r} must use {{{over}}} (the index of each piece)")
        if over in sources[0].captures:
            raise SpecError(f"{where}{{{over}}} is already a capture of {sources[0].text!r}; 'over' names a new index")
        if p.get("sizes") is not None:
            raise SpecError(f"{where}'sizes' does not go with 'over' (the pieces are equal)")
        if p["mode"] in ("concat", "same") and p.get("count") is None:
            raise SpecError(f"{where}split over {over} with mode {p['mode']} needs 'count' (how many pieces)")

    def target_names_extra(self, p: Mapping[str, Any]) -> set[str]:
        return {p["over"]} if p.get("over") else set()

    def _count(self, src: Node, p: Mapping[str, Any], ctx: Ctx) -> int:
        if p["mode"] == "stack":
            dim = _norm_dim(ctx, p["dim"], len(src.shape), f"{ctx.key!r} of shape {list(src.shape)}")
            n = src.shape[dim]
            _check_count(ctx, p, n, f"dim {dim} of {list(src.shape)} has length")
            return n
        n = ctx.to_int(p["count"])
        if not 1 <= n <= 1 << 16:
            raise ctx.fail(f"count {n} is not between 1 and {1 << 16}")
        return n

    def target_names(self, rule: Rule, inputs: list[Node], p: Mapping[str, Any], ctx: Ctx) -> list[str]:
        if p.get("over") is None:
            return super().target_names(rule, inputs, p, ctx)
        return [ctx.fill(rule.targets[0], {p["over"]: v}) for v in range(self._count(inputs[0], p, ctx))]

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        src = inputs[0]
        if p.get("over") is not None and p["mode"] == "same":
            ctx.tie = True
            return [src] * len(targets)
        dim = _norm_dim(ctx, p["dim"], len(src.shape), f"{ctx.key!r} of shape {list(src.shape)}")
        length, n = src.shape[dim], len(targets)
        if p.get("over") is not None and p["mode"] == "stack":
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
        if p.get("sizes") is None:
            if length % n:
                raise ctx.fail(
                    f"can't split dim {dim} of length {length} into {n} equal chunks "
                    f"({length} % {n} = {length % n}); give explicit 'sizes'"
                )
            sizes = [length // n] * n
        else:
            sizes = [ctx.to_int(s) for s in p["sizes"]]
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


@register
class Merge(Op):
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
    }
    n_sources = "n"

    def check_rule(self, p: Mapping[str, Any], sources: tuple[Any, ...], targets: tuple[Template, ...], where: str) -> None:
        over = p.get("over")
        if over is None:
            if p["mode"] == "same" or p.get("count") is not None:
                raise SpecError(f"{where}'mode: same' and 'count' go with 'over: CAPTURE' (join every index)")
            return
        if len(sources) != 1:
            raise SpecError(f"{where}with 'over', 'from' is one pattern (every key it matches is joined)")
        if over not in sources[0].captures:
            raise SpecError(f"{where}'over: {over}' is not a capture of {sources[0].text!r}")
        if over in targets[0].names:
            raise SpecError(f"{where}'to' {targets[0].text!r} uses {{{over}}}, but the pieces over {over} become one key")

    def gather(self, rule: Rule, found: list[tuple[str, dict[str, str]]], p: Mapping[str, Any]) -> list[Gathered]:
        over = p.get("over")
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

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        first = inputs[0]
        if p.get("over") is not None:
            _check_count(ctx, p, len(inputs), f"merging over {p['over']} found")
        if any(n.dtype != first.dtype for n in inputs):
            raise ctx.fail(f"can't merge dtypes {[n.dtype for n in inputs]}; cast first")
        ndim = len(first.shape)
        if p["mode"] == "same":
            if any(n.shape != first.shape for n in inputs):
                raise ctx.fail(f"replicas have different shapes {[list(n.shape) for n in inputs]}")
            ctx.equal.extend((ctx.keys[0], k, "replica") for k in ctx.keys[1:])
            return [first]
        if p["mode"] == "stack":
            dim = _norm_dim(ctx, p["dim"], ndim + 1, "the stacked result")
            if any(n.shape != first.shape for n in inputs):
                raise ctx.fail(f"can't stack shapes {[list(n.shape) for n in inputs]}: they must be equal")
            shape = list(first.shape)
            shape.insert(dim, len(inputs))
            return [Node("stack", tuple(shape), first.dtype, tuple(inputs), (dim,))]
        dim = _norm_dim(ctx, p["dim"], ndim, f"{ctx.key!r} of shape {list(first.shape)}")
        for n in inputs:
            other = [d for i, d in enumerate(n.shape) if i != dim]
            if len(n.shape) != ndim or other != [d for i, d in enumerate(first.shape) if i != dim]:
                raise ctx.fail(
                    f"can't concat shapes {[list(x.shape) for x in inputs]} along dim {dim}: all other dims must agree"
                )
        shape = list(first.shape)
        shape[dim] = sum(n.shape[dim] for n in inputs)
        return [Node("concat", tuple(shape), first.dtype, tuple(inputs), (dim,))]


class _Transform(Op):
    """1 -> 1 ops that change values; ``to`` is optional (default: same key)."""

    n_targets = "same"

    def expand(self, value: Any, where: str) -> list[dict[str, Any]]:
        if isinstance(value, list):
            return [{"from": v} if isinstance(v, str) else dict(v) for v in value]
        return super().expand(value, where)


@register
class Transpose(_Transform):
    name = "transpose"
    summary = "Swap two dims (default: the two dims of a matrix), e.g. Linear [out, in] <-> Conv1D/Flax [in, out]."
    example = 'transpose: "h.{i}.attn.c_attn.weight"'
    fields = {"from": Field("pattern", True), "to": Field("template"), "dims": Field("axes")}

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        src = inputs[0]
        nd = len(src.shape)
        dims = p.get("dims")
        if dims is None:
            if nd != 2:
                raise ctx.fail(f"shape {list(src.shape)} is not a matrix; give 'dims: [a, b]' to choose two dims")
            dims = (0, 1)
        if len(dims) != 2:
            raise ctx.fail(f"'dims' names two dims to swap, got {list(dims)}")
        a, b = (_norm_dim(ctx, d, nd, f"shape {list(src.shape)}") for d in dims)
        axes = list(range(nd))
        axes[a], axes[b] = axes[b], axes[a]
        return [_permute(src, tuple(axes))]


def _permute(src: Node, axes: tuple[int, ...]) -> Node:
    return Node("permute", tuple(src.shape[a] for a in axes), src.dtype, (src,), (axes,))


@register
class Permute(_Transform):
    name = "permute"
    summary = "Reorder all dims, e.g. conv OIHW -> HWIO is dims [2, 3, 1, 0]."
    example = "permute: {from: 'embeddings.patch_embeddings.projection.weight', dims: [2, 3, 1, 0]}"
    fields = {"from": Field("pattern", True), "to": Field("template"), "dims": Field("axes", True)}

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        src, dims = inputs[0], tuple(p["dims"])
        if sorted(dims) != list(range(len(src.shape))):
            raise ctx.fail(f"dims {list(dims)} is not a permutation of the {len(src.shape)} dims of {list(src.shape)}")
        return [_permute(src, dims)]


@register
class Rearrange(_Transform):
    name = "rearrange"
    summary = (
        "Split, reorder and join dims in einops notation, e.g. the rotary permute "
        "'(h d two) c -> (h two d) c' with sizes {h: n_heads, two: 2}; compiles to reshape -> permute -> reshape."
    )
    example = "rearrange: {from: 'layers.{i}.attention.wq.weight', pattern: '(h d two) c -> (h two d) c', sizes: {h: 32, two: 2}}"
    fields = {
        "from": Field("pattern", True),
        "to": Field("template"),
        "pattern": Field("axes_pattern", True, doc="LEFT -> RIGHT: axis names, ( ) groups, 1"),
        "sizes": Field("axis_sizes", doc="axis: length (integers, expressions or {dim, of}); one unknown per dim is inferred"),
    }

    def check_rule(self, p: Mapping[str, Any], sources: tuple[Any, ...], targets: tuple[Template, ...], where: str) -> None:
        pat: AxisPattern = p["pattern"]
        unknown = [k for k, _ in p["sizes"] or () if k not in pat.names]
        if unknown:
            raise SpecError(
                f"{where}sizes name {', '.join(map(repr, unknown))}, not an axis of {pat.text!r} (axes: {', '.join(pat.names)})"
            )

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        src = inputs[0]
        sizes = {k: ctx.to_int(v) for k, v in p["sizes"] or ()}
        try:
            steps = solve(p["pattern"], src.shape, sizes)
        except SpecError as e:
            raise ctx.fail(f"{p['pattern'].text!r}: {e}") from None
        node = src
        if steps.split != node.shape:
            node = Node("reshape", steps.split, src.dtype, (node,), (steps.split,))
        if steps.perm != tuple(range(len(steps.perm))):
            node = _permute(node, steps.perm)
        if steps.out != node.shape:
            node = Node("reshape", steps.out, src.dtype, (node,), (steps.out,))
        return [node]


@register
class Reshape(_Transform):
    name = "reshape"
    summary = "Change the shape, keeping the element order; one dim may be -1; dims may use vars."
    example = "reshape: {from: 'cls_token', shape: [1, 1, -1]}"
    fields = {"from": Field("pattern", True), "to": Field("template"), "shape": Field("shape", True)}
    inverse_needs = "the original shape is not in the spec"

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        src = inputs[0]
        shape = ctx.shape(p["shape"])
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


@register
class Slice(_Transform):
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
    inverse_needs = "the cut-off part (and the original length) is not in the spec"

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        src = inputs[0]
        dim = _norm_dim(ctx, p["dim"], len(src.shape), f"{ctx.key!r} of shape {list(src.shape)}")
        length = src.shape[dim]
        start = ctx.to_int(p["start"])
        stop = length if p.get("stop") is None else ctx.to_int(p["stop"])
        step = ctx.to_int(p["step"])
        if step <= 0:
            raise ctx.fail(f"step must be positive, got {step}")
        if not 0 <= start <= stop <= length:
            raise ctx.fail(f"slice [{start}:{stop}] does not fit dim {dim} of length {length}")
        shape = list(src.shape)
        shape[dim] = len(range(start, stop, step))
        return [Node("slice", tuple(shape), src.dtype, (src,), (dim, start, stop, step))]


@register
class Pad(_Transform):
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
    inverse_needs = "the original length is not in the spec"

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        src = inputs[0]
        dim = _norm_dim(ctx, p["dim"], len(src.shape), f"{ctx.key!r} of shape {list(src.shape)}")
        size = ctx.to_int(p["size"])
        if size < src.shape[dim]:
            raise ctx.fail(f"pad size {size} is smaller than dim {dim} of length {src.shape[dim]}; use slice to shrink")
        shape = list(src.shape)
        shape[dim] = size
        return [Node("pad", tuple(shape), src.dtype, (src,), (dim, size, p["value"]))]


@register
class View(_Transform):
    name = "view"
    summary = (
        "Reinterpret the bits as another dtype of the same width, without converting values "
        "(e.g. Paddle saves bfloat16 as uint16: view them as bfloat16)."
    )
    example = "view: {from: '{k:path}', dtype: bfloat16}"
    fields = {"from": Field("pattern", True), "to": Field("template"), "dtype": Field("dtype", True)}
    inverse_needs = "the original dtype is not in the spec"

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        src = inputs[0]
        a, b = lookup_dtype(src.dtype), lookup_dtype(p["dtype"])
        if a.itemsize != b.itemsize:
            raise ctx.fail(f"can't view {a.name} ({a.itemsize} bytes) as {b.name} ({b.itemsize} bytes): widths differ; use cast")
        if a == b:
            return [src]
        return [Node("view", src.shape, b.name, (src,), (b.name,))]


@register
class Cast(_Transform):
    name = "cast"
    summary = "Convert values to another dtype (bfloat16 rounds to nearest even)."
    example = "cast: {from: '{x:path}', dtype: float16}"
    fields = {"from": Field("pattern", True), "to": Field("template"), "dtype": Field("dtype", True)}
    inverse_needs = "the original dtype (and precision) is not in the spec"

    def plan(self, inputs: list[Node], targets: list[str], p: Mapping[str, Any], ctx: Ctx) -> list[Node]:
        src = inputs[0]
        dst = lookup_dtype(p["dtype"])
        if src.dtype == dst.name:
            return [src]
        for d in (lookup_dtype(src.dtype), dst):
            if not d.native and d.name != "bfloat16":
                raise ctx.fail(f"can't cast {src.dtype} -> {dst.name}: {d.name} values can be moved, not converted")
        return [Node("cast", src.shape, dst.name, (src,), (dst.name,))]


# -- rule parsing ---------------------------------------------------------------------------


def parse_rule(item: Any, loc: Loc, index: int, var_names: set[str]) -> list[Rule]:
    """One YAML rule entry -> one or more canonical rules (list shorthand expands)."""
    where = f"{loc}: rule #{index}: "
    if not isinstance(item, dict) or not item:
        raise SpecError(f"{where}a rule is a mapping such as `rename: a -> b`; valid ops: {', '.join(REGISTRY)}")
    op_names = [k for k in item if k not in COMMON]
    if len(op_names) != 1:
        if not op_names:
            raise SpecError(f"{where}no op in {sorted(item)}; valid ops: {', '.join(REGISTRY)}")
        raise SpecError(f"{where}one op per rule, found {op_names}")
    op_name = op_names[0]
    if op_name not in REGISTRY:
        raise unknown_field(op_name, list(REGISTRY), where, "op")
    op = REGISTRY[op_name]
    common = {k: _check_field(k, COMMON[k], v, where) for k, v in item.items() if k in COMMON}
    rules = []
    for n, raw in enumerate(op.expand(item[op_name], where)):
        idx = index + n
        w = f"{loc}: rule #{idx} ({op_name}): "
        fields: dict[str, Any] = {}
        for k, v in raw.items():
            k = op.aliases.get(k, k)
            if k in COMMON:
                common[k] = _check_field(k, COMMON[k], v, w)
                continue
            if k not in op.fields:
                raise unknown_field(k, set(op.fields) | set(COMMON), w, f"field of '{op_name}'")
            if k in fields:
                raise SpecError(f"{w}field {k!r} given twice (check aliases such as 'key')")
            f = op.fields[k]
            fields[k] = _check_field(k, f, v, w)
        for k, f in op.fields.items():
            if k not in fields:
                if f.required:
                    raise SpecError(f"{w}missing required field {k!r}; fields: {', '.join(op.fields)}")
                fields[k] = f.default
        if "inverse" in common:  # validate the declared inverse(s) like any other rule
            for inv in common["inverse"] if isinstance(common["inverse"], list) else [common["inverse"]]:
                parse_rule(inv, loc, idx, var_names)
        rules.append(_canonical(op, fields, common, Loc(loc.file, loc.line), idx, var_names, w))
    return rules


def _canonical(op: Op, fields: dict[str, Any], common: dict[str, Any], loc: Loc, idx: int, var_names: set[str], w: str) -> Rule:
    sources: tuple[Any, ...] = ()
    each = fields.pop("for", None)
    if each is not None:
        sources = (each,)
    if op.n_sources == "1":
        sources = (fields.pop("from"),)
    elif op.n_sources == "n":
        given: tuple[Any, ...] = fields.pop("from")
        first = given[0]
        sources = (first, *given[1:])  # later sources are filled from the first one's captures
        for t in given[1:]:
            missing = t.names - set(first.captures) - var_names
            if missing:
                raise SpecError(
                    f"{w}source {t.text!r} uses {sorted(missing)}, which the first source {first.text!r} does not capture"
                )
    to = fields.pop("to", None)
    targets: tuple[Template, ...]
    if to is None:
        if op.n_targets in ("same",):
            if sources[0].is_regex:
                raise SpecError(f"{w}a regex source needs an explicit 'to' template")
            targets = (parse_template(_pattern_as_template(sources[0].text)),)
        else:
            targets = ()
    elif isinstance(to, tuple):
        targets = to
    else:
        targets = (to,)
    if op.n_targets == "n" and len(targets) < 1:
        raise SpecError(f"{w}'to' needs at least one target")
    op.check_rule(fields, sources, targets, w)
    captures = set(sources[0].captures) if sources else set()
    guard_names = cond_names(common.get("when", ())) | {
        n for a in common.get("assume", ()) if a.kind == "equal" for n in a.arg.names
    }
    if guard_names - captures - var_names:
        raise SpecError(
            f"{w}'when'/'assume' use {sorted(guard_names - captures - var_names)}, not captured by the source nor a var"
        )
    if common.get("assume") and not sources:
        raise SpecError(f"{w}'assume' states a fact about matched tensors; this rule matches none")
    if any(c.kind in ("dtype", "tied_to", "not_tied_to") for c in common.get("when", ())) and not sources:
        raise SpecError(f"{w}'when: dtype/tied_to' need a matched key; this rule has no 'from'")
    extra = op.target_names_extra(fields)
    for k, v in fields.items():  # a dim names vars or captures (other integers may use vars set at plan time)
        unknown = int_names(v) - captures - var_names if op.fields[k].kind == "axis" and v is not None else set()
        if unknown:
            raise SpecError(f"{w}field {k!r} uses {', '.join(sorted(map(repr, unknown)))}: not a var nor a capture of the source")
    for t in targets:
        missing = t.names - captures - var_names - extra
        if missing:
            raise SpecError(
                f"{w}target {t.text!r} uses {sorted(missing)}, not captured by the source"
                f"{' ' + repr(sources[0].text) if sources else ''} nor a var"
            )
    return Rule(
        op.name,
        idx,
        loc,
        tuple(sources),
        targets,
        tuple(fields.items()),
        bool(common.get("optional", False)),
        common.get("inverse"),
        tuple(common.get("when", ())),
        tuple(common.get("assume", ())),
        " ".join(str(common.get("note") or "").split()),
    )


def _pattern_as_template(text: str) -> str:
    """``a.{i:int}.{rest:path}`` -> ``a.{i}.{rest}``: the identity template of a pattern."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("{{", i) or text.startswith("}}", i):
            out.append(text[i : i + 2])
            i += 2
        elif text[i] == "{":
            end = text.index("}", i)
            out.append("{" + text[i + 1 : end].split(":")[0].strip() + "}")
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
