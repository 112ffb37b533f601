"""plan: compile a spec against a checkpoint's metadata into one recipe per output tensor.

Rules run in order over a table of current keys. Each rule matches keys by its source
pattern, and replaces what it consumed with what it produces. Every check happens here,
before a single tensor byte is read:

* a rule that matches nothing is an error (``optional: true`` makes it a report line);
* a rule writing one key twice, or writing a key that already exists, is an error;
* shape arithmetic (split divides, merge agrees, reshape preserves size, slice fits)
  is done by each op's ``plan``;
* with ``strict: true``, a source key that no rule touched is an error.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import PlanError, SpecError
from .guards import holds
from .meta import Node, TensorMeta
from .ops import REGISTRY, Ctx
from .spec import Rule, Spec


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, its recipe, and the rule that last produced it."""

    name: str
    node: Node
    rule: Rule | None = None  # None: passed through untouched
    tie: int | None = None  # outputs with the same tie id are one tensor

    @property
    def meta(self) -> TensorMeta:
        return TensorMeta(self.name, self.node.shape, self.node.dtype)


@dataclass(frozen=True)
class Check:
    """An ``assume:`` fact to verify before writing: ``key`` equals ``other`` (or ``value``).

    ``verified`` is set when metadata already proves it (one storage in the source); otherwise
    :func:`statemap.verify.run_checks` compares the bytes.
    """

    rule: Rule
    key: str
    node: Node
    other: str = ""
    other_node: Node | None = None
    value: float | None = None
    verified: str = ""  # "" = still to verify by reading; else how it was proven

    def describe(self) -> str:
        what = f"{self.key} == {self.other}" if self.other else f"{self.key} all == {self.value:g}"
        return f"{what} ({self.rule.loc})"


@dataclass(frozen=True)
class Plan:
    """The compiled conversion: what will be written, and how every source key was used."""

    spec: Spec
    source: tuple[TensorMeta, ...]
    outputs: tuple[PlannedTensor, ...]
    passthrough: tuple[str, ...] = ()  # source keys no rule touched (copied unchanged)
    dropped: tuple[tuple[str, str], ...] = ()  # (key, rule label)
    unmatched: tuple[Rule, ...] = ()  # optional rules that matched nothing
    matches: tuple[tuple[int, int], ...] = ()  # (rule index, keys matched)
    ties: tuple[tuple[str, ...], ...] = field(default=())
    checks: tuple[Check, ...] = ()  # assume: facts, verified from metadata or before writing
    not_met: tuple[Rule, ...] = ()  # rules that matched keys whose `when:` held for none

    @property
    def output_metas(self) -> list[TensorMeta]:
        return [o.meta for o in self.outputs]

    def __len__(self) -> int:
        return len(self.outputs)


@dataclass
class _Entry:
    node: Node
    rule: Rule | None
    touched: bool
    tie: int | None = None


