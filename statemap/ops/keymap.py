"""Keys in reverse: what an op's ``inverse`` uses to swap its source pattern and target templates.

:class:`KeyMap` turns a forward target template into a reverse source pattern, and a forward
source pattern into a reverse target template, solving affine arithmetic on captures
(``{2*i+1}`` matches ``{_i0:int}`` and gives back ``{(_i0-1)//2}``).

Example::

    >>> from statemap.template import parse_pattern, parse_template
    >>> km = KeyMap(parse_pattern("h.{i:int}.w"), {})
    >>> km.pattern(parse_template("b.{2*i+1}.w")), km.template(parse_pattern("h.{i:int}.w"))
    ('b.{_i0:int}.w', 'h.{((_i0-1)//2)}.w')
"""

from __future__ import annotations

from typing import Any

from ..template import Cap, Expr, Lit, Pattern, Template, eval_expr, expr_names, expr_str


class NotInvertible(Exception):
    """The rule's effect cannot be undone from the spec alone (the message says why)."""


def esc(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _subst(e: Expr, name: str, by: Expr) -> Expr:
    if e == name:
        return by
    if isinstance(e, tuple):
        return (e[0], *(_subst(x, name, by) for x in e[1:]))
    return e


def kinds_of(p: Pattern) -> dict[str, str]:
    if p.is_regex:
        raise NotInvertible("a raw regex source cannot be turned back into a key; declare `inverse:`")
    return p.kinds


class KeyMap:
    """Forward target templates -> reverse source patterns; forward sources -> reverse targets."""

    def __init__(self, source: Pattern | None, vars_: dict[str, Any], extra_kinds: dict[str, str] | None = None) -> None:
        self.kinds = {**(kinds_of(source) if source is not None else {}), **(extra_kinds or {})}
        self.source = source
        self.vars = vars_
        self.solution: dict[str, Expr] = {}  # forward capture -> expression over reverse captures
        self.fresh = 0

    def _affine(self, e: Expr, var: str) -> tuple[int, int]:
        env = dict(self.vars)
        vals = []
        for x in (0, 1, 2):
            env[var] = x
            vals.append(eval_expr(e, env))
        a, b = vals[1] - vals[0], vals[0]
        if a == 0 or vals[2] != 2 * a + b:
            raise NotInvertible(f"target arithmetic {expr_str(e)} is not an invertible a*{var}+b")
        return a, b

    def pattern(self, t: Template) -> str:
        """A forward target template -> a reverse source pattern; records how to get captures back."""
        out: list[str] = []
        seen: set[str] = set()
        for kind, value in t.parts:
            if kind == "lit":
                out.append(esc(str(value)))
                continue
            names = expr_names(value)
            caps = [n for n in names if n in self.kinds]
            if not caps:  # only vars: a literal in the reverse
                text = self.vars.get(value, "") if isinstance(value, str) else eval_expr(value, self.vars)
                out.append(esc(str(text)))
                continue
            if isinstance(value, str):
                if value in seen or value in self.solution:
                    out.append("{" + value + "}")  # same capture again: must match the same text
                else:
                    kind = self.kinds[value]
                    out.append("{" + value + ("" if kind == "seg" else ":" + kind) + "}")
                    self.solution[value] = value
                    seen.add(value)
                continue
            if len(caps) != 1:
                raise NotInvertible(f"target arithmetic {expr_str(value)} uses several captures")
            var = caps[0]
            a, b = self._affine(value, var)
            fresh = f"_{var}{self.fresh}"
            self.fresh += 1
            out.append("{" + fresh + ":int}")
            if var not in self.solution:
                self.solution[var] = ("//", ("-", fresh, b), a) if a != 1 else (("-", fresh, b) if b else fresh)
        return "".join(out)

    def template(self, src: Pattern | Template) -> str:
        """A forward source pattern (or a template over the same captures) -> a reverse target."""
        fields: list[tuple[str, Any]] = []
        if isinstance(src, Pattern):
            if src.is_regex:
                raise NotInvertible(f"cannot rebuild {src.text!r}")
            fields = [("lit", p.text) if isinstance(p, Lit) else ("expr", p.name) for p in src.parts if isinstance(p, (Lit, Cap))]
        else:
            fields = list(src.parts)
        out: list[str] = []
        for kind, e in fields:
            if kind == "lit":
                out.append(esc(str(e)))
                continue
            for n in expr_names(e):
                if n in self.kinds:
                    if n not in self.solution:
                        where = self.source.text if self.source is not None else src.text
                        raise NotInvertible(
                            f"capture {{{n}}} of {where!r} does not appear in the target, so it cannot be recovered"
                        )
                    e = _subst(e, n, self.solution[n])
            out.append("{" + (e if isinstance(e, str) else expr_str(e)) + "}")
        return "".join(out)

    def same_captures(self, targets: tuple[Template, ...]) -> None:
        """Every later target uses only captures the first one (already mapped) binds."""
        for t in targets:
            missing = {n for n in t.names if n in self.kinds} - set(self.solution)
            if missing:
                raise NotInvertible(f"target {t.text!r} uses captures {sorted(missing)} the first target does not")


__all__ = ["KeyMap", "NotInvertible"]
