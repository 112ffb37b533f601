"""The parsed form of a spec's rules, below everything that reads them.

:class:`Rule` is what :func:`statemap.ops.parse_rule` builds and what the planner, ``invert``,
``lint`` and ``schema`` read; :class:`Loc` keeps ``file:line`` for messages. This module holds
data only, so every layer above may import it (see docs/architecture.md).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .template import Pattern, Template


@dataclass(frozen=True)
class Loc:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Rule:
    """One canonical rule. ``params`` holds the op's checked fields (see :mod:`statemap.ops`)."""

    op: str
    index: int
    loc: Loc
    sources: tuple[Pattern, ...]
    targets: tuple[Template, ...]
    params: tuple[tuple[str, Any], ...] = ()
    optional: bool = False
    inverse: Any = None  # declared inverse rule(s) (raw mapping, or list of them), for lossy ops
    when: tuple[Any, ...] = ()  # guards.Cond: which matched keys the rule acts on (metadata only)
    assume: tuple[Any, ...] = ()  # guards.Assume: facts the rule relies on, verified before writing
    note: str = ""  # the spec's free-text note; plan errors of this rule end with it (the author's hint)

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        src = ", ".join(map(str, self.sources)) or "-"
        return f"rule #{self.index} ({self.op} {src})"

    def where(self) -> str:
        return f"{self.loc}: {self.label}: "


def unknown_field(name: str, valid: set[str] | list[str], where: str, what: str) -> SpecError:
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return SpecError(f"{where}unknown {what} {name!r}; {hint}valid: {', '.join(sorted(valid))}")


__all__ = ["Loc", "Rule", "unknown_field"]
