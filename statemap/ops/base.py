"""The op contract: what every op module provides, and the registry that finds them by name.

An op (one subclass of :class:`Op`, registered with :func:`register`) owns its whole lifecycle:

=================  ===============================================  ==============================
hook               what it says                                      asked by
=================  ===============================================  ==============================
``fields``         fields as written, checked at spec-load time      :mod:`statemap.ops.parse`
``Params``         the checked fields (besides keys) as a dataclass  every hook below
``expand``         its YAML shorthands -> field mappings             parse, schema
``check_rule``     checks across fields                              parse
``schema``         its JSON-Schema fragments                         :mod:`statemap.schema`
``gather``         which matched keys form one planning step         :mod:`statemap.plan`
``target_names``   the keys one step writes                          plan
``plan``           recipe nodes, or a PlanError with the arithmetic  plan
``invert``         the reverse rule(s), or why there are none        :mod:`statemap.invert`
``lint``           findings about its parameters                     :mod:`statemap.lint`
``target_kinds``   names its targets use besides the source's        parse, lint, invert
``joined``         captures its targets may leave out on purpose     lint
=================  ===============================================  ==============================

Ops never touch tensor bytes. They compile to the primitives of :class:`statemap.meta.Node`,
which :mod:`statemap.apply` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import yaml

from ..errors import PlanError, SpecError
from ..meta import Node
from ..rules import Rule
from ..template import Template, eval_expr, expr_str
from .fields import DimOf, Field, IntValue, field_schema
from .keymap import KeyMap, NotInvertible

COMMON = {
    "optional": Field("bool", default=False, doc="matching nothing is reported, not an error"),
    "note": Field("text", doc="free text; it ends this rule's planning errors (a hint such as which var to set)"),
    "inverse": Field("rule", doc="the rule (or list of rules) that undoes this one, for `statemap invert` (lossy ops)"),
    "when": Field(
        "when",
        doc="conditions on metadata: which matched keys the rule acts on (present, absent, dtype, tied_to, not_tied_to, if)",
    ),
    "assume": Field(
        "assume", doc="facts the rule relies on, verified before anything is written (equal: KEY, value: N, shape: [...])"
    ),
}


# -- planning context ------------------------------------------------------------------------


@dataclass
class Ctx:
    """What an op may see while planning: the rule, its bindings, and the current key table."""

    rule: Rule
    env: dict[str, Any]  # vars and captures
    lookup: Callable[[str], Node | None]
    key: str = ""  # the matched source key, for messages
    keys: tuple[str, ...] = ()  # every input key, in order (the matched key first)
    # set by an op while planning: (key, other key, why) facts verified before writing, and
    # whether the targets are one tensor (a tie group)
    equal: list[tuple[str, str, str]] = field(default_factory=list)
    tie: bool = False

    def fail(self, msg: str) -> PlanError:
        at = f" at {self.key!r}" if self.key else ""
        note = f" (note: {self.rule.note})" if self.rule.note else ""
        return PlanError(f"{self.rule.where()}{msg}{at}{note}")

    def fill(self, t: Template, extra: Mapping[str, Any] | None = None) -> str:
        try:
            return t.fill({**self.env, **extra} if extra else self.env)
        except SpecError as e:
            raise PlanError(f"{self.rule.where()}{e}") from None

    def to_int(self, expr: IntValue) -> int:
        if isinstance(expr, DimOf):
            d = self.to_int(expr.dim)
            ref = self.fill(expr.of)
            node = self.lookup(ref)
            if node is None:
                raise self.fail(
                    f"{{dim: {expr_str(expr.dim)}, of: {expr.of.text!r}}} refers to {ref!r}, which does not exist at this point"
                )
            if not -len(node.shape) <= d < len(node.shape):
                raise self.fail(f"{ref!r} has shape {list(node.shape)}; it has no dim {d}")
            return node.shape[d]
        try:
            return eval_expr(expr, self.env)
        except SpecError as e:
            raise self.fail(str(e)) from None

    def shape(self, entries: tuple[tuple[Any, ...], ...]) -> list[int]:
        dims: list[int] = []
        for e in entries:
            if e[0] == "expr":
                dims.append(self.to_int(e[1]))
            else:
                _, d, tmpl = e
                ref = self.fill(tmpl)
                node = self.lookup(ref)
                if node is None:
                    raise self.fail(f"shape refers to {ref!r}, which does not exist at this point")
                d = self.to_int(d)
                if not -len(node.shape) <= d < len(node.shape):
                    raise self.fail(f"{ref!r} has shape {list(node.shape)}; it has no dim {d}")
                dims.append(node.shape[d])
        return dims


def norm_dim(ctx: Ctx, dim: IntValue, ndim: int, what: str) -> int:
    d = ctx.to_int(dim)
    if not -ndim <= d < ndim:
        raise ctx.fail(f"{what} has {ndim} dims; dim {d} is out of range")
    return d % ndim


def permute_node(src: Node, axes: tuple[int, ...]) -> Node:
    return Node("permute", tuple(src.shape[a] for a in axes), src.dtype, (src,), (axes,))


@dataclass(frozen=True)
class LintFact:
    """An op's finding about its own parameters (lint code SM108)."""

    message: str
    hint: str = ""
    severity: str = "error"  # or "warning"


