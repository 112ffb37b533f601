"""inject: create a tensor filled with one value (optionally one per key matching ``for``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..dtypes import dtype as lookup_dtype
from ..meta import Node
from ..rules import Rule
from ..textsafe import short_repr
from .base import Ctx, LintFact, Op, register, shape_facts
from .fields import Field
from .keymap import KeyMap, NotInvertible


@dataclass(frozen=True)
class InjectParams:
    shape: tuple[tuple[Any, ...], ...]
    value: float = 0
    dtype: str = "float32"


@register
class Inject(Op[InjectParams]):
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
    Params = InjectParams
    aliases = {"key": "to"}
    n_sources = "0"
    keeps_sources = True

    def plan(self, inputs: list[Node], targets: list[str], p: InjectParams, ctx: Ctx) -> list[Node]:
        shape = ctx.shape(p.shape)
        if any(d < 0 for d in shape):
            raise ctx.fail(f"injected shape {shape} has a negative dim")
        dt = lookup_dtype(p.dtype)
        if len(shape) > 64 or math.prod(shape) * dt.itemsize >= 1 << 62:
            raise ctx.fail(f"injected shape {short_repr(shape, 80)} is too large to create")
        if dt.kind == "bool" and p.value not in (0, 1):
            raise ctx.fail(f"value {p.value!r} does not fit bool")
        return [Node("fill", tuple(shape), dt.name, (), (p.value,))]

    def inverse(self, rule: Rule, km: KeyMap, p: InjectParams) -> list[dict[str, Any]]:
        if not rule.targets:
            raise NotInvertible("inject without a target")
        extras = self.extras(rule)
        return [{"drop": {"from": km.pattern(rule.targets[0]), **extras}}]

    def lint(self, rule: Rule, vars_: Mapping[str, Any]) -> list[LintFact]:
        return shape_facts(self.params(rule).shape, vars_, rest_ok=False)
