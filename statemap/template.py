"""Key patterns and key templates.

A *pattern* matches a whole key and binds named captures::

    encoder.layers.{i}.fc1.weight          {i} matches one dotted segment
    encoder.layers.{i:int}.fc1.weight      {i:int} matches digits only
    {prefix:path}.weight                   {name:path} matches one or more segments
    re:encoder\\.layers\\.(?P<i>\\d+)\\.fc1  raw regex (escape hatch); named groups capture

A *template* builds a key from captures and spec vars, with integer arithmetic::

    model.encoder.layers.{i}.fc1.weight
    decoder.layers.{i+6}.fc1.weight        {2*i+1}, {i//2}, {i%2}, {n_layers-1-i}

Arithmetic is parsed and evaluated here, never by ``eval``. Syntax is checked apart
from meaning: parsing a template needs no captures; filling it does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

from .errors import SpecError
from .keymatch import Matcher, compile_regex, compile_template
from .textsafe import short_repr

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KINDS = {"seg": r"[^.]+", "int": r"\d+", "path": r".+"}
_MAX_EXPR = 200

# -- integer expressions ---------------------------------------------------------------

Expr = Union[int, str, tuple]  # noqa: UP007 - int literal | name | (op, left, right) | ("neg", x)


_CMP = ("==", "!=", "<=", ">=", "<", ">")


def _tokenize(src: str, cond: bool = False) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(src):
        c = src[i]
        op = next((o for o in _CMP if src.startswith(o, i)), None) if cond else None
        if op is not None:
            tokens.append(op)
            i += len(op)
        elif c.isspace():
            i += 1
        elif c.isdigit():
            j = i
            while j < len(src) and src[j].isdigit():
                j += 1
            tokens.append(src[i:j])
            i = j
        elif c.isalpha() or c == "_":
            m = _NAME.match(src, i)
            assert m
            tokens.append(m.group())
            i = m.end()
        elif src.startswith("//", i):
            tokens.append("//")
            i += 2
        elif c in "+-*%()":
            tokens.append(c)
            i += 1
        else:
            raise SpecError(f"unexpected {c!r} in expression {src!r} (allowed: integers, names, + - * // % ( ))")
    return tokens


def parse_expr(src: str) -> Expr:
    """Parse ``2*i+1`` into a small tree. Raises SpecError naming the bad token."""
    return _parse(src, cond=False)


def parse_condition(src: str) -> Expr:
    """Parse a condition such as ``n_kv_heads != n_heads and n_layers > 2`` (for ``when: {if: ...}``).

    Comparisons (``== != < <= > >=``) of integer expressions, joined by ``and`` / ``or`` /
    ``not``; a bare expression is true when it is not 0. Raises SpecError naming the bad token.
    """
    return _parse(src, cond=True)


def _parse(src: str, cond: bool) -> Expr:
    if len(src) > _MAX_EXPR:
        raise SpecError(f"expression longer than {_MAX_EXPR} characters: {src[:40]!r}...")
    tokens = _tokenize(src, cond)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise SpecError(f"expression {src!r} ends too early")
        pos += 1
        return tokens[pos - 1]

    def disj() -> Expr:
        node = conj()
        while peek() == "or":
            take()
            node = ("or", node, conj())
        return node

    def conj() -> Expr:
        node = negation()
        while peek() == "and":
            take()
            node = ("and", node, negation())
        return node

    def negation() -> Expr:
        if peek() == "not":
            take()
            return ("not", negation())
        node = expr()
        if peek() in _CMP:
            op = take()
            node = (op, node, expr())
        return node

    def expr() -> Expr:
        node = term()
        while peek() in ("+", "-"):
            op = take()
            node = (op, node, term())
        return node

    def term() -> Expr:
        node = factor()
        while peek() in ("*", "//", "%"):
            op = take()
            node = (op, node, factor())
        return node

    def factor() -> Expr:
        tok = take()
        if tok == "-":
            return ("neg", factor())
        if tok == "(":
            node = disj() if cond else expr()
            if take() != ")":
                raise SpecError(f"expected ')' in expression {src!r}")
            return node
        if tok.isdigit():
            return int(tok)
        if _NAME.fullmatch(tok) and not (cond and tok in ("and", "or", "not")):
            return tok
        raise SpecError(f"unexpected {tok!r} in expression {src!r}")

    if not tokens:
        raise SpecError("empty expression '{}'")
    node = disj() if cond else expr()
    if pos != len(tokens):
        raise SpecError(f"unexpected {tokens[pos]!r} in expression {src!r}")
    return node


def expr_names(node: Expr) -> set[str]:
    if isinstance(node, str):
        return {node}
    if isinstance(node, tuple):
        return set().union(*(expr_names(x) for x in node[1:]))
    return set()


def eval_expr(node: Expr, env: Mapping[str, object], where: str = "") -> int:
    """Evaluate with integer semantics; names come from ``env`` (captures, vars)."""
    if isinstance(node, int):
        return node
    if isinstance(node, str):
        if node not in env:
            raise SpecError(f"{where}unknown name {node!r} (known: {', '.join(sorted(env)) or 'none'})")
        value = env[node]
        if isinstance(value, bool):
            raise SpecError(f"{where}{node!r} is a boolean, not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        raise SpecError(f"{where}{node!r} = {value!r} is not an integer, so it cannot be used in arithmetic")
    op = node[0]
    if op == "neg":
        return -eval_expr(node[1], env, where)
    if op == "not":
        return int(not eval_expr(node[1], env, where))
    if op in ("and", "or"):
        first = eval_expr(node[1], env, where)
        if (op == "and") != bool(first):
            return int(bool(first))
        return int(bool(eval_expr(node[2], env, where)))
    a, b = eval_expr(node[1], env, where), eval_expr(node[2], env, where)
    if op in _CMP:
        return int({"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op])
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise SpecError(f"{where}division by zero in {op}")
    return a // b if op == "//" else a % b


def eval_condition(node: Expr, env: Mapping[str, object], where: str = "") -> bool:
    """Evaluate a parsed condition; booleans among the vars count as 1 / 0."""
    return bool(eval_expr(node, {k: int(v) if isinstance(v, bool) else v for k, v in env.items()}, where))


def expr_str(node: Expr) -> str:
    """Print an expression back as text, every operation parenthesized: parses to the same tree."""
    if isinstance(node, (int, str)):
        return str(node)
    if node[0] == "neg":
        return f"(-{expr_str(node[1])})"
    if node[0] == "not":
        return f"(not {expr_str(node[1])})"
    if node[0] in ("and", "or") or node[0] in _CMP:
        return f"({expr_str(node[1])} {node[0]} {expr_str(node[2])})"
    return f"({expr_str(node[1])}{node[0]}{expr_str(node[2])})"


# -- shape entries -------------------------------------------------------------------------

ShapeEntry = tuple  # ("expr", Expr) | ("dim", Expr, Template) | ("any",)


def parse_shape_entry(v: object, where: str = "", wildcard: bool = False) -> ShapeEntry:
    """One dim of a shape as written in YAML: an integer, an expression over vars and captures,
    ``{dim: N, of: KEY}`` (a dim of another tensor), or -- with ``wildcard`` -- ``null``
    (any length).

    Example::

        >>> parse_shape_entry("3 * d"), parse_shape_entry(None, wildcard=True)
        (('expr', ('*', 3, 'd')), ('any',))
    """
    if v is None and wildcard:
        return ("any",)
    if isinstance(v, bool):
        raise SpecError(f"{where}shape entry {v!r} is a boolean")
    if isinstance(v, int):
        return ("expr", v)
    if isinstance(v, str):
        try:
            return ("expr", parse_expr(v))
        except SpecError as e:
            raise SpecError(f"{where}{e}") from None
    if isinstance(v, dict) and set(v) == {"dim", "of"} and isinstance(v["of"], str):
        d = v["dim"]
        if isinstance(d, bool) or not isinstance(d, (int, str)):
            raise SpecError(f"{where}'dim' of {{dim, of}} is an integer or an expression, got {d!r}")
        try:
            return ("dim", d if isinstance(d, int) else parse_expr(d), parse_template(v["of"]))
        except SpecError as e:
            raise SpecError(f"{where}{e}") from None
    also = ", null (any length)" if wildcard else ""
    raise SpecError(
        f"{where}shape entry {short_repr(v, 60)} must be an integer, an expression such as 'vocab', or {{dim: 0, of: KEY}}{also}"
    )


def shape_entry_names(e: ShapeEntry) -> set[str]:
    """The vars and captures a shape entry refers to."""
    if e[0] == "expr":
        return expr_names(e[1])
    if e[0] == "dim":
        return expr_names(e[1]) | e[2].names
    return set()


def shape_entry_yaml(e: ShapeEntry) -> object:
    """A parsed shape entry back in its YAML form (for derived specs): parses to the same entry."""
    if e[0] == "expr":
        return e[1] if isinstance(e[1], int) else expr_str(e[1])
    if e[0] == "dim":
        return {"dim": e[1] if isinstance(e[1], int) else expr_str(e[1]), "of": e[2].text}
    return None


def shape_entry_text(e: ShapeEntry) -> str:
    """A shape entry as it reads in a message: ``3 * d`` -> ``(3*d)``, a dim of a key, ``*``."""
    if e[0] == "expr":
        return expr_str(e[1])
    if e[0] == "dim":
        return f"{{dim: {expr_str(e[1])}, of: {e[2].text}}}"
    return "*"


# -- splitting text into literal and {field} parts ---------------------------------------


def _fields(text: str) -> list[tuple[str, str]]:
    """'a.{i}.b' -> [('lit','a.'), ('field','i'), ('lit','.b')]; '{{' and '}}' escape braces."""
    parts: list[tuple[str, str]] = []
    lit: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "{" and text.startswith("{{", i):
            lit.append("{")
            i += 2
        elif c == "}" and text.startswith("}}", i):
            lit.append("}")
            i += 2
        elif c == "{":
            end = text.find("}", i)
            if end < 0:
                raise SpecError(f"unclosed '{{' at position {i} in {text!r}")
            if lit:
                parts.append(("lit", "".join(lit)))
                lit = []
            parts.append(("field", text[i + 1 : end].strip()))
            i = end + 1
        elif c == "}":
            raise SpecError(f"unmatched '}}' at position {i} in {text!r} (write '}}}}' for a literal brace)")
        else:
            lit.append(c)
            i += 1
    if lit:
        parts.append(("lit", "".join(lit)))
    return parts


# -- patterns ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lit:
    """Literal text of a key pattern (braces already unescaped)."""

    text: str


@dataclass(frozen=True)
class Cap:
    """A capture of a key pattern: ``{name}`` (kind ``seg``), ``{name:int}`` or ``{name:path}``."""

    name: str
    kind: str


@dataclass(frozen=True)
class Pattern:
    """Matches whole keys; ``captures`` lists the names it binds, in order.

    ``parts`` is the pattern parsed once (literal text and typed captures; empty for ``re:``):
    the planner, ``invert``, ``lint`` and ``suggest`` read it instead of re-parsing ``text``.
    """

    text: str
    regex: str
    captures: tuple[str, ...]
    is_regex: bool = False
    parts: tuple[Lit | Cap, ...] = ()

    @property
    def is_literal(self) -> bool:
        return not self.captures and not self.is_regex

    @property
    def kinds(self) -> dict[str, str]:
        """Capture name -> ``seg`` / ``int`` / ``path`` (a regex's groups: ``regex``)."""
        if self.is_regex:
            return dict.fromkeys(self.captures, "regex")
        out: dict[str, str] = {}
        for p in self.parts:
            if isinstance(p, Cap):
                out.setdefault(p.name, p.kind)
        return out

    @property
    def identity(self) -> str:
        """The template that rebuilds a matched key: ``a.{i:int}.{rest:path}`` -> ``a.{i}.{rest}``."""
        return "".join(_esc(p.text) if isinstance(p, Lit) else "{" + p.name + "}" for p in self.parts)

    def match(self, key: str) -> dict[str, str] | None:
        """Capture name -> text when the whole key matches, else None; linear time in ``len(key)``."""
        return _matcher(self).match(key)

    def spans(self, key: str) -> dict[str, tuple[int, int] | None] | None:
        """Like :meth:`match`, but capture name -> (start, end) in ``key``."""
        return _matcher(self).spans(key)

    def __str__(self) -> str:
        return self.text


def _esc(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


_CACHE: dict[tuple[str, bool], Matcher] = {}


def _matcher(p: Pattern) -> Matcher:
    m = _CACHE.get((p.text, p.is_regex))
    if m is None:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        m = _CACHE[(p.text, p.is_regex)] = compile_regex(p.text[3:]) if p.is_regex else compile_template(_matcher_parts(p))
    return m


def _matcher_parts(p: Pattern) -> list[tuple[str, ...]]:
    return [("lit", x.text) if isinstance(x, Lit) else ("cap", x.name, x.kind) for x in p.parts]


def _template_parts(text: str) -> list[tuple[str, ...]]:
    """The automaton's view of a (non-regex) pattern text."""
    return _matcher_parts(parse_pattern(text))


def parse_pattern(text: str) -> Pattern:
    """Parse a key pattern; see the module docstring for the syntax."""
    if not isinstance(text, str) or not text:
        raise SpecError(f"a key pattern must be a non-empty string, got {text!r}")
    if text.startswith("re:"):
        src = text[3:]
        if len(src) > 1000:
            raise SpecError(f"regex longer than 1000 characters: {src[:40]!r}...")
        try:
            rx = re.compile(src)
        except (re.error, RecursionError, OverflowError, ValueError) as e:
            raise SpecError(f"invalid regex {src!r}: {e}") from None
        pat = Pattern(text, src, tuple(rx.groupindex), is_regex=True)
        _matcher(pat)  # refuses what the linear-time matcher cannot do, at load time
        return pat
    out: list[str] = []
    names: list[str] = []
    parts: list[Lit | Cap] = []
    for kind, value in _fields(text):
        if kind == "lit":
            out.append(re.escape(value))
            parts.append(Lit(value))
            continue
        name, _, typ = value.partition(":")
        name, typ = name.strip(), (typ.strip() or "seg")
        if not _NAME.fullmatch(name):
            raise SpecError(
                f"bad capture {{{value}}} in pattern {text!r}: a pattern field is a name, "
                "optionally typed as {name:int} or {name:path}; arithmetic belongs in the target"
            )
        if typ not in _KINDS:
            raise SpecError(f"unknown capture type {typ!r} in {{{value}}} of {text!r}; use int or path")
        parts.append(Cap(name, typ))
        if name in names:
            out.append(f"(?P={name})")
        else:
            names.append(name)
            out.append(f"(?P<{name}>{_KINDS[typ]})")
    pat = Pattern(text, "".join(out), tuple(names), parts=tuple(parts))
    _matcher(pat)
    return pat


# -- templates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """Builds a key from captures and vars: literal parts and expression fields."""

    text: str
    parts: tuple[tuple[str, Expr], ...]  # ("lit", "text") | ("expr", tree)

    @property
    def names(self) -> set[str]:
        out: set[str] = set()
        for kind, value in self.parts:
            if kind == "expr":
                out |= expr_names(value)
        return out

    def fill(self, env: Mapping[str, object]) -> str:
        out: list[str] = []
        for kind, value in self.parts:
            if kind == "lit":
                out.append(str(value))
            elif isinstance(value, str):  # a bare name: substitute as text
                if value not in env:
                    raise SpecError(f"template {self.text!r} uses {{{value}}}, which the pattern does not capture")
                out.append(str(env[value]))
            else:
                try:
                    out.append(str(eval_expr(value, env, f"in {self.text!r}: ")))
                except (ValueError, OverflowError, MemoryError):  # e.g. a 5000-digit key segment
                    raise SpecError(
                        f"in {self.text!r}: a value is too large or not a plain integer "
                        f"({', '.join(f'{n}={short_repr(env.get(n), 40)}' for n in sorted(expr_names(value)))})"
                    ) from None
        return "".join(out)

    def __str__(self) -> str:
        return self.text


def parse_template(text: str) -> Template:
    if not isinstance(text, str) or not text:
        raise SpecError(f"a key template must be a non-empty string, got {text!r}")
    parts: list[tuple[str, Expr]] = []
    for kind, value in _fields(text):
        if kind == "lit":
            parts.append(("lit", value))
        else:
            if ":" in value:
                raise SpecError(f"typed field {{{value}}} in target {text!r}: types belong in the source pattern")
            parts.append(("expr", parse_expr(value)))
    return Template(text, tuple(parts))