def int_or_none(expr: Any, vars_: Mapping[str, Any]) -> int | None:
    """An integer field's value from the vars' defaults, or None when it needs the checkpoint."""
    try:
        v = eval_expr(expr, dict(vars_))
    except Exception:  # noqa: BLE001 - unknown until planned
        return None
    return v if isinstance(v, int) else None


def shape_facts(shape: Any, vars_: Mapping[str, Any], rest_ok: bool) -> list[LintFact]:
    """Lint a ``shape`` field: at most one -1 (where ``rest_ok``), no other negative dim."""
    vals = [int_or_none(e[1], vars_) if e[0] == "expr" else None for e in shape or ()]
    out = []
    if rest_ok and vals.count(-1) > 1:
        out.append(LintFact(f"shape {vals} has more than one -1"))
    low = [v for v in vals if v is not None and (v < -1 or (v == -1 and not rest_ok))]
    if low:
        out.append(LintFact(f"shape {vals} has a negative dim {low[0]}"))
    return out


Gathered = tuple[str, dict[str, str], tuple[str, ...]]  # (first key, captures, other input keys)


# -- ops -------------------------------------------------------------------------------------

KEY_FIELDS = ("from", "to", "for")  # fields that become the rule's sources and targets, not params


@dataclass(frozen=True)
class NoParams:
    """The params of an op whose fields are all keys (rename, drop, copy, ...)."""


P = TypeVar("P")


