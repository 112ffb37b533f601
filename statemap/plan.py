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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import PlanError, SpecError
from .gcpause import paused
from .guards import holds
from .meta import Node, TensorMeta
from .ops import REGISTRY, Ctx
from .rules import Rule
from .spec import Spec
from .template import Cap, Pattern, Template


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, its recipe, and the rule that last produced it."""

    name: str
    node: Node
    rule: Rule | None = None  # None: passed through untouched
    tie: int | None = None  # outputs with the same tie id are one tensor

    @property
    def meta(self) -> TensorMeta:  # built once, on first use (a dry run of 200k keys asks several times)
        got = self.__dict__.get("_meta")
        if got is None:
            got = self.__dict__["_meta"] = TensorMeta(self.name, self.node.shape, self.node.dtype)
        return got


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
    why: str = ""  # "" = an `assume:`; "replica" = a `merge ... mode: same`

    def describe(self) -> str:
        what = f"{self.key} == {self.other}" if self.other else f"{self.key} all == {self.value:g}"
        if self.why:
            what += f" ({self.why})"
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
    source_ties: tuple[tuple[str, ...], ...] = ()  # source keys stored as one tensor
    dropped_metas: tuple[TensorMeta, ...] = ()  # shape and dtype of each dropped key, as it was dropped

    @property
    def same(self) -> tuple[tuple[str, ...], ...]:
        """Groups of outputs that are one tensor's bytes (a `tie`, a `copy` or rename of one
        untransformed source tensor, or source keys stored as one tensor), in output order:
        ``tied: dedupe`` writes the first name of each group only."""
        return _same_bytes(self.outputs, {k: i for i, g in enumerate(self.source_ties) for k in g})

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
    with paused():  # the planner allocates many small, long-lived objects: collecting them while
        return _make_plan(spec, source, ties)  # they are being built costs time that grows with the key count


def _make_plan(spec: Spec, source: Iterable[TensorMeta], ties: Iterable[Iterable[str]]) -> Plan:
    metas = tuple(source)
    ties = [tuple(g) for g in ties]
    table: dict[str, _Entry] = {m.name: _Entry(Node("source", m.shape, m.dtype, (), (m.name,)), None, False) for m in metas}
    if not table:
        raise PlanError("the checkpoint has no tensors to map")
    pos: dict[str, tuple[int, ...]] = {k: (i,) for i, k in enumerate(table)}
    top = len(pos)
    dirty = False  # True once `table`'s iteration order may differ from `pos` order
    vars_ = spec.var_dict
    dropped: list[tuple[str, str]] = []
    unmatched: list[Rule] = []
    matches: list[tuple[int, int]] = []
    n_ties = 0
    group_of: dict[str, int] = {k: i for i, g in enumerate(ties) for k in g}
    checks: list[Check] = []
    not_met: list[Rule] = []
    dropped_metas: list[TensorMeta] = []

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
            equal(rule, key, _fill(a.arg, env, rule))

    def equal(rule: Rule, key: str, other: str, why: str = "") -> None:
        node = table[key].node
        on = lookup(other)
        if on is None:
            raise PlanError(f"{rule.where()}assumes {key!r} equals {other!r}, which does not exist at this point")
        if on.shape != node.shape or on.dtype != node.dtype:
            raise PlanError(
                f"{rule.where()}assumes {key!r} equals {other!r}, but {key!r} is {list(node.shape)} {node.dtype} "
                f"and {other!r} is {list(on.shape)} {on.dtype}"
            )
        proven = "one storage in the source" if same_tensor(key, other) else ""
        checks.append(Check(rule, key, node, other, on, verified=proven, why=why))

    for rule in spec.rules:
        op = REGISTRY[rule.op]
        p = op.params(rule)

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
                pos[name] = (top,)
                top += 1
            matches.append((rule.index, 1))
            continue

        found = _find(rule.sources[0], table)
        if dirty and len(found) > 1:
            found.sort(key=lambda kc: pos[kc[0]])
        matches.append((rule.index, len(found)))
        if not found:
            if rule.optional:
                unmatched.append(rule)
                continue
            raise PlanError(
                f"{rule.where()}matched no key{_closest(str(rule.sources[0]), table, pos)}; mark it 'optional: true' if that is expected"
            )

        replacements: dict[str, list[tuple[str, Node]]] = {}
        consumed: set[str] = set()
        produced: dict[str, str] = {}
        rule_ties: list[list[str]] = []
        kept: set[str] = set()
        admitted = 0
        if op.moves_only and len(rule.sources) == 1 and len(rule.targets) == 1 and not rule.when and not rule.assume:
            # the common case, without the general loop's per-key machinery (same result)
            fill = _filler(rule.targets[0], rule)
            for key, caps in found:
                name = fill({**vars_, **caps} if vars_ else caps)
                if name in produced:
                    raise PlanError(f"{rule.where()}writes {name!r} twice (from {produced[name]!r} and {key!r})")
                produced[name] = key
            # each key moves with its entry (re-labelled in place, as a new entry would be); same order
            clash = [k for k in produced if k in table]
            if clash:
                moving = set(produced.values())
                clash = [k for k in clash if k not in moving]
            if clash:
                k = min(clash, key=pos.__getitem__)
                raise PlanError(
                    f"{rule.where()}writes {k!r}, which already exists ({_origin(table[k])}); "
                    "two rules write one key: rename or drop the existing one first"
                )
            moved = [(name, table.pop(key), pos.pop(key)) for name, key in produced.items()]
            for name, e, at in moved:
                e.rule, e.touched, e.tie = rule, True, None
                table[name] = e
                pos[name] = at
            dirty = True
            continue
        for key, caps, members in op.gather(rule, found, p) if found else ():
            if key in consumed:
                continue
            env = {**vars_, **caps} if vars_ else caps
            if rule.when and not admits(rule, key, env):
                continue
            admitted += 1
            if rule.assume:
                assumptions(rule, key, env)
            inputs = [key, *members]
            for extra in rule.sources[1:]:
                k2 = _fill(extra, env, rule)
                if k2 not in table:
                    raise PlanError(f"{rule.where()}matched {key!r} but {k2!r} is not present{_closest(k2, table, pos)}")
                if k2 in consumed or k2 in inputs:
                    raise PlanError(f"{rule.where()}{k2!r} is used twice")
                inputs.append(k2)
            ctx = Ctx(rule, env, lookup, key, tuple(inputs))
            in_nodes = [table[k].node for k in inputs]
            names = op.target_names(rule, in_nodes, p, ctx)
            nodes = op.plan(in_nodes, names, p, ctx)
            assert len(nodes) == len(names), (rule.op, names, nodes)
            for a, b, why in ctx.equal:
                equal(rule, a, b, why)
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
            if (op.ties or ctx.tie) and len(names) > 1:
                rule_ties.append(names)
            if not names:
                dropped.append((key, rule.label))
                dropped_metas.append(TensorMeta(key, table[key].node.shape, table[key].node.dtype))
        if not admitted:
            not_met.append(rule)
            continue

        tie_of: dict[str, int] = {}
        for group in rule_ties:
            n_ties += 1
            for name in group:
                tie_of[name] = n_ties
        # update the table in place; `pos` keeps its logical order (each replacement takes the
        # place of the key it replaces), so no rule pays for the keys it did not touch
        clash = [k for k in produced if k in table and k not in replacements and k not in consumed]
        if clash:
            k = min(clash, key=pos.__getitem__)
            raise PlanError(
                f"{rule.where()}writes {k!r}, which already exists ({_origin(table[k])}); "
                "two rules write one key: rename or drop the existing one first"
            )
        new: list[tuple[str, _Entry, tuple[int, ...]]] = []
        for k, reps in replacements.items():
            base = pos[k]
            if len(reps) == 1 and k not in kept:
                name, node = reps[0]
                new.append((name, _Entry(node, rule, True, tie_of.get(name)), base))
                continue
            e = table[k]
            for j, (name, node) in enumerate(reps):
                if name == k and k in kept:
                    new.append((name, e, base))
                else:
                    new.append((name, _Entry(node, rule, True, tie_of.get(name)), (*base, j)))
        for k in consumed:
            del table[k]
            del pos[k]
        for name, entry, at in new:
            table[name] = entry
            pos[name] = at
        dirty = True

    if dirty:
        ordered = sorted(table.items(), key=lambda kv: pos[kv[0]])
        table.clear()
        table.update(ordered)
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
        tuple(tuple(g) for g in ties),
        dropped_metas=tuple(dropped_metas),
    )


def _same_bytes(outputs: tuple[PlannedTensor, ...], group_of: dict[str, int]) -> tuple[tuple[str, ...], ...]:
    """Outputs holding identical bytes by construction, grouped in output order."""
    by: dict[tuple[str, object], list[str]] = {}
    for o in outputs:
        n = o.node
        if n.kind == "source":
            ident: tuple[str, object] = ("source", group_of.get(n.args[0], n.args[0]))
        elif o.tie is not None:
            ident = ("tie", o.tie)
        else:
            ident = ("node", id(n))
        by.setdefault(ident, []).append(o.name)
    return tuple(tuple(g) for g in by.values() if len(g) > 1)


def _filler(t: Template, rule: Rule) -> Callable[[dict[str, Any]], str]:
    """``t.fill`` as a %-format when the template holds only literal text and bare names
    (the usual case); anything else, and every error, goes through ``t.fill``."""
    fmt: list[str] = []
    names: list[str] = []
    for kind, value in t.parts:
        if kind == "lit":
            fmt.append(str(value).replace("%", "%%"))
        elif isinstance(value, str):
            fmt.append("%s")
            names.append(value)
        else:
            return lambda env: _fill(t, env, rule)
    f = "".join(fmt)

    def fill(env: dict[str, Any]) -> str:
        try:
            return f % tuple([env[n] for n in names])
        except KeyError:
            return _fill(t, env, rule)

    return fill


_LITERALS: dict[str, tuple[str, str, tuple[str, ...], bool] | None] = {}


def _literals(pattern: Pattern) -> tuple[str, str, tuple[str, ...], bool] | None:
    """What every key a template pattern matches must contain: (prefix, suffix, inner literal
    parts, whether the pattern is one literal key); None for a ``re:`` pattern."""
    text = str(pattern)
    if text in _LITERALS:
        return _LITERALS[text]
    got: tuple[str, str, tuple[str, ...], bool] | None = None
    if not pattern.is_regex:
        parts = pattern.parts
        lits = [p.text for p in parts if not isinstance(p, Cap)]
        if not pattern.captures:
            got = ("".join(lits), "", (), True)
        else:
            pre = parts[0].text if not isinstance(parts[0], Cap) else ""
            suf = parts[-1].text if not isinstance(parts[-1], Cap) else ""
            inner = tuple(p.text for i, p in enumerate(parts) if not isinstance(p, Cap) and 0 < i < len(parts) - 1)
            got = (pre, suf, inner, False)
    _LITERALS[text] = got
    return got


def _find(pattern: Pattern, table: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """Keys of ``table`` (in order) that ``pattern`` matches, with their captures. The regex
    runs only on keys that hold the pattern's literal parts (a cheap necessary condition)."""
    match = pattern.match
    lits = _literals(pattern)
    if lits is None:
        return [(k, caps) for k in table if (caps := match(k)) is not None]
    pre, suf, inner, exact = lits
    if exact:
        return [(pre, caps)] if pre in table and (caps := match(pre)) is not None else []
    # keys often share their first segments: the longest inner or final literal part is the
    # selective test (the regex checks everything)
    part = max((*inner, suf), key=len)
    if len(part) <= 1:
        return [(k, caps) for k in table if k.startswith(pre) and (caps := match(k)) is not None]
    return [(k, caps) for k in table if part in k and (caps := match(k)) is not None]


def _fill(t: Any, env: dict[str, Any], rule: Rule) -> str:
    try:
        return t.fill(env)
    except SpecError as e:
        raise PlanError(f"{rule.where()}{e}") from None


def _origin(e: _Entry) -> str:
    if e.rule is None:
        return "a source key no rule has consumed yet"
    return f"written by {e.rule.label} at {e.rule.loc}"


def _closest(name: str, table: dict[str, Any], pos: dict[str, tuple[int, ...]]) -> str:
    keys = sorted(table, key=pos.__getitem__)
    close = difflib.get_close_matches(name, keys, n=3, cutoff=0.5)
    if close:
        return f" (closest keys: {', '.join(close)})"
    return f" ({len(keys)} keys, e.g. {', '.join(keys[:3])})" if keys else ""
