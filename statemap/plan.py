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
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from .errors import AssumptionError, PlanError, SpecError
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

    def __init__(self, name: str, node: Node, rule: Rule | None = None, tie: int | None = None) -> None:
        d = self.__dict__  # the generated __init__ without a setattr call per field (one per output)
        d["name"] = name
        d["node"] = node
        d["rule"] = rule
        d["tie"] = tie

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
    """The compiled conversion: what will be written, and how every source key was used.

    ``source`` and ``outputs`` are sequences (for a large checkpoint, each item is built when
    first read: a dry run of 200k keys reads only the count and the names)."""

    spec: Spec
    source: Sequence[TensorMeta]
    outputs: Sequence[PlannedTensor]  # a tuple, or an _Outputs sequence (each built when first read)
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
    def output_metas(self) -> Sequence[TensorMeta]:
        if isinstance(self.outputs, _Outputs):
            return self.outputs.metas()
        return [o.meta for o in self.outputs]

    def __len__(self) -> int:
        return len(self.outputs)


@dataclass
class _Entry:
    node: Node
    rule: Rule | None
    touched: bool
    tie: int | None = None


# A table entry is an _Entry; ``None``: the source key of that name, untouched; or ``(source key,
# rule)``: that source key's tensor untouched, moved here by the rule. None and the tuple cost no
# Node per key; :func:`_make_plan`'s ``entry`` turns one into an _Entry when a rule needs its node.
_Lazy = tuple


def _pos_key(p: Any) -> tuple[int, ...]:
    """A table position: an int (a source key's index, or a new key's) stands for ``(int,)``."""
    return (p,) if type(p) is int else p


T = TypeVar("T")


class _Computed(Sequence[T]):
    """A read-only sequence of ``n`` items, item ``i`` being ``at(i)``, made when read (``each``:
    all of them in order, when that is faster than ``at`` per index). Equal to any sequence of equal
    items, like a tuple; not hashable."""

    def __init__(self, n: int, at: Callable[[int], T], each: Callable[[], Iterator[T]] | None = None) -> None:
        self._n, self._at, self._each = n, at, each

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[T]: ...
    def __getitem__(self, i: int | slice) -> T | Sequence[T]:
        if isinstance(i, slice):
            return [self._at(j) for j in range(self._n)[i]]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("index out of range")
        return self._at(i)

    def __iter__(self) -> Iterator[T]:
        return self._each() if self._each is not None else map(self._at, range(self._n))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _source_metas(names: list[str], metas: Any) -> Sequence[TensorMeta]:
    """``Plan.source`` over a checkpoint's metadata mapping, each TensorMeta built when read."""
    return _Computed(len(names), lambda i: metas[names[i]], lambda: map(metas.__getitem__, names))


def _pairs(names: list[str], sources: list[str], rules: list[Rule | None]) -> Sequence[tuple[str, Any]]:
    """``(name, (source key, rule))`` for each output of a renames-only plan, made when read
    (``rules[i]``: the rule that last moved key ``i``, None if none did)."""
    return _Computed(
        len(names),
        lambda i: (names[i], (sources[i], rules[i])),
        lambda: zip(names, zip(sources, rules)),
    )


class _Outputs(_Computed[PlannedTensor]):
    """``Plan.outputs``: the planner's final table, each PlannedTensor built when first read
    (a dry run of 200k keys reads only the count and the names)."""

    def __init__(self, items: Sequence[tuple[str, Any]], source_node: Callable[[str], Node]) -> None:
        self._items = items
        self._source_node = source_node
        self._built: list[PlannedTensor | None] = [None] * len(items)
        super().__init__(len(items), self._build)

    def _build(self, i: int) -> PlannedTensor:
        got = self._built[i]
        if got is None:
            name, e = self._items[i]
            if e is None:
                got = PlannedTensor(name, self._source_node(name), None, None)
            elif type(e) is _Lazy:
                got = PlannedTensor(name, self._source_node(e[0]), e[1], None)
            else:
                got = PlannedTensor(name, e.node, e.rule, e.tie)
            self._built[i] = got
        return got

    def metas(self) -> Sequence[TensorMeta]:
        """``Plan.output_metas``: each TensorMeta built when read."""
        return _Computed(len(self), lambda i: self._build(i).meta, lambda: (o.meta for o in self))


