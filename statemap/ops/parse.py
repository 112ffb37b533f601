"""Rule parsing: one YAML rule entry -> canonical :class:`~statemap.rules.Rule` objects.

Syntax apart from meaning: each field is checked by its kind (:mod:`statemap.ops.fields`),
then the op checks the fields together (``Op.check_rule``), then the keys: every name a
target or a ``dim`` uses must be a capture of the source, a var, or a name the op adds.
"""

from __future__ import annotations

from typing import Any

from ..errors import SpecError
from ..guards import assume_names, cond_names
from ..rules import Loc, Rule, unknown_field
from ..template import Template, parse_template
from .base import COMMON, REGISTRY, Op
from .fields import int_names


def parse_rule(item: Any, loc: Loc, index: int, var_names: set[str]) -> list[Rule]:
    """One YAML rule entry -> one or more canonical rules (list shorthand expands)."""
    where = f"{loc}: rule #{index}: "
    if not isinstance(item, dict) or not item:
        raise SpecError(f"{where}a rule is a mapping such as `rename: a -> b`; valid ops: {', '.join(REGISTRY)}")
    op_names = [k for k in item if k not in COMMON]
    if len(op_names) != 1:
        if not op_names:
            raise SpecError(f"{where}no op in {sorted(item)}; valid ops: {', '.join(REGISTRY)}")
        raise SpecError(f"{where}one op per rule, found {op_names}")
    op_name = op_names[0]
    if op_name not in REGISTRY:
        raise unknown_field(op_name, list(REGISTRY), where, "op")
    op = REGISTRY[op_name]
    common = {k: COMMON[k].check(k, v, where) for k, v in item.items() if k in COMMON}
    rules = []
    for n, raw in enumerate(op.expand(item[op_name], where)):
        idx = index + n
        w = f"{loc}: rule #{idx} ({op_name}): "
        fields: dict[str, Any] = {}
        for k, v in raw.items():
            k = op.aliases.get(k, k)
            if k in COMMON:
                common[k] = COMMON[k].check(k, v, w)
                continue
            if k not in op.fields:
                raise unknown_field(k, set(op.fields) | set(COMMON), w, f"field of '{op_name}'")
            if k in fields:
                raise SpecError(f"{w}field {k!r} given twice (check aliases such as 'key')")
            f = op.fields[k]
            fields[k] = f.check(k, v, w)
        for k, f in op.fields.items():
            if k not in fields:
                if f.required:
                    raise SpecError(f"{w}missing required field {k!r}; fields: {', '.join(op.fields)}")
                fields[k] = f.default
        if "inverse" in common:  # validate the declared inverse(s) like any other rule
            for inv in common["inverse"] if isinstance(common["inverse"], list) else [common["inverse"]]:
                parse_rule(inv, loc, idx, var_names)
        rules.append(_canonical(op, fields, common, Loc(loc.file, loc.line), idx, var_names, w))
    return rules


def _canonical(
    op: Op[Any], fields: dict[str, Any], common: dict[str, Any], loc: Loc, idx: int, var_names: set[str], w: str
) -> Rule:
    sources: tuple[Any, ...] = ()
    each = fields.pop("for", None)
    if each is not None:
        sources = (each,)
    if op.n_sources == "1":
        sources = (fields.pop("from"),)
    elif op.n_sources == "n":
        given: tuple[Any, ...] = fields.pop("from")
        first = given[0]
        sources = (first, *given[1:])  # later sources are filled from the first one's captures
        for t in given[1:]:
            missing = t.names - set(first.captures) - var_names
            if missing:
                raise SpecError(
                    f"{w}source {t.text!r} uses {sorted(missing)}, which the first source {first.text!r} does not capture"
                )
    to = fields.pop("to", None)
    targets: tuple[Template, ...]
    if to is None:
        if op.n_targets in ("same",):
            if sources[0].is_regex:
                raise SpecError(f"{w}a regex source needs an explicit 'to' template")
            targets = (parse_template(sources[0].identity),)
        else:
            targets = ()
    elif isinstance(to, tuple):
        targets = to
    else:
        targets = (to,)
    if op.n_targets == "n" and len(targets) < 1:
        raise SpecError(f"{w}'to' needs at least one target")
    params = op.Params(**fields)  # the fields besides the keys, typed
    op.check_rule(params, sources, targets, w)
    captures = set(sources[0].captures) if sources else set()
    guard_names = cond_names(common.get("when", ())) | assume_names(tuple(common.get("assume", ())))
    if guard_names - captures - var_names:
        raise SpecError(
            f"{w}'when'/'assume' use {sorted(guard_names - captures - var_names)}, not captured by the source nor a var"
        )
    if common.get("assume") and not sources:
        raise SpecError(f"{w}'assume' states a fact about matched tensors; this rule matches none")
    if any(c.kind in ("dtype", "tied_to", "not_tied_to") for c in common.get("when", ())) and not sources:
        raise SpecError(f"{w}'when: dtype/tied_to' need a matched key; this rule has no 'from'")
    extra = set(op.target_kinds(params))
    for k, v in fields.items():  # a dim names vars or captures (other integers may use vars set at plan time)
        unknown = int_names(v) - captures - var_names if op.fields[k].kind == "axis" and v is not None else set()
        if unknown:
            raise SpecError(f"{w}field {k!r} uses {', '.join(sorted(map(repr, unknown)))}: not a var nor a capture of the source")
    for t in targets:
        missing = t.names - captures - var_names - extra
        if missing:
            raise SpecError(
                f"{w}target {t.text!r} uses {sorted(missing)}, not captured by the source"
                f"{' ' + repr(sources[0].text) if sources else ''} nor a var"
            )
    return Rule(
        op.name,
        idx,
        loc,
        tuple(sources),
        targets,
        tuple(fields.items()),
        bool(common.get("optional", False)),
        common.get("inverse"),
        tuple(common.get("when", ())),
        tuple(common.get("assume", ())),
        " ".join(str(common.get("note") or "").split()),
    )
