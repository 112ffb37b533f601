"""invert: derive the reverse spec from a spec, rule by rule, in reverse order.

Each op knows its inverse when the spec alone determines it:

=========  ==========================================  =========================================
forward    inverse                                     notes
=========  ==========================================  =========================================
rename     rename back                                 captures with arithmetic are solved:
                                                       ``{2*i+1}`` matches ``{_i0:int}``, gives
                                                       back ``{(_i0-1)//2}``
keep       keep
split      merge (concat along the same dim)
merge      split (equal chunks along the same dim)     ``mode: stack`` needs a declared inverse
merge over split over the same name, mode and dim        concat / same need ``count``
split over merge over the same name
rearrange  rearrange with the pattern's sides swapped
copy, tie  rename the first target back, drop the rest  the copies are equal, nothing is lost
transpose  the same transpose
permute    the inverse permutation
inject     drop
drop, slice, pad, reshape, cast, view              need facts the spec does not hold (the
                                                   dropped values, the original length, shape
                                                   or dtype): they use the rule's declared
                                                   ``inverse:``, or are reported as lost
=========  ==========================================  =========================================

Example::

    >>> from statemap.spec import load_spec
    >>> inv = invert(load_spec("vit-timm-to-hf"))
    >>> inv.lossless, inv.lost
    (True, ())
    >>> inv.spec.name
    'vit-timm-to-hf-inverse'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .ops import REGISTRY, _pattern_as_template, int_yaml
from .spec import Rule, Spec, parse_spec
from .template import (
    Expr,
    Pattern,
    Template,
    _fields,
    eval_expr,
    expr_names,
    expr_str,
    parse_expr,
    parse_pattern,
    parse_template,
)


@dataclass(frozen=True)
class Inversion:
    """The reverse of a spec, and what it cannot restore."""

    spec: Spec
    data: dict[str, Any]  # the reverse spec as YAML-shaped data
    lost: tuple[str, ...]  # one line per rule whose effect cannot be undone (file:line, rule, why)
    ambiguous: tuple[str, ...] = ()  # reverse rules that would take keys of other rules: unusable

    @property
    def lossless(self) -> bool:
        return not self.lost and not self.ambiguous

    @property
    def usable(self) -> bool:
        """False when the reverse could map keys wrongly; `apply --reverse` then refuses."""
        return not self.ambiguous

    def to_yaml(self) -> str:
        import yaml

        from .textsafe import show  # comment lines: a newline in spec text must not start a YAML line

        head = [
            f"# Reverse of {show(self.data['description'].removeprefix('reverse of '), None)}, written by `statemap invert`.",
        ]
        if self.ambiguous:
            head.append("# WARNING: AMBIGUOUS, do not use as is (declare `inverse:` on these rules, or edit by hand):")
            head += [f"#   {show(line, None)}" for line in self.ambiguous]
        if self.lost:
            head.append("# NOT restored (declare `inverse:` on these rules to restore them):")
            head += [f"#   {show(line, None)}" for line in self.lost]
        body = yaml.safe_dump(self.data, sort_keys=False, width=120, allow_unicode=True)
        return "\n".join(head) + "\n" + body


def invert(spec: Spec) -> Inversion:
    """Derive the reverse spec. Rules that cannot be inverted are listed in ``lost``."""
    rules: list[dict[str, Any]] = []
    lost: list[str] = []
    vars_ = spec.var_dict
    for rule in reversed(spec.rules):
        where = f"{rule.loc}: {rule.label}"
        if rule.inverse is not None:
            rules.extend(dict(r) for r in (rule.inverse if isinstance(rule.inverse, list) else [rule.inverse]))
            continue
        try:
            inv = _invert_rule(rule, vars_)
        except _NotInvertible as e:
            lost.append(f"{where}: {e}")
            continue
        rules.extend(inv)
    ambiguous = _ambiguities(spec, vars_)
    data: dict[str, Any] = {
        "name": f"{spec.name}-inverse",
        "version": 1,
        "description": f"reverse of {spec.name}" + (f": {spec.description}" if spec.description else ""),
        "source": spec.target,
        "target": spec.source,
    }
    if spec.verified:
        data["verified"] = f"derived by statemap invert from {spec.name}"
    if spec.var_defs:  # declarations, not values: config keys and expressions stay as written
        from .vardefs import declared

        data["vars"] = declared(spec.var_defs, dict(spec.overrides))
    elif vars_:
        data["vars"] = dict(vars_)
    reads_config = any(isinstance(v, dict) and "config" in v for v in data.get("vars", {}).values())
    if spec.config is not None and reads_config:  # vars given when inverting are values: no config to read
        data["config"] = spec.config[1] if spec.config[0] == "file" else {"checkpoint": spec.config[1]}
    data["strict"] = spec.strict
    data["tied"] = spec.tied
    data["rules"] = rules
    try:
        inv_spec = parse_spec(data, f"<inverse of {spec.path}>")
    except SpecError as e:  # a bug in this module, or a declared inverse that does not parse
        raise SpecError(f"{spec.path}: the derived reverse spec is invalid: {e}") from None
    return Inversion(inv_spec, data, tuple(lost), tuple(ambiguous))


class _NotInvertible(Exception):
    pass


# -- keys -----------------------------------------------------------------------------------


def _kinds(p: Pattern) -> dict[str, str]:
    if p.is_regex:
        raise _NotInvertible("a raw regex source cannot be turned back into a key; declare `inverse:`")
    out: dict[str, str] = {}
    for kind, value in _fields(p.text):
        if kind == "field":
            name, _, typ = value.partition(":")
            out.setdefault(name.strip(), typ.strip() or "seg")
    return out


def _esc(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _subst(e: Expr, name: str, by: Expr) -> Expr:
    if e == name:
        return by
    if isinstance(e, tuple):
        return (e[0], *(_subst(x, name, by) for x in e[1:]))
    return e


class _KeyMap:
    """Turns forward target templates into reverse source patterns, and forward source patterns
    into reverse target templates, solving affine arithmetic on captures."""

    def __init__(self, source: Pattern, vars_: dict[str, Any]) -> None:
        self.kinds = _kinds(source)
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
            raise _NotInvertible(f"target arithmetic {expr_str(e)} is not an invertible a*{var}+b")
        return a, b

    def pattern(self, t: Template) -> str:
        """A forward target template -> a reverse source pattern; records how to get captures back."""
        out: list[str] = []
        seen: set[str] = set()
        for kind, value in t.parts:
            if kind == "lit":
                out.append(_esc(str(value)))
                continue
            names = expr_names(value)
            caps = [n for n in names if n in self.kinds]
            if not caps:  # only vars: a literal in the reverse
                text = self.vars.get(value, "") if isinstance(value, str) else eval_expr(value, self.vars)
                out.append(_esc(str(text)))
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
                raise _NotInvertible(f"target arithmetic {expr_str(value)} uses several captures")
            var = caps[0]
            a, b = self._affine(value, var)
            fresh = f"_{var}{self.fresh}"
            self.fresh += 1
            out.append("{" + fresh + ":int}")
            if var not in self.solution:
                self.solution[var] = ("//", ("-", fresh, b), a) if a != 1 else (("-", fresh, b) if b else fresh)
        return "".join(out)

    def template(self, text: str | Pattern) -> str:
        """A forward source pattern (or template text over the same captures) -> a reverse target."""
        src = text.text if isinstance(text, (Pattern, Template)) else text
        out: list[str] = []
        for kind, value in _fields(src):
            if kind == "lit":
                out.append(_esc(value))
                continue
            name = value.split(":")[0].strip()
            try:
                e = parse_expr(name)
            except SpecError:
                raise _NotInvertible(f"cannot rebuild {src!r}") from None
            for n in expr_names(e):
                if n in self.kinds:
                    if n not in self.solution:
                        raise _NotInvertible(
                            f"capture {{{n}}} of {self.source.text!r} does not appear in the target, so it cannot be recovered"
                        )
                    e = _subst(e, n, self.solution[n])
            out.append("{" + (e if isinstance(e, str) else expr_str(e)) + "}")
        return "".join(out)


def _restore_copy(rule: Rule, other: Template, when_absent: bool) -> list[dict[str, Any]]:
    """The reverse of dropping a key known to equal ``other``: tie ``other`` back to the key."""
    src = rule.sources[0]
    if src.is_regex or set(src.captures) - other.names:
        raise _NotInvertible(
            f"the dropped key's captures are not all in {other.text!r}, so the key cannot be rebuilt; declare `inverse:`"
        )
    key = _pattern_as_template(src.text)
    fields: dict[str, Any] = {"from": other.text, "to": [other.text, key]}
    if when_absent:
        fields["when"] = {"absent": key}
    if rule.optional or when_absent:
        fields["optional"] = True
    return [{"tie": {**fields, "note": f"inverse of {rule.label} at {rule.loc}"}}]


def _invert_rule(rule: Rule, vars_: dict[str, Any]) -> list[dict[str, Any]]:
    op, p = rule.op, rule.p
    opt = {"optional": True} if rule.optional else {}
    note = {"note": f"inverse of {rule.label} at {rule.loc}"}
    if op == "drop":  # a dropped copy of another tensor comes back as that tensor
        equal = [a.arg for a in rule.assume if a.kind == "equal"]
        tied = [c.arg for c in rule.when if c.kind == "tied_to"]
        if equal or tied:
            if len(rule.when) > len(tied):
                raise _NotInvertible("its other `when:` conditions refer to the forward side; declare `inverse:`")
            return _restore_copy(rule, (equal or tied)[0], when_absent=bool(tied) and not equal)
    dtypes = [c.arg for c in rule.when if c.kind == "dtype"]
    if op == "view" and len(rule.when) == 1 and dtypes and len(dtypes[0]) == 1:
        # `view ... when: {dtype: X}` knows the original dtype: view back, on keys of the new dtype
        km = _KeyMap(rule.sources[0], vars_)
        to = rule.targets[0] if rule.targets else None
        src = km.pattern(to) if to is not None else rule.sources[0].text
        view: dict[str, Any] = {"from": src, "dtype": dtypes[0][0], "when": {"dtype": p["dtype"]}}
        back = km.template(rule.sources[0]) if to is not None else None
        if back is not None and back != src:
            view["to"] = back
        return [{"view": {**view, "optional": True, **note}}]
    if rule.when:
        raise _NotInvertible("a conditional rule (`when:`) cannot be reversed from the spec alone; declare `inverse:`")
    needs = REGISTRY[op].inverse_needs
    if needs:
        raise _NotInvertible(f"{op} is lossy: {needs}; declare `inverse:` on the rule")
    if op == "inject":
        if not rule.targets:
            raise _NotInvertible("inject without a target")
        km = _KeyMap(rule.sources[0], vars_) if rule.sources else _KeyMap(Pattern("", "", ()), vars_)
        return [{"drop": {"from": km.pattern(rule.targets[0]), **opt, **note}}]
    km = _KeyMap(rule.sources[0], vars_)
    if op == "keep":
        return [{"keep": {"from": rule.sources[0].text, **opt, **note}}]
    if op == "rename":
        src = km.pattern(rule.targets[0])
        return [{"rename": {"from": src, "to": km.template(rule.sources[0]), **opt, **note}}]
    if op in ("copy", "tie"):
        first = km.pattern(rule.targets[0])
        out: list[dict[str, Any]] = []
        for t in rule.targets[1:]:
            k2 = _KeyMap(rule.sources[0], vars_)
            drop_pat = k2.pattern(t)
            if drop_pat != first:
                # the copy was equal to the kept key when written; the reverse verifies it still is,
                # so a copy that diverged (fine-tuned untied) fails loudly instead of being dropped
                kept = _pattern_as_template(first)
                same = {"assume": {"equal": kept}} if parse_template(kept).names <= set(parse_pattern(drop_pat).captures) else {}
                out.append({"drop": {"from": drop_pat, **same, **opt, **note}})
        out.append({"rename": {"from": first, "to": km.template(rule.sources[0]), **opt, **note}})
        return out
    if op == "split" and p.get("over"):
        over = p["over"]
        km.kinds[over] = "int"
        src = km.pattern(rule.targets[0])
        if km.solution.get(over) != over:
            raise _NotInvertible(f"the target uses {{{over}}} with arithmetic; declare `inverse:`")
        body = {"from": src, "over": over, "mode": p["mode"], "to": km.template(rule.sources[0])}
        if p["mode"] != "same":
            body["dim"] = int_yaml(p["dim"])
        if p.get("count") is not None:
            body["count"] = int_yaml(p["count"])
        return [{"merge": {**body, **opt, **note}}]
    if op == "merge" and p.get("over"):
        over = p["over"]
        src = km.pattern(rule.targets[0])
        km.solution[over] = over
        body = {"from": src, "over": over, "mode": p["mode"], "to": km.template(rule.sources[0])}
        if p["mode"] != "same":
            body["dim"] = int_yaml(p["dim"])
        if p.get("count") is not None:
            body["count"] = int_yaml(p["count"])
        elif p["mode"] != "stack":
            raise _NotInvertible(f"the number of pieces over {over} is not in the spec; give `count:`")
        return [{"split": {**body, **opt, **note}}]
    if op == "rearrange":
        to = rule.targets[0] if rule.targets else None
        src = km.pattern(to) if to is not None else rule.sources[0].text
        back = km.template(rule.sources[0]) if to is not None else None
        fields: dict[str, Any] = {"from": src}
        if back is not None and back != src:
            fields["to"] = back
        fields["pattern"] = p["pattern"].inverse().text
        if p["sizes"]:
            fields["sizes"] = {k: int_yaml(v) for k, v in p["sizes"]}
        return [{"rearrange": {**fields, **opt, **note}}]
    if op == "split":
        first = km.pattern(rule.targets[0])
        others = [km.template(t.text) for t in rule.targets[1:]]
        _check_same_captures(km, rule)
        return [
            {"merge": {"from": [first, *others], "to": km.template(rule.sources[0]), "dim": int_yaml(p["dim"]), **opt, **note}}
        ]
    if op == "merge":
        if p["mode"] != "concat":
            raise _NotInvertible("merge with mode: stack needs a declared `inverse:` (a split and a reshape)")
        src = km.pattern(rule.targets[0])
        targets = [km.template(rule.sources[0])] + [km.template(t.text) for t in rule.sources[1:]]
        return [{"split": {"from": src, "to": targets, "dim": int_yaml(p["dim"]), **opt, **note}}]
    if op in ("transpose", "permute"):
        to = rule.targets[0] if rule.targets else None
        src = km.pattern(to) if to is not None else rule.sources[0].text
        back = km.template(rule.sources[0]) if to is not None else None
        fields = {"from": src}
        if back is not None and back != src:
            fields["to"] = back
        if op == "transpose":
            if p.get("dims") is not None:
                fields["dims"] = list(p["dims"])
        else:
            dims = list(p["dims"])
            fields["dims"] = [dims.index(i) for i in range(len(dims))]
        return [{op: {**fields, **opt, **note}}]
    raise _NotInvertible(f"no inverse known for op {op!r}; declare `inverse:`")


_SAMPLE = {"seg": "x0", "int": "7", "path": "p0.q0"}


def _samples(t: Template, src: Pattern | None, vars_: dict[str, Any]) -> str | None:
    """A representative key a forward target template writes (captures filled by kind)."""
    kinds = _kinds(src) if src is not None and not src.is_regex else {}
    env: dict[str, Any] = dict(vars_)
    for name in t.names:
        if name not in env:
            env[name] = _SAMPLE.get(kinds.get(name, "seg"), "x0")
            if kinds.get(name) != "int" and any(isinstance(v, tuple) and name in expr_names(v) for _, v in t.parts):
                env[name] = 7
    try:
        return t.fill(env)
    except SpecError:
        return None


def _ambiguities(spec: Spec, vars_: dict[str, Any]) -> list[str]:
    """Rule j's reverse runs before the reverses of earlier rules, on every key that exists at the
    end. If it would match a key that an earlier rule k wrote and rule j never consumed, the
    reverse cannot tell whose key it is: report it instead of writing a wrong spec."""
    out: list[str] = []
    rules = list(spec.rules)
    for j, rj in enumerate(rules):
        if rj.inverse is not None or not rj.targets or REGISTRY[rj.op].inverse_needs:
            continue
        try:
            km = _KeyMap(rj.sources[0], vars_) if rj.sources else None
            pats = [parse_pattern(km.pattern(t)) for t in rj.targets] if km else []
        except (_NotInvertible, SpecError):
            continue
        for rk in rules[:j]:
            if rk.op in ("drop",):
                continue
            for t in rk.targets:
                sample = _samples(t, rk.sources[0] if rk.sources else None, vars_)
                if sample is None:
                    continue
                consumed_by_j = bool(rj.sources) and rj.sources[0].match(sample) is not None
                if consumed_by_j:
                    continue
                if any(p.match(sample) is not None for p in pats):
                    out.append(
                        f"{rj.loc}: {rj.label}: its reverse would also take keys that {rk.label} at {rk.loc} writes "
                        f"(e.g. {sample!r}); the reverse cannot tell them apart: declare `inverse:` on these rules "
                        "or write the reverse spec by hand"
                    )
                    break
            else:
                continue
            break
    return out


def _check_same_captures(km: _KeyMap, rule: Rule) -> None:
    for t in rule.targets[1:]:
        missing = {n for n in t.names if n in km.kinds} - set(km.solution)
        if missing:
            raise _NotInvertible(f"target {t.text!r} uses captures {sorted(missing)} the first target does not")