def shape_holds(rule: Rule, key: str, shape: tuple[int, ...], a: Any, ctx: Ctx) -> None:
    """``assume: {shape: [...]}``: ``key``'s shape (metadata) is the one the rule states; raises
    :class:`PlanError` with both shapes and what each dim was computed from."""
    want = [None if e[0] == "any" else ctx.shape((e,))[0] for e in a.arg]
    if len(want) == len(shape) and all(w is None or w == s for w, s in zip(want, shape)):
        return
    stated = ", ".join("*" if w is None else str(w) for w in want)
    note = f" (note: {rule.note})" if rule.note else ""
    raise AssumptionError(f"{rule.where()}assumes {key!r} has shape [{stated}] ({a.text}), but it is {list(shape)}{note}")


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


def _source_table(
    source: Iterable[TensorMeta],
) -> tuple[Sequence[TensorMeta], list[str], Callable[[str], TensorMeta], set[str] | None]:
    """(Plan.source, the source keys in order (first of a repeated name), name -> its meta, the
    set of the keys when one was built)."""
    from .load.checkpoint import columns_of

    view: Any = getattr(source, "_mapping", None)  # a checkpoint's `metas.values()`
    cols = columns_of(view) if view is not None else None
    if cols is not None:  # a large index held as columns: no TensorMeta per key until one is read
        return _source_metas(cols.names, view), cols.names, view.__getitem__, None
    metas = tuple(source)
    names = list(map(operator.attrgetter("name"), metas))
    by_name: dict[str, TensorMeta] = {}

    def meta_of(name: str) -> TensorMeta:  # a repeated name: the last one, as the table always took
        if not by_name:
            by_name.update(zip(names, metas))
        return by_name[name]

    unique = set(names)
    if len(unique) != len(names):  # a repeated name: each once, where it first appeared
        names = list(dict.fromkeys(names))
    return metas, names, meta_of, unique


