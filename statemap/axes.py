"""Axis patterns in einops notation (``"(h d two) c -> (h two d) c"``): syntax apart from meaning.

:func:`parse_axes` checks the text alone and returns an :class:`AxisPattern` (no shapes, no
vars); :func:`solve` gives it meaning for one tensor shape and the known axis sizes, returning
the three steps the ``rearrange`` op compiles to (reshape -> permute -> reshape).

Notation: a side is a list of dims separated by spaces; a dim is an axis name, ``1`` (a dim of
length one), or a parenthesized group ``(h d)`` of axes laid out row-major. Both sides name the
same axes, once each. ``...`` and anonymous axes other than ``1`` are not supported (name the
axis and give its size).

Example::

    >>> pat = parse_axes("(h d two) c -> (h two d) c")
    >>> solve(pat, (8, 3), {"h": 2, "two": 2})
    Steps(split=(2, 2, 2, 3), perm=(0, 2, 1, 3), out=(8, 3))
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import SpecError

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<num>\d+)|(?P<punct>[()])|(?P<dots>\.\.\.)|(?P<bad>\S))")
UNIT = "1"  # a dim of length one, in a group or on its own
MAX_PATTERN = 400


@dataclass(frozen=True)
class Side:
    """One side of a pattern: each dim is a tuple of axis names (``"1"`` = length one)."""

    text: str
    dims: tuple[tuple[str, ...], ...]

    @property
    def axes(self) -> tuple[str, ...]:
        """The named axes, in order (row-major within each dim)."""
        return tuple(a for d in self.dims for a in d if a != UNIT)


@dataclass(frozen=True)
class AxisPattern:
    """A parsed ``LEFT -> RIGHT`` pattern; :meth:`inverse` swaps the sides."""

    text: str
    left: Side
    right: Side

    @property
    def names(self) -> tuple[str, ...]:
        return self.left.axes

    def inverse(self) -> AxisPattern:
        return AxisPattern(f"{self.right.text} -> {self.left.text}", self.right, self.left)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Steps:
    """What a pattern means for one shape: reshape to ``split``, permute by ``perm``, reshape to ``out``."""

    split: tuple[int, ...]
    perm: tuple[int, ...]
    out: tuple[int, ...]


def _side(text: str, full: str, offset: int) -> Side:
    dims: list[tuple[str, ...]] = []
    group: list[str] | None = None
    seen: set[str] = set()
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only trailing spaces are left
            break
        at = offset + m.start(m.lastgroup or 0)
        tok = m.group(m.lastgroup or 0)
        pos = m.end()
        where = f"at position {at} of {full!r}"
        if m.lastgroup == "bad":
            raise SpecError(f"unexpected {tok!r} {where}: a pattern holds axis names, ( ), 1 and one '->'")
        if m.lastgroup == "dots":
            raise SpecError(f"'...' {where} is not supported: name every dim")
        if m.lastgroup == "num":
            if tok != UNIT:
                raise SpecError(
                    f"anonymous axis {tok} {where}: only 1 may be written as a number; name the axis and give it in sizes"
                )
            name = UNIT
        elif m.lastgroup == "name":
            name = tok
            if name in seen:
                raise SpecError(f"axis {name!r} appears twice on one side {where}")
            seen.add(name)
        elif tok == "(":
            if group is not None:
                raise SpecError(f"nested '(' {where}: groups do not nest")
            group = []
            continue
        else:
            if group is None:
                raise SpecError(f"unmatched ')' {where}")
            dims.append(tuple(group) or (UNIT,))
            group = None
            continue
        if group is not None:
            group.append(name)
        else:
            dims.append((name,))
    if group is not None:
        raise SpecError(f"unclosed '(' in {full!r}")
    if not dims:
        raise SpecError(f"empty side in {full!r}: each side names at least one dim")
    return Side(text.strip(), tuple(dims))


def parse_axes(text: str) -> AxisPattern:
    """Check the syntax of ``LEFT -> RIGHT``; raises SpecError naming the token and its position."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"an axis pattern is text such as '(h d two) c -> (h two d) c', got {text!r}")
    if len(text) > MAX_PATTERN:
        raise SpecError(f"axis pattern longer than {MAX_PATTERN} characters")
    if text.count("->") != 1:
        raise SpecError(f"axis pattern {text!r} needs exactly one '->' between the two sides")
    a, b = text.split("->")
    left, right = _side(a, text, 0), _side(b, text, len(a) + 2)
    only_l, only_r = set(left.axes) - set(right.axes), set(right.axes) - set(left.axes)
    if only_l or only_r:
        which = "; ".join(f"{', '.join(sorted(s))} only on the {side}" for s, side in ((only_l, "left"), (only_r, "right")) if s)
        raise SpecError(f"axis pattern {text!r}: both sides name the same axes ({which})")
    return AxisPattern(text.strip(), left, right)


def _group_text(d: tuple[str, ...]) -> str:
    return d[0] if len(d) == 1 else "(" + " ".join(d) + ")"


def solve(pattern: AxisPattern, shape: tuple[int, ...], sizes: Mapping[str, int]) -> Steps:
    """The steps for a tensor of ``shape``; ``sizes`` gives some axis lengths, the rest are inferred.

    Raises SpecError with the arithmetic, e.g. ``can't divide dim 0 (h d two) of length 100 into
    h*two = 3*2 = 6 parts (100 % 6 = 4)``.
    """
    left = pattern.left
    if len(left.dims) != len(shape):
        raise SpecError(f"the left side {left.text!r} has {len(left.dims)} dims, but the tensor has shape {list(shape)}")
    for name, v in sizes.items():
        if v <= 0:
            raise SpecError(f"axis {name}={v}: sizes must be positive")
    known: dict[str, int] = {}
    for i, (d, length) in enumerate(zip(left.dims, shape)):
        here = f"dim {i} {_group_text(d)} of length {length}"
        names = [a for a in d if a != UNIT]
        given = [a for a in names if a in sizes]
        free = [a for a in names if a not in sizes]
        prod = math.prod(sizes[a] for a in given)
        if len(given) == 1:
            arith = f"{given[0]}={prod}"
        else:
            arith = "*".join(given) + " = " + "*".join(str(sizes[a]) for a in given) + f" = {prod}"
        if len(free) > 1:
            raise SpecError(f"{here}: can't infer both {' and '.join(free)}; give all but one of them in sizes")
        if free:
            if length % prod:
                raise SpecError(f"can't divide {here} into {arith} parts ({length} % {prod} = {length % prod})")
            known[free[0]] = length // prod
        elif prod != length:
            what = arith if given else "1"
            raise SpecError(f"{here} does not match {what} (the product must equal the length)")
        known.update((a, sizes[a]) for a in given)
    axes = left.axes
    perm = tuple(axes.index(a) for a in pattern.right.axes)
    out = tuple(math.prod(known[a] for a in d if a != UNIT) for d in pattern.right.dims)
    return Steps(tuple(known[a] for a in axes), perm, out)


__all__ = ["AxisPattern", "Side", "Steps", "parse_axes", "solve"]
