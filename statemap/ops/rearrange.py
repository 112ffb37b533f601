"""rearrange: split, reorder and join dims in einops notation (see :mod:`statemap.axes`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..axes import AxisPattern, solve
from ..errors import SpecError
from ..meta import Node
from ..rules import Rule
from ..template import Template
from .base import Ctx, LintFact, int_or_none, permute_node, register
from .fields import Field, IntValue, int_yaml
from .keymap import KeyMap
from .transforms import Transform


@dataclass(frozen=True)
class RearrangeParams:
    pattern: AxisPattern
    sizes: tuple[tuple[str, IntValue], ...] | None = None


@register
class Rearrange(Transform[RearrangeParams]):
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
    Params = RearrangeParams

    def check_rule(self, p: RearrangeParams, sources: tuple[Any, ...], targets: tuple[Template, ...], where: str) -> None:
        pat: AxisPattern = p.pattern
        unknown = [k for k, _ in p.sizes or () if k not in pat.names]
        if unknown:
            raise SpecError(
                f"{where}sizes name {', '.join(map(repr, unknown))}, not an axis of {pat.text!r} (axes: {', '.join(pat.names)})"
            )

    def plan(self, inputs: list[Node], targets: list[str], p: RearrangeParams, ctx: Ctx) -> list[Node]:
        src = inputs[0]
        sizes = {k: ctx.to_int(v) for k, v in p.sizes or ()}
        try:
            steps = solve(p.pattern, src.shape, sizes)
        except SpecError as e:
            raise ctx.fail(f"{p.pattern.text!r}: {e}") from None
        node = src
        if steps.split != node.shape:
            node = Node("reshape", steps.split, src.dtype, (node,), (steps.split,))
        if steps.perm != tuple(range(len(steps.perm))):
            node = permute_node(node, steps.perm)
        if steps.out != node.shape:
            node = Node("reshape", steps.out, src.dtype, (node,), (steps.out,))
        return [node]

    def inverse(self, rule: Rule, km: KeyMap, p: RearrangeParams) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"pattern": p.pattern.inverse().text}
        if p.sizes:
            body["sizes"] = {k: int_yaml(v) for k, v in p.sizes}
        return self.one_to_one_inverse(rule, km, body)

    def lint(self, rule: Rule, vars_: Mapping[str, Any]) -> list[LintFact]:
        out = []
        for name, v in self.params(rule).sizes or ():
            size = int_or_none(v, vars_)
            if size is not None and size <= 0:
                out.append(LintFact(f"axis {name}={size}: sizes must be positive"))
        return out