def _make_plan(spec: Spec, source: Iterable[TensorMeta], ties: Iterable[Iterable[str]]) -> Plan:
    metas, names, meta_of, unique = _source_table(source)
    groups = [tuple(g) for g in ties]
    renamed = _renames_only(spec, metas, names, meta_of, groups)
    if renamed is not None:
        return renamed
    table: dict[str, Any] = dict.fromkeys(names)
    if not table:
        raise PlanError("the checkpoint has no tensors to map")
    pos: dict[str, Any] = dict(zip(table, range(len(table))))  # int i stands for (i,): see _pos_key
    top = len(pos)
    dirty = False  # True once `table`'s iteration order may differ from `pos` order
    tuple_pos = False  # True once a position is a tuple (so `pos.__getitem__` alone cannot sort)
    vars_ = spec.var_dict
    dropped: list[tuple[str, str]] = []
    unmatched: list[Rule] = []
    matches: list[tuple[int, int]] = []
    n_ties = 0
    group_of: dict[str, int] = {k: i for i, g in enumerate(groups) for k in g}
    checks: list[Check] = []
    not_met: list[Rule] = []
    dropped_metas: list[TensorMeta] = []

    def source_node(src: str) -> Node:
        m = meta_of(src)
        return Node("source", m.shape, m.dtype, (), (src,))

    def entry(k: str) -> _Entry:
        """The table's entry for ``k`` as an _Entry (made from the tuple form on first need)."""
        e = table[k]
        if e is None:
            e = table[k] = _Entry(source_node(k), None, False)
        elif type(e) is _Lazy:
            e = table[k] = _Entry(source_node(e[0]), e[1], True)
        return e

    def lookup(k: str) -> Node | None:
        return entry(k).node if k in table else None

    def pos_of(k: str) -> tuple[int, ...]:
        return _pos_key(pos[k])

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
        node = entry(key).node
        for a in rule.assume:
            if a.kind == "value":
                checks.append(Check(rule, key, node, value=float(a.arg)))
            elif a.kind == "shape":
                shape_holds(rule, key, node.shape, a, Ctx(rule, env, lookup, key))
            else:
                equal(rule, key, _fill(a.arg, env, rule))

    def equal(rule: Rule, key: str, other: str, why: str = "") -> None:
        node = entry(key).node
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

    def no_clash(rule: Rule, new_names: Iterable[str], moving: Iterable[str]) -> None:
        """A move writes no name that a key not moving by it holds already."""
        clash = list(filter(table.__contains__, new_names))
        if clash:
            gone = set(moving)
            clash = [k for k in clash if k not in gone]
        if clash:
            k = min(clash, key=pos_of)
            raise PlanError(
                f"{rule.where()}writes {k!r}, which already exists ({_origin(table[k])}); "
                "two rules write one key: rename or drop the existing one first"
            )

    def none_matched(rule: Rule) -> None:
        """A rule whose pattern matched no key: listed when optional, else the error."""
        if not rule.optional:
            raise _matched_nothing(rule, table, pos)
        unmatched.append(rule)

    for rule in spec.rules:
        op = REGISTRY[rule.op]
        p = op.params(rule)

        if op.n_sources == "0" and not rule.sources:
            if not admits(rule, None, dict(vars_)):
                not_met.append(rule)
                continue
            ctx = Ctx(rule, dict(vars_), lookup)
            names_ = [_fill(t, ctx.env, rule) for t in rule.targets]
            nodes = op.plan([], names_, p, ctx)
            for name, node in zip(names_, nodes):
                if name in table:
                    raise PlanError(
                        f"{rule.where()}writes {name!r}, which already exists ({_origin(table[name])}); drop or rename it first"
                    )
                table[name] = _Entry(node, rule, True)
                pos[name] = top
                top += 1
            matches.append((rule.index, 1))
            continue

        simple_move = op.moves_only and len(rule.sources) == 1 and len(rule.targets) == 1 and not rule.when and not rule.assume
        if simple_move:
            got = _moves(rule.sources[0], rule.targets[0], table, vars_)
            if got is not None:  # the common case with whole-list operations (same result as below)
                keys, new_names = got
                matches.append((rule.index, len(keys)))
                if not keys:
                    none_matched(rule)
                    continue
                no_clash(rule, new_names, keys)
                vals = list(map(table.pop, keys))
                ats = list(map(pos.pop, keys))
                if vals.count(None) == len(vals):  # untouched source keys (the usual first rename)
                    vals = list(zip(keys, itertools.repeat(rule)))
                else:
                    vals = [_moved(k, v, rule) for k, v in zip(keys, vals)]
                table.update(zip(new_names, vals))
                pos.update(zip(new_names, ats))
                dirty = True
                continue

        found = _find(rule.sources[0], table)
        if dirty and len(found) > 1:
            found.sort(key=lambda kc: pos_of(kc[0]))
        matches.append((rule.index, len(found)))
        if not found:
            none_matched(rule)
            continue

        replacements: dict[str, list[tuple[str, Node]]] = {}
        consumed: set[str] = set()
        produced: dict[str, str] = {}
        rule_ties: list[list[str]] = []
        kept: set[str] = set()
        admitted = 0
        if simple_move:
            # the common case, without the general loop's per-key machinery (same result)
            fill = _filler(rule.targets[0], rule)
            for key, caps in found:
                name = fill({**vars_, **caps} if vars_ else caps)
                if name in produced:
                    raise PlanError(f"{rule.where()}writes {name!r} twice (from {produced[name]!r} and {key!r})")
                produced[name] = key
            # each key moves with its entry (re-labelled in place, as a new entry would be); same order
            no_clash(rule, produced, produced.values())
            moved = [(name, table.pop(key), pos.pop(key)) for name, key in produced.items()]
            for name, e, at in moved:
                table[name] = _moved(produced[name], e, rule)
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
            in_nodes = [entry(k).node for k in inputs]
            names_ = op.target_names(rule, in_nodes, p, ctx)
            nodes = op.plan(in_nodes, names_, p, ctx)
            assert len(nodes) == len(names_), (rule.op, names_, nodes)
            for a, b, why in ctx.equal:
                equal(rule, a, b, why)
            for name in names_:
                if name in produced:
                    raise PlanError(f"{rule.where()}writes {name!r} twice (from {produced[name]!r} and {key!r})")
                produced[name] = key
            if op.keeps_sources:  # e.g. inject with `for`: the matched key stays as it is
                replacements[key] = [(key, entry(key).node), *zip(names_, nodes)]
                kept.add(key)
            else:
                consumed.update(inputs)
                replacements[key] = list(zip(names_, nodes))
            if (op.ties or ctx.tie) and len(names_) > 1:
                rule_ties.append(names_)
            if not names_:
                dropped.append((key, rule.label))
                node = entry(key).node
                dropped_metas.append(TensorMeta(key, node.shape, node.dtype))
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
            k = min(clash, key=pos_of)
            raise PlanError(
                f"{rule.where()}writes {k!r}, which already exists ({_origin(table[k])}); "
                "two rules write one key: rename or drop the existing one first"
            )
        new: list[tuple[str, Any, Any]] = []
        for k, reps in replacements.items():
            base = pos[k]
            if len(reps) == 1 and k not in kept:
                name, node = reps[0]
                new.append((name, _Entry(node, rule, True, tie_of.get(name)), base))
                continue
            e = entry(k)
            for j, (name, node) in enumerate(reps):
                if name == k and k in kept:
                    new.append((name, e, base))
                else:
                    new.append((name, _Entry(node, rule, True, tie_of.get(name)), (*_pos_key(base), j)))
                    tuple_pos = True
        for k in consumed:
            del table[k]
            del pos[k]
        for name, ent, at in new:
            table[name] = ent
            pos[name] = at
        dirty = True

    if dirty:
        order = sorted(table, key=pos.__getitem__ if not tuple_pos else pos_of)
        items = list(zip(order, map(table.__getitem__, order)))
    else:
        items = list(table.items())
    passthrough = tuple(k for k, e in items if e is None or (type(e) is _Entry and not e.touched))
    if spec.strict and passthrough:
        from .report import fold_names

        listing = "; ".join(fold_names(passthrough)[:12])
        raise PlanError(
            f"{spec.path}: strict spec {spec.name!r}: {len(passthrough)} source key(s) not accounted for "
            f"by any rule: {listing}. Add rules for them, or list them under 'keep:' or 'drop:'"
        )
    outputs = _Outputs(items, source_node)
    out_ties: dict[int, list[str]] = {}
    if n_ties:
        for k, e in items:
            if type(e) is _Entry and e.tie is not None:
                out_ties.setdefault(e.tie, []).append(k)
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
        tuple(groups),
        dropped_metas=tuple(dropped_metas),
    )