def make_plan(spec: Spec, source: Iterable[TensorMeta], ties: Iterable[Iterable[str]] = ()) -> Plan:
    """Compile ``spec`` against source metadata. Raises :class:`PlanError` on any mismatch.

    ``ties``: groups of source keys that are one tensor in the source (same storage), as
    :meth:`Checkpoint.tied_groups` finds them; ``when: {tied_to: ...}`` and ``assume:`` use them.

    Example::

        >>> from statemap import load_spec, TensorMeta
        >>> spec = load_spec("name: t\\nversion: 1\\nrules:\\n  - rename: 'a.{i}.w -> b.{i}.w'\\n")
        >>> plan = make_plan(spec, [TensorMeta("a.0.w", (2, 3), "float32")])
        >>> [o.name for o in plan.outputs]
        ['b.0.w']
    """
    metas = tuple(source)
    table: dict[str, _Entry] = {m.name: _Entry(Node("source", m.shape, m.dtype, (), (m.name,)), None, False) for m in metas}
    if not table:
        raise PlanError("the checkpoint has no tensors to map")
    vars_ = spec.var_dict
    dropped: list[tuple[str, str]] = []
    unmatched: list[Rule] = []
    matches: list[tuple[int, int]] = []
    n_ties = 0
    group_of: dict[str, int] = {k: i for i, g in enumerate(ties) for k in g}
    checks: list[Check] = []
    not_met: list[Rule] = []

    def lookup(k: str) -> Node | None:
        e = table.get(k)
        return None if e is None else e.node

    def same_tensor(a: str, b: str) -> bool:
        """Both keys still hold an untransformed source tensor, and those are one storage."""
        na, nb = lookup(a), lookup(b)
        if na is None or nb is None or na.kind != "source" or nb.kind != "source":
            return False
        sa, sb = na.args[0], nb.args[0]
        return sa == sb or (sa in group_of and group_of.get(sa) == group_of.get(sb))

    def admits(rule: Rule, key: str | None, env: dict[str, Any]) -> bool:
        node = lookup(key) if key is not None else None
        try:
            return all(holds(c, key, node.dtype if node else None, env, lambda k: k in table, same_tensor) for c in rule.when)
        except SpecError as e:
            raise PlanError(f"{rule.where()}'when': {e}") from None

    def assumptions(rule: Rule, key: str, env: dict[str, Any]) -> None:
        node = table[key].node
        for a in rule.assume:
            if a.kind == "value":
                checks.append(Check(rule, key, node, value=float(a.arg)))
                continue
            other = _fill(a.arg, env, rule)
            on = lookup(other)
            if on is None:
                raise PlanError(f"{rule.where()}assumes {key!r} equals {other!r}, which does not exist at this point")
            if on.shape != node.shape or on.dtype != node.dtype:
                raise PlanError(
                    f"{rule.where()}assumes {key!r} equals {other!r}, but {key!r} is {list(node.shape)} {node.dtype} "
                    f"and {other!r} is {list(on.shape)} {on.dtype}"
                )
            proven = "one storage in the source" if same_tensor(key, other) else ""
            checks.append(Check(rule, key, node, other, on, verified=proven))

    for rule in spec.rules:
        op = REGISTRY[rule.op]
        p = rule.p

        if op.n_sources == "0" and not rule.sources:
            if not admits(rule, None, dict(vars_)):
                not_met.append(rule)
                continue
            ctx = Ctx(rule, dict(vars_), lookup)
            names = [_fill(t, ctx.env, rule) for t in rule.targets]
            nodes = op.plan([], names, p, ctx)
            for name, node in zip(names, nodes):
                if name in table:
                    raise PlanError(
                        f"{rule.where()}writes {name!r}, which already exists ({_origin(table[name])}); drop or rename it first"
                    )
                table[name] = _Entry(node, rule, True)
            matches.append((rule.index, 1))
            continue

        found = [(k, caps) for k in table if (caps := rule.sources[0].match(k)) is not None]
        matches.append((rule.index, len(found)))
        if not found:
            if rule.optional:
                unmatched.append(rule)
                continue
            raise PlanError(
                f"{rule.where()}matched no key{_closest(str(rule.sources[0]), table)}; mark it 'optional: true' if that is expected"
            )

        replacements: dict[str, list[tuple[str, Node]]] = {}
        consumed: set[str] = set()
        produced: dict[str, str] = {}
        rule_ties: list[list[str]] = []
        kept: set[str] = set()
        admitted = 0
        for key, caps in found:
            if key in consumed:
                continue
            env = {**vars_, **caps}
            if rule.when and not admits(rule, key, env):
                continue
            admitted += 1
            assumptions(rule, key, env)
            ctx = Ctx(rule, env, lookup, key)
            inputs = [key]
            for extra in rule.sources[1:]:
                k2 = _fill(extra, env, rule)
                if k2 not in table:
                    raise PlanError(f"{rule.where()}matched {key!r} but {k2!r} is not present{_closest(k2, table)}")
                if k2 in consumed or k2 in inputs:
                    raise PlanError(f"{rule.where()}{k2!r} is used twice")
                inputs.append(k2)
            names = [_fill(t, env, rule) for t in rule.targets]
            nodes = op.plan([table[k].node for k in inputs], names, p, ctx)
            assert len(nodes) == len(names), (rule.op, names, nodes)
            for name in names:
                if name in produced:
                    raise PlanError(f"{rule.where()}writes {name!r} twice (from {produced[name]!r} and {key!r})")
                produced[name] = key
            if op.keeps_sources:  # e.g. inject with `for`: the matched key stays as it is
                replacements[key] = [(key, table[key].node), *zip(names, nodes)]
                kept.add(key)
            else:
                consumed.update(inputs)
                replacements[key] = list(zip(names, nodes))
            if op.ties and len(names) > 1:
                rule_ties.append(names)
            if not names:
                dropped.append((key, rule.label))
        if not admitted:
            not_met.append(rule)
            continue

        tie_of: dict[str, int] = {}
        for group in rule_ties:
            n_ties += 1
            for name in group:
                tie_of[name] = n_ties
        rebuilt: dict[str, _Entry] = {}
        for k, e in table.items():
            if k in replacements:
                for name, node in replacements[k]:
                    rebuilt[name] = e if (name == k and k in kept) else _Entry(node, rule, True, tie_of.get(name))
            elif k not in consumed:
                if k in produced:
                    raise PlanError(
                        f"{rule.where()}writes {k!r}, which already exists ({_origin(e)}); "
                        "two rules write one key: rename or drop the existing one first"
                    )
                rebuilt[k] = e
        table.clear()
        table.update(rebuilt)

    passthrough = tuple(k for k, e in table.items() if not e.touched)
    if spec.strict and passthrough:
        from .report import fold_names

        listing = "; ".join(fold_names(passthrough)[:12])
        raise PlanError(
            f"{spec.path}: strict spec {spec.name!r}: {len(passthrough)} source key(s) not accounted for "
            f"by any rule: {listing}. Add rules for them, or list them under 'keep:' or 'drop:'"
        )
    outputs = tuple(PlannedTensor(k, e.node, e.rule, e.tie) for k, e in table.items())
    out_ties: dict[int, list[str]] = {}
    for o in outputs:
        if o.tie is not None:
            out_ties.setdefault(o.tie, []).append(o.name)
    return Plan(
        spec,
        metas,
        outputs,
        passthrough,
        tuple(dropped),
        tuple(unmatched),
        tuple(matches),
        tuple(tuple(g) for g in out_ties.values() if len(g) > 1),
        tuple(checks),
        tuple(not_met),
    )


def _fill(t: Any, env: dict[str, Any], rule: Rule) -> str:
    try:
        return t.fill(env)
    except SpecError as e:
        raise PlanError(f"{rule.where()}{e}") from None


def _origin(e: _Entry) -> str:
    if e.rule is None:
        return "a source key no rule has consumed yet"
    return f"written by {e.rule.label} at {e.rule.loc}"


def _closest(name: str, table: dict[str, Any]) -> str:
    keys = list(table)
    close = difflib.get_close_matches(name, keys, n=3, cutoff=0.5)
    if close:
        return f" (closest keys: {', '.join(close)})"
    return f" ({len(keys)} keys, e.g. {', '.join(keys[:3])})" if keys else ""