class Op(Generic[P]):
    name: ClassVar[str]
    summary: ClassVar[str]
    example: ClassVar[str]
    fields: ClassVar[dict[str, Field]]
    Params: ClassVar[type] = NoParams  # frozen dataclass: the checked fields besides from / to / for, typed
    n_sources: ClassVar[str] = "1"  # "0", "1", "n"
    n_targets: ClassVar[str] = "1"  # "0", "1", "n", "same"
    # why `statemap invert` cannot undo this op from the spec alone ("" = it can)
    inverse_needs: ClassVar[str] = ""
    ties: ClassVar[bool] = False
    keeps_sources: ClassVar[bool] = False  # matched keys stay as they are (inject with `for`)
    moves_only: ClassVar[bool] = False  # 1 -> 1, the value untouched (the planner's fast path)
    aliases: ClassVar[dict[str, str]] = {"key": "from"}

    def params(self, rule: Rule) -> P:
        """The rule's checked fields as this op's typed :attr:`Params`."""
        return self.Params(**dict(rule.params))

    # -- parsing

    def expand(self, value: Any, where: str) -> list[dict[str, Any]]:
        """Shorthand -> list of field mappings. Default: a mapping, or a pattern string."""
        if isinstance(value, dict):
            return [dict(value)]
        if isinstance(value, str) and "from" in self.fields:
            return [{"from": value}]
        raise SpecError(f"{where}'{self.name}' takes a mapping of {', '.join(self.fields)}; see docs/spec.md")

    def check_rule(self, p: P, sources: tuple[Any, ...], targets: tuple[Template, ...], where: str) -> None:
        """Checks across fields, at spec-load time (after each field is checked on its own)."""

    def target_kinds(self, p: P) -> dict[str, str]:
        """Names a target may use besides the source's captures and the vars, with their capture
        kind (split's ``over`` index: ``int``)."""
        return {}

    def joined(self, p: P) -> set[str]:
        """Captures of the source the targets leave out on purpose (merge's ``over``)."""
        return set()

    # -- planning

    def gather(self, rule: Rule, found: list[tuple[str, dict[str, str]]], p: P) -> list[Gathered]:
        """Matched keys -> (first key, captures, other input keys) per planning step. Default: one key each."""
        return [(k, caps, ()) for k, caps in found]

    def target_names(self, rule: Rule, inputs: list[Node], p: P, ctx: Ctx) -> list[str]:
        """The keys this step writes. Default: the rule's target templates, filled."""
        return [ctx.fill(t) for t in rule.targets]

    def plan(self, inputs: list[Node], targets: list[str], p: P, ctx: Ctx) -> list[Node]:
        raise NotImplementedError

    # -- inverting

    def keymap(self, rule: Rule, vars_: dict[str, Any]) -> KeyMap:
        return KeyMap(rule.sources[0] if rule.sources else None, vars_, self.target_kinds(self.params(rule)))

    def invert(self, rule: Rule, vars_: dict[str, Any]) -> list[dict[str, Any]]:
        """The reverse rule(s) as YAML-shaped data; raises NotInvertible saying why there are none.

        Default: a conditional rule or a lossy op (``inverse_needs``) has none; else :meth:`inverse`.
        """
        if rule.when:
            raise NotInvertible("a conditional rule (`when:`) cannot be reversed from the spec alone; declare `inverse:`")
        if self.inverse_needs:
            raise NotInvertible(f"{self.name} is lossy: {self.inverse_needs}; declare `inverse:` on the rule")
        return self.inverse(rule, self.keymap(rule, vars_), self.params(rule))

    def inverse(self, rule: Rule, km: KeyMap, p: P) -> list[dict[str, Any]]:
        raise NotInvertible(f"no inverse known for op {self.name!r}; declare `inverse:`")

    @staticmethod
    def extras(rule: Rule) -> dict[str, Any]:
        """``optional`` and a ``note`` naming the forward rule, for a derived reverse rule."""
        return {**({"optional": True} if rule.optional else {}), "note": f"inverse of {rule.label} at {rule.loc}"}

    def one_to_one_inverse(self, rule: Rule, km: KeyMap, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The reverse of a 1 -> 1 op whose ``to`` is optional: swap the keys, add ``body``."""
        to = rule.targets[0] if rule.targets else None
        src = km.pattern(to) if to is not None else rule.sources[0].text
        back = km.template(rule.sources[0]) if to is not None else None
        fields: dict[str, Any] = {"from": src}
        if back is not None and back != src:
            fields["to"] = back
        return [{self.name: {**fields, **body, **self.extras(rule)}}]

    # -- lint

    def lint(self, rule: Rule, vars_: Mapping[str, Any]) -> list[LintFact]:
        """Problems with the parameters, from the vars' defaults alone (no checkpoint)."""
        return []

    # -- JSON Schema

    def _accepts(self, value: Any) -> list[dict[str, Any]] | None:
        try:
            return self.expand(value, "")
        except SpecError:
            return None

    def _complete(self, raw: list[dict[str, Any]] | None) -> bool:
        """True when ``raw`` (an expansion) gives every required field."""
        if raw is None or len(raw) != 1:
            return False
        keys = {self.aliases.get(k, k) for k in raw[0]}
        return all(k in keys for k, f in self.fields.items() if f.required)

    def _string_form(self) -> dict[str, Any] | None:
        """The string shorthand, found by asking :meth:`expand` (so it cannot drift)."""
        if self._complete(self._accepts("a")):
            return {"type": "string", "description": f"shorthand for {{from: PATTERN}}: {self.summary}"}
        if self._complete(self._accepts("a -> b")):
            return {"type": "string", "pattern": "->", "description": f"shorthand 'SOURCE -> TARGET': {self.summary}"}
        return None

    def schema_mapping(self) -> dict[str, Any]:
        """JSON Schema of the mapping form ``{from: ..., to: ..., ...}``."""
        props: dict[str, Any] = {name: field_schema(name, f) for name, f in self.fields.items()}
        for alias, target in self.aliases.items():
            if target in self.fields and alias not in self.fields:
                props[alias] = field_schema(alias, self.fields[target], alias_of=target)
        for name, f in COMMON.items():
            props[name] = field_schema(name, f)
        s: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        required: list[str] = []
        groups: list[list[dict[str, Any]]] = []
        exclusive: dict[str, Any] = {}
        for name, f in self.fields.items():
            aliases = sorted(a for a, t in self.aliases.items() if t == name and a not in self.fields)
            if f.required and not aliases:
                required.append(name)
            elif f.required:  # one of the spellings must be there
                groups.append([{"required": [n]} for n in (name, *aliases)])
            for a in aliases:  # ...and not two of them ("field given twice")
                exclusive[a] = {"not": {"required": [name]}}
        if required:
            s["required"] = required
        if len(groups) == 1:
            s["anyOf"] = groups[0]
        elif groups:
            s["allOf"] = [{"anyOf": g} for g in groups]
        if exclusive:
            s["dependentSchemas"] = exclusive
        return s

    def schema_value(self) -> dict[str, Any]:
        """What may follow ``OP:`` in a rule: the mapping, and the shorthands :meth:`expand` takes."""
        forms: list[dict[str, Any]] = [{"$ref": f"#/$defs/op_{self.name}"}]
        string = self._string_form()
        if string:
            forms.append(string)
        two = self._accepts([{"from": "a"}, {"from": "b"}])
        if two == [{"from": "a"}, {"from": "b"}]:  # a list is a list of rules
            items: dict[str, Any] = {"$ref": f"#/$defs/op_{self.name}"}
            if string and (self._accepts(["a"]) or self._accepts(["a -> b"])):
                items = {"anyOf": [items, string]}
            forms.append({"type": "array", "description": f"a list of '{self.name}' rules", "items": items})
        value: dict[str, Any] = {"description": f"{self.summary}\n\nExample: {self.example}"}
        example = yaml.safe_load(self.example)
        if isinstance(example, dict) and self.name in example:
            value["examples"] = [example[self.name]]
        if len(forms) == 1:
            value.update(forms[0])
        else:
            value["anyOf"] = forms
        return value

    def schema_rule(self) -> dict[str, Any]:
        """JSON Schema of a rule holding this op (the op key plus the common fields)."""
        props: dict[str, Any] = {self.name: {"$ref": f"#/$defs/{self.name}"}}
        for name, f in COMMON.items():
            props[name] = field_schema(name, f)
        return {
            "title": self.name,
            "description": self.summary,
            "type": "object",
            "properties": props,
            "required": [self.name],
            "additionalProperties": False,
        }

    def schema(self) -> dict[str, dict[str, Any]]:
        """This op's ``$defs`` entries in the spec schema."""
        return {f"rule_{self.name}": self.schema_rule(), self.name: self.schema_value(), f"op_{self.name}": self.schema_mapping()}


REGISTRY: dict[str, Op[Any]] = {}

OpClass = TypeVar("OpClass", bound=type[Op[Any]])


def register(cls: OpClass) -> OpClass:
    """Class decorator: add the op to :data:`REGISTRY` under its ``name``."""
    REGISTRY[cls.name] = cls()
    return cls


__all__ = [
    "COMMON",
    "Ctx",
    "Gathered",
    "LintFact",
    "Op",
    "REGISTRY",
    "int_or_none",
    "norm_dim",
    "permute_node",
    "register",
    "shape_facts",
]