def _renames_only(
    spec: Spec,
    metas: Sequence[TensorMeta],
    names: list[str],
    meta_of: Callable[[str], TensorMeta],
    ties: list[tuple[str, ...]],
) -> Plan | None:
    """The plan of a spec whose rules only rename (each a ``rename`` of one pattern to one
    template of its captures, no ``when`` / ``assume``), over the current names joined by
    newlines in source order (where every output stays): each rule splits that text at its
    keys with one regex and joins it back with each key's captures in its target's slots (no
    string per new name; each key's position, for the rule that moved it, from the newlines
    between keys). None whenever anything else is needed (another op, a var
    in a target, a key or literal with a newline, a rule matching nothing that is not optional,
    a name given twice, a strict spec with keys left): :func:`_make_plan`'s general table then
    plans it, and names any problem. Same result as the general table: its renames move entries
    and keep their positions.

    Repeats are checked once, on the final names: a rule that gives two keys one name, or a name
    that exists already, leaves two equal names, and every later rule keeps them equal (a regex
    renames equal names alike; a literal rule declines a name it finds twice), so the final
    names repeat exactly when some rule would have written a key twice."""
    if not names or spec.strict:
        return None
    steps = []
    for rule in spec.rules:
        op = REGISTRY[rule.op]
        if not (op.moves_only and len(rule.sources) == 1 and len(rule.targets) == 1 and not rule.when and not rule.assume):
            return None
        pattern, fmt = rule.sources[0], _format_of(rule.targets[0])
        if fmt is None or "\n" in fmt[0] or pattern.is_regex or any(n not in pattern.captures for n in fmt[1]):
            return None
        if pattern.captures:
            rx = _joined(pattern, key=False)
            if rx is None:
                return None
        else:
            rx = None
        steps.append((rule, pattern, fmt, rx))
    joined = "\n".join(["", *names, ""])  # each current name between newlines, in source order
    if joined.count("\n") != len(names) + 1:
        return None  # a key holds a newline
    rule_at: list[Rule | None] = [None] * len(names)  # the rule that last moved each key (None: none did)
    matches: list[tuple[int, int]] = []
    unmatched: list[Rule] = []
    for rule, pattern, (text, _), rx in steps:
        n = 0
        if rx is None:  # one literal key
            lits = _literals(pattern)
            assert lits is not None
            line = f"\n{lits[0]}\n"
            at = joined.find(line)
            if at >= 0:
                if joined.find(line, at + 1) >= 0:
                    return None  # the name repeats (a rule before wrote a key twice)
                rule_at[joined.count("\n", 0, at)] = rule
                joined = f"{joined[: at + 1]}{text % ()}{joined[at + len(line) - 1 :]}"
                n = 1
        else:
            # [text before the first key, its captures..., text between it and the next key, ...]
            parts = rx.split(joined)
            stride = 1 + len(pattern.captures)
            n = len(parts) // stride
            if n:
                between = parts[0::stride]
                _mark_moved(rule_at, between, n, rule)
                # the text again, each key replaced by the target filled with its captures
                slots = _slots(rule.targets[0], list(pattern.captures))
                step = 1 + len(slots)
                out: list[str] = [""] * (n * step + 1)
                out[0::step] = between
                for j, slot in enumerate(slots):
                    out[1 + j :: step] = [slot] * n if isinstance(slot, str) else parts[1 + slot :: stride]
                joined = "".join(out)
        matches.append((rule.index, n))
        if not n:
            if not rule.optional:
                return None
            unmatched.append(rule)
    cur = joined.split("\n")[1:-1]  # the current name of each source key, in source order
    if len(set(cur)) != len(cur):
        return None  # some rule wrote a key twice: the general table names it

    def source_node(src: str) -> Node:
        m = meta_of(src)
        return Node("source", m.shape, m.dtype, (), (src,))

    items: Sequence[tuple[str, Any]] = _pairs(cur, names, rule_at)
    passthrough = tuple(itertools.compress(cur, map(operator.is_, rule_at, itertools.repeat(None))))
    return Plan(
        spec,
        metas,
        _Outputs(items, source_node),
        passthrough,
        (),
        tuple(unmatched),
        tuple(matches),
        (),
        (),
        (),
        tuple(tuple(g) for g in ties),
    )


