"""invert: derive the reverse spec from a spec, rule by rule, in reverse order.

Each op knows its inverse when the spec alone determines it (``Op.invert`` in its module
under :mod:`statemap.ops`; this module only orders the rules and checks the result):

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
from typing import TYPE_CHECKING, Any

from .errors import SpecError
from .ops import REGISTRY, NotInvertible
from .template import Pattern, Template, expr_names, parse_pattern

if TYPE_CHECKING:  # the reverse spec is built with Spec.from_data: this module sits below statemap.spec
    from .spec import Spec


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
            inv = REGISTRY[rule.op].invert(rule, vars_)
        except NotInvertible as e:
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
        inv_spec = type(spec).from_data(data, f"<inverse of {spec.path}>")
    except SpecError as e:  # a bug in this module, or a declared inverse that does not parse
        raise SpecError(f"{spec.path}: the derived reverse spec is invalid: {e}") from None
    return Inversion(inv_spec, data, tuple(lost), tuple(ambiguous))


_SAMPLE = {"seg": "x0", "int": "7", "path": "p0.q0"}


def _samples(t: Template, src: Pattern | None, vars_: dict[str, Any]) -> str | None:
    """A representative key a forward target template writes (captures filled by kind)."""
    kinds = src.kinds if src is not None and not src.is_regex else {}
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
        op = REGISTRY[rj.op]
        if rj.inverse is not None or not rj.targets or op.inverse_needs:
            continue
        try:
            km = op.keymap(rj, vars_) if rj.sources else None
            pats = [parse_pattern(km.pattern(t)) for t in rj.targets] if km else []
        except (NotInvertible, SpecError):
            continue
        for rk in rules[:j]:
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
