"""guards: a rule's conditions (``when:``) and the assumptions it relies on (``assume:``).

``when:`` selects which keys a rule acts on. It is decided by the planner on metadata alone
(names, dtypes, which keys exist, which keys are one tensor in the source)::

    when: {present: KEY}          KEY exists in the key table when the rule runs
    when: {absent: KEY}
    when: {dtype: uint16}         the matched key's dtype (a list: any of them)
    when: {tied_to: KEY}          the matched key and KEY are one tensor in the source
    when: {not_tied_to: KEY}
    when: {if: "n_kv_heads != n_heads"}   var arithmetic compared (== != < <= > >=, and/or/not)

``assume:`` states a fact about the input that makes the rule correct, and is *verified*:
from metadata when the source records it (one storage), otherwise by comparing bytes before
anything is written (:mod:`statemap.verify`)::

    assume: {equal: KEY}          each matched tensor equals KEY (shape, dtype and bytes)
    assume: {value: 0}            every element of each matched tensor equals 0
    assume: {shape: [{dim: 1, of: wte.weight}, ~]}   the matched tensor's shape (from metadata,
                                  when planning); each dim as in ``shape:`` fields, ``~`` any length

KEY is a template: the matched key's captures and the spec's vars fill it.

Example::

    >>> parse_when({"absent": "lm_head.weight"}, "spec.yaml:3: ")
    (Cond(kind='absent', arg=Template(text='lm_head.weight', ...), text='lm_head.weight'),)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .dtypes import dtype as lookup_dtype
from .errors import SpecError
from .template import (
    Expr,
    Template,
    eval_condition,
    parse_condition,
    parse_shape_entry,
    parse_template,
    shape_entry_names,
    shape_entry_text,
)

WHEN_KINDS = ("present", "absent", "dtype", "tied_to", "not_tied_to", "if")
ASSUME_KINDS = ("equal", "value", "shape")


@dataclass(frozen=True)
class Cond:
    """One condition of ``when:``; all of a rule's conditions must hold."""

    kind: str
    arg: Any  # Template (key conditions) | tuple[str, ...] (dtype) | Expr (if)
    text: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.text}"


@dataclass(frozen=True)
class Assume:
    """One verified assumption of ``assume:``."""

    kind: str
    arg: Any  # Template (equal) | float (value) | tuple of template.ShapeEntry (shape)
    text: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.text}"


def _key(v: Any, w: str) -> Template:
    if not isinstance(v, str) or not v:
        raise SpecError(f"{w}expected a key such as 'lm_head.weight', got {v!r}")
    try:
        return parse_template(v)
    except SpecError as e:
        raise SpecError(f"{w}{e}") from None


def parse_when(value: Any, where: str) -> tuple[Cond, ...]:
    """``when:`` mapping -> conditions. Raises :class:`SpecError` naming the bad entry."""
    w = f"{where}field 'when': "
    if not isinstance(value, dict) or not value:
        raise SpecError(f"{w}expected a mapping such as {{absent: lm_head.weight}}; conditions: {', '.join(WHEN_KINDS)}")
    out: list[Cond] = []
    for kind, v in value.items():
        if kind not in WHEN_KINDS:
            from .rules import unknown_field

            raise unknown_field(str(kind), set(WHEN_KINDS), w, "condition")
        if kind == "dtype":
            names = v if isinstance(v, list) else [v]
            try:
                dts = tuple(lookup_dtype(n).name for n in names)
            except Exception:
                raise SpecError(f"{w}unknown dtype in {v!r}") from None
            out.append(Cond(kind, dts, ", ".join(dts)))
        elif kind == "if":
            if isinstance(v, bool):
                v = "1" if v else "0"
            if not isinstance(v, (str, int)):
                raise SpecError(f"{w}'if' takes a comparison such as \"n_kv_heads != n_heads\", got {v!r}")
            try:
                out.append(Cond(kind, parse_condition(str(v)), str(v)))
            except SpecError as e:
                raise SpecError(f"{w}{e}") from None
        else:
            out.append(Cond(kind, _key(v, w), str(v)))
    return tuple(out)


def parse_assume(value: Any, where: str) -> tuple[Assume, ...]:
    """``assume:`` mapping -> assumptions. Raises :class:`SpecError` naming the bad entry."""
    w = f"{where}field 'assume': "
    if not isinstance(value, dict) or not value:
        raise SpecError(f"{w}expected a mapping such as {{equal: KEY}}, {{value: 0}} or {{shape: [d, ~]}}")
    out: list[Assume] = []
    for kind, v in value.items():
        if kind not in ASSUME_KINDS:
            from .rules import unknown_field

            raise unknown_field(str(kind), set(ASSUME_KINDS), w, "assumption")
        if kind == "equal":
            out.append(Assume(kind, _key(v, w), str(v)))
        elif kind == "shape":
            if not isinstance(v, list) or not v:
                raise SpecError(
                    f"{w}'shape' takes a list with one entry per dim, such as [{{dim: 1, of: wte.weight}}, ~], got {v!r}"
                )
            dims = tuple(parse_shape_entry(x, w, wildcard=True) for x in v)
            out.append(Assume(kind, dims, "[" + ", ".join(shape_entry_text(d) for d in dims) + "]"))
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SpecError(f"{w}'value' must be a finite number, got {v!r}")
            out.append(Assume(kind, v, str(v)))
    return tuple(out)


def assume_names(assumes: tuple[Assume, ...]) -> set[str]:
    """Capture / var names the assumptions use (checked against the source pattern at load time)."""
    names: set[str] = set()
    for a in assumes:
        if a.kind == "equal":
            names |= a.arg.names
        elif a.kind == "shape":
            for d in a.arg:
                names |= shape_entry_names(d)
    return names


def cond_names(conds: tuple[Cond, ...]) -> set[str]:
    """Capture / var names the conditions use (checked against the source pattern at load time)."""
    from .template import expr_names

    names: set[str] = set()
    for c in conds:
        if isinstance(c.arg, Template):
            names |= c.arg.names
        elif c.kind == "if":
            names |= expr_names(c.arg)
    return names


def holds(
    cond: Cond,
    key: str | None,
    dtype: str | None,
    env: Mapping[str, Any],
    exists: Callable[[str], bool],
    same_tensor: Callable[[str, str], bool],
) -> bool:
    """Whether ``cond`` holds for the matched ``key`` (None for rules without a source)."""
    if cond.kind == "if":
        return eval_condition(cond.arg, env)
    if cond.kind == "dtype":
        return dtype in cond.arg
    other = cond.arg.fill(env)
    if cond.kind == "present":
        return exists(other)
    if cond.kind == "absent":
        return not exists(other)
    tied = key is not None and exists(other) and same_tensor(key, other)
    return tied if cond.kind == "tied_to" else not tied


Condition = Expr  # re-exported for type hints

__all__ = ["Assume", "Cond", "parse_assume", "parse_when", "holds", "cond_names", "assume_names", "WHEN_KINDS", "ASSUME_KINDS"]