def _moved(key: str, e: Any, rule: Rule) -> Any:
    """Entry ``e`` of ``key`` moved by ``rule`` (re-labelled in place, as a new entry would be)."""
    if e is None:
        return (key, rule)
    if type(e) is _Lazy:
        return (e[0], rule)
    e.rule, e.touched, e.tie = rule, True, None
    return e


def _moves(
    pattern: Pattern, target: Template, table: dict[str, Any], vars_: dict[str, Any]
) -> tuple[list[str], list[str]] | None:
    """A rename's matched keys and their new names, found and filled with whole-list operations
    (one regex over the keys joined by newlines, one %-format per key through ``map``); None when
    that does not apply (a literal or ``re:`` pattern, a key holding a newline, a target using a
    var or an expression, or two keys given one name: the per-key path then reports it)."""
    if pattern.is_regex or not pattern.captures:
        return None
    rx = _joined(pattern)
    fmt = _format_of(target)
    if rx is None or fmt is None:
        return None
    text, used = fmt
    if not used or any(n not in pattern.captures for n in used):
        return None
    keys = list(table)
    joined = "\n".join(keys)
    if joined.count("\n") != len(keys) - 1:
        return None  # a key holds a newline
    found = rx.findall("\n" + joined + "\n")
    if not found:
        return [], []
    caps = list(pattern.captures)
    get = operator.itemgetter(*[1 + caps.index(n) for n in used])
    new_names = list(map(text.__mod__, map(get, found)))  # one name: a str, which % takes as itself
    if len(set(new_names)) != len(new_names):
        return None  # the per-key path names the two keys
    return list(map(operator.itemgetter(0), found)), new_names


