"""drop and keep: remove matching keys, or pass them through counted as accounted for."""

from __future__ import annotations

from typing import Any

from ..meta import Node
from ..rules import Rule
from ..template import Template
from .base import Ctx, NoParams, Op, register
from .fields import Field
from .keymap import KeyMap, NotInvertible


def _restore_copy(rule: Rule, other: Template, when_absent: bool) -> list[dict[str, Any]]:
    """The reverse of dropping a key known to equal ``other``: tie ``other`` back to the key."""
    src = rule.sources[0]
    if src.is_regex or set(src.captures) - other.names:
        raise NotInvertible(
            f"the dropped key's captures are not all in {other.text!r}, so the key cannot be rebuilt; declare `inverse:`"
        )
    key = src.identity
    fields: dict[str, Any] = {"from": other.text, "to": [other.text, key]}
    if when_absent:
        fields["when"] = {"absent": key}
    if rule.optional or when_absent:
        fields["optional"] = True
    return [{"tie": {**fields, "note": f"inverse of {rule.label} at {rule.loc}"}}]


@register
class Drop(Op[NoParams]):
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

    def plan(self, inputs: list[Node], targets: list[str], p: NoParams, ctx: Ctx) -> list[Node]:
        return []

    def invert(self, rule: Rule, vars_: dict[str, Any]) -> list[dict[str, Any]]:
        """A dropped copy of another tensor (``assume: {equal: K}`` or ``when: {tied_to: K}``)
        comes back as that tensor; any other drop is lossy."""
        equal = [a.arg for a in rule.assume if a.kind == "equal"]
        tied = [c.arg for c in rule.when if c.kind == "tied_to"]
        if equal or tied:
            if len(rule.when) > len(tied):
                raise NotInvertible("its other `when:` conditions refer to the forward side; declare `inverse:`")
            return _restore_copy(rule, (equal or tied)[0], when_absent=bool(tied) and not equal)
        return super().invert(rule, vars_)


@register
class Keep(Drop):
    name = "keep"
    summary = "Pass matching keys through unchanged, and count them as accounted for (for strict specs)."
    example = 'keep: "lm_head.{x:path}"'
    fields = {"from": Field("pattern", True)}
    n_targets = "same"
    inverse_needs = ""

    def plan(self, inputs: list[Node], targets: list[str], p: NoParams, ctx: Ctx) -> list[Node]:
        return [inputs[0]]

    def invert(self, rule: Rule, vars_: dict[str, Any]) -> list[dict[str, Any]]:
        return Op.invert(self, rule, vars_)

    def inverse(self, rule: Rule, km: KeyMap, p: NoParams) -> list[dict[str, Any]]:
        return [{"keep": {"from": rule.sources[0].text, **self.extras(rule)}}]
