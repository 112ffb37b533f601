"""rename: give matching keys new names; values are untouched."""

from __future__ import annotations

from typing import Any

from ..errors import SpecError
from ..meta import Node
from ..rules import Rule
from .base import Ctx, NoParams, Op, register
from .fields import Field
from .keymap import KeyMap


def arrow(value: str, where: str, op: str) -> dict[str, Any]:
    """``"SOURCE -> TARGET"`` -> ``{from: SOURCE, to: TARGET}``."""
    if "->" not in value:
        raise SpecError(f"{where}'{op}: {value}' needs the form 'SOURCE -> TARGET'")
    a, b = value.split("->", 1)
    return {"from": a.strip(), "to": b.strip()}


@register
class Rename(Op[NoParams]):
    name = "rename"
    summary = "Give matching keys new names; values are untouched."
    example = 'rename: "encoder.layers.{i}.ffn.{rest:path} -> encoder.layers.{i}.{rest}"'
    fields = {"from": Field("pattern", True), "to": Field("template", True)}
    moves_only = True

    def expand(self, value: Any, where: str) -> list[dict[str, Any]]:
        if isinstance(value, str):
            return [arrow(value, where, self.name)]
        if isinstance(value, list):
            return [arrow(v, where, self.name) if isinstance(v, str) else dict(v) for v in value]
        return super().expand(value, where)

    def plan(self, inputs: list[Node], targets: list[str], p: NoParams, ctx: Ctx) -> list[Node]:
        return [inputs[0]]

    def inverse(self, rule: Rule, km: KeyMap, p: NoParams) -> list[dict[str, Any]]:
        src = km.pattern(rule.targets[0])
        return [{"rename": {"from": src, "to": km.template(rule.sources[0]), **self.extras(rule)}}]