_JOINED: dict[tuple[str, bool], Any] = {}


def _joined(pattern: Pattern, key: bool = True) -> Any:
    """:func:`statemap.keymatch.joined_regex` of ``pattern`` (``key=False``: without the key's group)."""
    from .keymatch import joined_regex

    text = str(pattern)
    if (text, key) not in _JOINED:
        parts = [("lit", x.text) if not isinstance(x, Cap) else ("cap", x.name, x.kind) for x in pattern.parts]
        _JOINED[(text, key)] = (
            joined_regex(parts, key=key) if len(set(pattern.captures)) == sum(isinstance(x, Cap) for x in pattern.parts) else None
        )
    return _JOINED[(text, key)]


def _matched_nothing(rule: Rule, table: dict[str, Any], pos: dict[str, Any]) -> PlanError:
    """The error of a rule (not optional) whose pattern matched no current key, with the closest keys."""
    return PlanError(
        f"{rule.where()}matched no key{_closest(str(rule.sources[0]), table, pos)}; mark it 'optional: true' if that is expected"
    )


def _mark_moved(rule_at: list[Rule | None], between: list[str], n: int, rule: Rule) -> None:
    """Set ``rule_at`` to ``rule`` on the lines of the ``n`` keys a regex split found, ``between[i]``
    being the text before key ``i`` (its lines: its newlines). Keys with nothing between them are
    on consecutive lines: one slice per run of them."""
    lines = 0  # lines before the run's first key, besides keys
    start = 0
    for i in itertools.compress(range(1, n), between[1:n]):  # a key with lines before it: a run ends
        lines += between[start].count("\n")
        rule_at[start + lines : i + lines] = [rule] * (i - start)
        start = i
    lines += between[start].count("\n")
    rule_at[start + lines : n + lines] = [rule] * (n - start)


def _slots(t: Template, captures: list[str]) -> list[str | int]:
    """A target of literal text and bare names (see :func:`_format_of`) as the text before each
    key's name (its newline) and then, in order, literal text (a str) or a capture's index."""
    slots: list[str | int] = ["\n"]
    for kind, value in t.parts:
        if kind == "lit":
            if type(slots[-1]) is str:
                slots[-1] += str(value)
            else:
                slots.append(str(value))
        else:
            slots.append(captures.index(str(value)))
    return slots


def _format_of(t: Template) -> tuple[str, list[str]] | None:
    """``t`` as a %-format and the names it fills, when it holds only literal text and bare names."""
    fmt: list[str] = []
    names: list[str] = []
    for kind, value in t.parts:
        if kind == "lit":
            fmt.append(str(value).replace("%", "%%"))
        elif isinstance(value, str):
            fmt.append("%s")
            names.append(value)
        else:
            return None
    return "".join(fmt), names


def _same_bytes(outputs: Sequence[PlannedTensor], group_of: dict[str, int]) -> tuple[tuple[str, ...], ...]:
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
    got = _format_of(t)
    if got is None:
        return lambda env: _fill(t, env, rule)
    f, names = got

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


def _origin(e: Any) -> str:
    rule = None if e is None else e[1] if type(e) is _Lazy else e.rule
    if rule is None:
        return "a source key no rule has consumed yet"
    return f"written by {rule.label} at {rule.loc}"


def _closest(name: str, table: dict[str, Any], pos: dict[str, Any]) -> str:
    keys = sorted(table, key=lambda k: _pos_key(pos[k]))
    close = difflib.get_close_matches(name, keys, n=3, cutoff=0.5)
    if close:
        return f" (closest keys: {', '.join(close)})"
    return f" ({len(keys)} keys, e.g. {', '.join(keys[:3])})" if keys else ""
