"""copy and tie: one source to several targets (independent copies, or one tensor)."""

from __future__ import annotations

from typing import Any

from ..meta import Node
from ..rules import Rule
from ..template import parse_pattern, parse_template
from .base import Ctx, NoParams, Op, register
from .fields import Field
from .keymap import KeyMap


@register
class Copy(Op[NoParams]):
    name = "copy"
    summary = "One source to several targets (independent copies). List the source among the targets to keep it."
    example = "copy: {from: model.shared.weight, to: [model.encoder.embed_tokens.weight, model.decoder.embed_tokens.weight]}"
    fields = {"from": Field("pattern", True), "to": Field("templates", True)}
    n_targets = "n"

    def plan(self, inputs: list[Node], targets: list[str], p: NoParams, ctx: Ctx) -> list[Node]:
        return [inputs[0]] * len(targets)

    def inverse(self, rule: Rule, km: KeyMap, p: NoParams) -> list[dict[str, Any]]:
        """Rename the first target back; drop the other copies, verified equal to it."""
        first = km.pattern(rule.targets[0])
        extras = self.extras(rule)
        out: list[dict[str, Any]] = []
        for t in rule.targets[1:]:
            drop_pat = self.keymap(rule, km.vars).pattern(t)
            if drop_pat != first:
                # the copy was equal to the kept key when written; the reverse verifies it still is,
                # so a copy that diverged (fine-tuned untied) fails loudly instead of being dropped
                kept = parse_pattern(first).identity
                same = {"assume": {"equal": kept}} if parse_template(kept).names <= set(parse_pattern(drop_pat).captures) else {}
                out.append({"drop": {"from": drop_pat, **same, **extras}})
        out.append({"rename": {"from": first, "to": km.template(rule.sources[0]), **extras}})
        return out


@register
class Tie(Copy):
    name = "tie"
    summary = (
        "Like copy, but the targets are one tensor: a .pt output shares their storage; "
        "safetensors writes each (tied: clone) or only the first (tied: dedupe)."
    )
    example = "tie: {from: decoder.embed_tokens.weight, to: [decoder.embed_tokens.weight, decoder.output_projection.weight]}"
    ties = True
