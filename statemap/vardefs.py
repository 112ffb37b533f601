"""Spec vars: plain defaults, defaults computed from other vars, and values read from a config.

::

    vars:
      n_heads: {config: n_heads}                          # a dotted path into the config
      n_kv_heads: {config: n_kv_heads, default: n_heads}  # default: an integer expression over vars
      head_dim: dim // n_heads                            # a string naming other vars is an expression
      prefix: "vit."                                      # any other string is text, as before
      vocab: 250001

A var's value comes from, in order: an override (``--set k=v`` / ``vars={...}``), the config
(when the var names a config key and the config has it; ``null`` counts as absent), its default.
Defaults form no cycle (checked when the spec is loaded). Nothing here reads a file.

Example::

    >>> defs = parse_vars({"dim": 32, "n_heads": {"config": "n_heads"}, "head_dim": "dim // n_heads"}, "s.yaml:3: ")
    >>> resolve(defs, {}, {"n_heads": 4}, "params.json")[0]["head_dim"]
    8
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .template import Expr, eval_expr, expr_names, parse_expr
from .textsafe import short_repr

MAX_CONFIG_PATH = 200
MAX_TEXT = 1000  # a text value read from a config
MAX_INT = 1 << 63  # a var's integer value, from a config or a default, fits in 64 bits

__all__ = ["VarDef", "parse_vars", "resolve", "config_value", "is_scalar", "declared"]


@dataclass(frozen=True)
class VarDef:
    """One declared var. ``default`` is a literal (number or text), ``expr`` an expression over
    other vars (then ``default`` is its text); ``config`` a dotted key into the config."""

    name: str
    where: str  # "file:line: " of the declaration
    default: Any = None
    expr: Expr | None = None
    config: str | None = None

    @property
    def has_default(self) -> bool:
        return self.default is not None

    @property
    def needs(self) -> set[str]:
        return expr_names(self.expr) if self.expr is not None else set()


def is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str)) and not isinstance(v, bool)


def _default(name: str, v: Any, names: set[str], where: str) -> tuple[Any, Expr | None]:
    """A default: a number stays a number; a string is an expression when it names other vars
    (``dim // n_heads``, ``n_heads``), else text (``"vit."``)."""
    if not is_scalar(v):
        raise SpecError(f"{where}var {name!r} must have a number or string default, got {short_repr(v, 60)}")
    if not isinstance(v, str):
        return v, None
    try:
        tree = parse_expr(v)
    except SpecError:
        return v, None  # text: "vit.", "model/"
    if isinstance(tree, int):
        return v, None  # "00" stays text, as before
    used = expr_names(tree)
    if not used:
        return v, tree  # "2*3": arithmetic without names
    if used <= names:
        if name in used:
            raise SpecError(f"{where}var {name!r}: its default {v!r} uses {name!r} itself")
        return v, tree
    if used & names:
        raise SpecError(
            f"{where}var {name!r}: default {v!r} reads as an expression over {sorted(used & names)} and unknown "
            f"name(s) {sorted(used - names)}; declare them under 'vars'"
        )
    return v, None


def parse_vars(raw: Mapping[str, Any], where: str, at: Mapping[str, str] | None = None) -> tuple[VarDef, ...]:
    """Check the ``vars:`` mapping; return one :class:`VarDef` per var. Raises :class:`SpecError`
    for a bad name, a bad default, an unknown name in an expression, or a cycle among defaults."""
    names = set(raw)
    defs: list[VarDef] = []
    for k, v in raw.items():
        w = at.get(str(k), where) if at else where
        if not isinstance(k, str) or not k.isidentifier():
            raise SpecError(f"{w}var name {k!r} is not an identifier")
        if isinstance(v, Mapping):
            extra = set(v) - {"config", "default"}
            if extra:
                raise SpecError(
                    f"{w}var {k!r}: unknown field(s) {sorted(map(str, extra))}; a var is a default, or {{config: KEY, default: ...}}"
                )
            cfg = v.get("config")
            if cfg is not None:
                if not isinstance(cfg, str) or not cfg or len(cfg) > MAX_CONFIG_PATH or "" in cfg.split("."):
                    raise SpecError(
                        f"{w}var {k!r}: 'config' is a dotted key into the config such as 'n_heads' or 'model.dim', got {short_repr(cfg, 60)}"
                    )
            elif "default" not in v:
                raise SpecError(f"{w}var {k!r}: give {{config: KEY}} and/or {{default: VALUE}}")
            default, expr = (None, None) if v.get("default") is None else _default(k, v["default"], names, w)
            defs.append(VarDef(k, w, default, expr, cfg))
        else:
            default, expr = _default(k, v, names, w)
            defs.append(VarDef(k, w, default, expr))
    _check_cycles(defs)
    return tuple(defs)


def _check_cycles(defs: list[VarDef]) -> None:
    by = {d.name: d for d in defs}
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(by[n].needs):
            if state.get(m) == 1:
                chain = [*path[path.index(m) :], m] if m in path else [n, m]
                raise SpecError(f"{by[n].where}var defaults form a cycle: {' -> '.join(chain)}; give one of them a value")
            if state.get(m) is None and m in by:
                visit(m, [*path, m])
        state[n] = 2

    for d in defs:
        if d.name not in state:
            visit(d.name, [d.name])


def config_value(data: Any, path: str) -> tuple[bool, Any]:
    """``(found, value)`` for a dotted path (``model.dim``; a number indexes a list). ``null`` counts as absent."""
    cur = data
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return cur is not None, cur


def resolve(
    defs: tuple[VarDef, ...], overrides: Mapping[str, Any], config: Any, config_label: str, bound: bool = True
) -> tuple[dict[str, Any], dict[str, str]]:
    """Values of the vars, and those without one (name -> why).

    ``config``: the config's data (a mapping) or None. With ``bound`` (a conversion is about to
    plan), a config key the config lacks, for a var without default, is an error naming the
    config, the key and the var; unbound (the spec alone), such vars are left pending.
    """
    by = {d.name: d for d in defs}
    values: dict[str, Any] = {}
    pending: dict[str, str] = {}

    def get(n: str) -> None:
        if n in values or n in pending:
            return
        if n in overrides:
            values[n] = overrides[n]
            return
        d = by[n]
        if d.config is not None and config is not None:
            found, v = config_value(config, d.config)
            if found:
                if isinstance(v, bool):
                    v = int(v)
                if not is_scalar(v):
                    raise SpecError(f"{config_label}: key {d.config!r} (var {n!r}) is {type(v).__name__}, not a number or text")
                if isinstance(v, int) and not -MAX_INT <= v < MAX_INT:
                    raise SpecError(f"{config_label}: key {d.config!r} (var {n!r}) is an integer beyond 64 bits")
                if isinstance(v, str) and len(v) > MAX_TEXT:
                    raise SpecError(f"{config_label}: key {d.config!r} (var {n!r}) is text longer than {MAX_TEXT} characters")
                values[n] = v
                return
            if not d.has_default and bound:
                raise SpecError(
                    f"{config_label}: no key {d.config!r} for var {n!r} (declared at {d.where.rstrip(': ')}), which has no default; "
                    f"give it a default or --set {n}=VALUE"
                )
        if not d.has_default:
            if d.config is None:
                pending[n] = "has no value"
            elif config is None:
                pending[n] = (
                    f"comes from config key {d.config!r}, and no config was read (add 'config:' to the spec, or --vars-from FILE, or --set {n}=VALUE)"
                )
            return
        if d.expr is None:
            values[n] = d.default
            return
        for m in sorted(d.needs):
            get(m)
        waiting = sorted(m for m in d.needs if m in pending)
        if waiting:
            pending[n] = f"its default {d.default!r} needs {', '.join(waiting)}"
            return
        try:
            got = eval_expr(d.expr, values, f"var {n!r} = {d.default}: ")
        except SpecError as e:
            raise SpecError(f"{d.where}{e}") from None
        if not -MAX_INT <= got < MAX_INT:
            raise SpecError(f"{d.where}var {n!r} = {d.default} is beyond 64 bits ({got.bit_length()} bits)")
        values[n] = got

    for d in defs:
        get(d.name)
    return {d.name: values[d.name] for d in defs if d.name in values}, pending


def declared(defs: tuple[VarDef, ...], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The ``vars:`` mapping that declares ``defs`` again (overridden vars as their values), for
    a derived spec such as the reverse one: ``{config: KEY, default: ...}`` and expressions kept."""
    out: dict[str, Any] = {}
    for d in defs:
        if d.name in overrides:
            out[d.name] = overrides[d.name]
        elif d.config is not None:
            out[d.name] = {"config": d.config, **({"default": d.default} if d.has_default else {})}
        else:
            out[d.name] = d.default
    return out
