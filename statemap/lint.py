"""lint: find mistakes in a spec from its patterns alone (and, optionally, one checkpoint).

``statemap lint SPEC [--against CHECKPOINT]`` runs :func:`lint`. Each finding names the rule's
``file:line`` and a code (the table is in ``docs/lint.md``):

=====  =============  =====================================================================
code   severity       meaning
=====  =============  =====================================================================
SM101  warning        two rules match one key; the later, more specific one loses it
SM102  warning        a rule's output matches its own source pattern (not idempotent)
SM103  warning        a capture glued to literal text matches inside longer names
SM104  error/warning  two rules (or two targets, or two matched keys) write one key
SM105  error          a rule can never match: earlier rules consume every key it could match
SM106  error          ``--against``: a rule matches nothing there (optional rule: info)
SM107  error          ``--against``: the spec does not plan against that checkpoint
SM108  error          sizes / dims that can't work whatever the checkpoint
=====  =============  =====================================================================

Exit status for the CLI (:func:`exit_code`): 0 clean or infos only, 1 a warning, 2 an error.

How the static checks work
--------------------------

Every non-regex pattern is a regular language over characters: literal text, ``{x}`` =
``[^.]+``, ``{x:int}`` = ``\\d+``, ``{x:path}`` = ``.+``. A target template is one too: a
capture field takes the kind of the capture it copies, arithmetic is ``\\d+``, and a var is its
default value (or any text, where being generous is the safe side). Simple ``re:`` patterns
(literals, classes, ``\\d``, ``.``, groups, ``|``, ``?``, ``*``, ``+``, ``{m,n}``) are compiled
the same way; other regexes are skipped.

Questions such as "can rules #2 and #5 match one key?" or "is every key rule #7 could match
consumed by an earlier rule?" become emptiness questions on a product of small automata
(intersection, and set difference through on-the-fly subset construction), answered by a
breadth-first search over a finite alphabet: every character the patterns mention, plus one
representative of each remaining class (a letter, a digit, ``.``, ``_``, ``-``). The search
returns the shortest witness key (``encoder.layers.0.x.in_proj_weight``), which goes into the
message and is re-checked with the real regexes.

Limits: a repeated capture (``{x}.{x}``, a backreference) is treated as two independent ones;
characters outside the representative classes are not told apart; a search that exceeds its
budget says nothing. Regex captures are taken to hold any text. Two targets that reach one
key only through a ``{x:path}`` field (a catch-all) are not reported: whether they collide
depends on which keys the checkpoint has, which ``--against`` checks.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import PlanError
from .meta import TensorMeta
from .ops import REGISTRY
from .rules import Rule
from .spec import Spec
from .template import Cap, Pattern, Template, eval_expr, expr_names, expr_str

ERROR, WARNING, INFO = "error", "warning", "info"
_SEVERITY_RANK = {ERROR: 2, WARNING: 1, INFO: 0}

CODES: dict[str, str] = {
    "SM101": "two rules can match one key; the earlier rule takes it although the later one is more specific",
    "SM102": "a rule's output matches its own source pattern (running it again renames again)",
    "SM103": "a capture is glued to literal text, so the pattern also matches inside longer names",
    "SM104": "two rules, two targets of a rule, or two keys matched by a rule write one key",
    "SM105": "a rule can never match: earlier rules consume every key it could match",
    "SM106": "the rule matches nothing on the checkpoint given with --against",
    "SM107": "the spec does not plan against the checkpoint given with --against",
    "SM108": "sizes or dims that cannot work whatever the checkpoint",
}


@dataclass(frozen=True)
class Finding:
    """One lint finding. ``str(finding)`` is the one-line form the CLI prints."""

    code: str  # "SM101" ... see CODES
    severity: str  # "error" | "warning" | "info"
    loc: str  # "file:line" of the rule (or of the spec)
    rule: str  # the rule's label, "rule #3 (rename a.{i})", or "" for the whole spec
    message: str
    hint: str = ""

    def __str__(self) -> str:
        what = f"{self.rule}: {self.message}" if self.rule else self.message
        return f"{self.loc}: {self.code} {self.severity}: {what}" + (f" ({self.hint})" if self.hint else "")


def exit_code(findings: Iterable[Finding]) -> int:
    """0 clean (infos only), 1 a warning, 2 an error."""
    worst = max((_SEVERITY_RANK[f.severity] for f in findings), default=0)
    return {2: 2, 1: 1}.get(worst, 0)


# -- automata over key characters --------------------------------------------------------------

# A predicate is a hashable description of a set of characters:
#   ("lit", c) | ("cls", "seg" | "int" | "any") | ("set", items, negate)  (items from sre_parse)
Pred = tuple

_SEG: Pred = ("cls", "seg")
_INT: Pred = ("cls", "int")
_ANY: Pred = ("cls", "any")
_KIND_PRED = {"seg": _SEG, "int": _INT, "path": _ANY}

try:  # Python >= 3.11
    from re import _constants as _sc  # type: ignore[attr-defined,unused-ignore]
    from re import _parser as _sre  # type: ignore[attr-defined,unused-ignore]
except ImportError:  # pragma: no cover
    import sre_constants as _sc  # type: ignore[no-redef,unused-ignore]
    import sre_parse as _sre  # type: ignore[no-redef,unused-ignore]


def _in_category(cat: Any, ch: str) -> bool:
    word = ch.isalnum() or ch == "_"
    table = {
        _sc.CATEGORY_DIGIT: ch.isdigit(),
        _sc.CATEGORY_NOT_DIGIT: not ch.isdigit(),
        _sc.CATEGORY_WORD: word,
        _sc.CATEGORY_NOT_WORD: not word,
        _sc.CATEGORY_SPACE: ch.isspace(),
        _sc.CATEGORY_NOT_SPACE: not ch.isspace(),
    }
    return table.get(cat, False)


def _test(pred: Pred, ch: str) -> bool:
    kind = pred[0]
    if kind == "lit":
        return ch == pred[1]
    if kind == "cls":
        return {"seg": ch != ".", "int": ch.isdigit(), "any": ch != "\n"}[pred[1]]
    _, items, negate = pred
    hit = False
    for op, av in items:
        if op == _sc.LITERAL:
            hit = ch == chr(av)
        elif op == _sc.RANGE:
            hit = av[0] <= ord(ch) <= av[1]
        elif op == _sc.CATEGORY:
            hit = _in_category(av, ch)
        if hit:
            break
    return hit != negate


def _pred_chars(pred: Pred) -> set[str]:
    """Characters a predicate singles out (they join the search alphabet)."""
    if pred[0] == "lit":
        return {pred[1]}
    out: set[str] = set()
    if pred[0] == "set":
        for op, av in pred[1]:
            if op == _sc.LITERAL:
                out.add(chr(av))
            elif op == _sc.RANGE:
                out |= {chr(av[0]), chr(av[1])}
    return out


class _Unsupported(Exception):
    pass


class NFA:
    """A small NFA with epsilon moves: state 0 is the start, ``accept`` the only final state."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[Pred, int]]] = [[]]
        self.eps: list[list[int]] = [[]]
        self.accept = 0
        self.prefix = ""  # literal text every word starts with / ends with (a quick disjointness test)
        self.suffix = ""
        self._chars: set[str] | None = None
        self._closure: dict[frozenset[int], frozenset[int]] = {}
        self._step: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def new(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    # builders: each takes a state and returns the state after the piece
    def lit(self, s: int, text: str) -> int:
        for c in text:
            t = self.new()
            self.edges[s].append((("lit", c), t))
            s = t
        return s

    def plus(self, s: int, pred: Pred) -> int:
        t = self.new()
        self.edges[s].append((pred, t))
        self.edges[t].append((pred, t))
        return t

    def star(self, s: int, pred: Pred) -> int:
        t = self.plus(s, pred)
        self.eps[s].append(t)
        return t

    def chars(self) -> set[str]:
        if self._chars is None:
            self._chars = {c for es in self.edges for p, _ in es for c in _pred_chars(p)}
        return self._chars

    def close(self, states: frozenset[int]) -> frozenset[int]:
        got = self._closure.get(states)
        if got is None:
            todo, seen = list(states), set(states)
            while todo:
                for t in self.eps[todo.pop()]:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            got = self._closure[states] = frozenset(seen)
        return got

    def start(self) -> frozenset[int]:
        return self.close(frozenset({0}))

    def step(self, states: frozenset[int], ch: str) -> frozenset[int]:
        key = (states, ch)
        got = self._step.get(key)
        if got is None:
            got = self._step[key] = self.close(frozenset(t for s in states for p, t in self.edges[s] if _test(p, ch)))
        return got


def _regex_nfa(src: str) -> NFA:
    nfa = NFA()
    try:
        tree = _sre.parse(src)
    except Exception as e:  # noqa: BLE001 - parse_pattern already accepted it; be safe
        raise _Unsupported(str(e)) from None
    if tree.state.flags & ~(_sc.SRE_FLAG_UNICODE):
        raise _Unsupported("flags")

    def seq(s: int, items: Any) -> int:
        for op, av in items:
            s = one(s, op, av)
        return s

    def one(s: int, op: Any, av: Any) -> int:
        if op == _sc.LITERAL:
            return nfa.lit(s, chr(av))
        if op == _sc.NOT_LITERAL:
            t = nfa.new()
            nfa.edges[s].append((("set", ((_sc.LITERAL, av),), True), t))
            return t
        if op == _sc.ANY:
            t = nfa.new()
            nfa.edges[s].append((_ANY, t))
            return t
        if op == _sc.IN:
            items = tuple((o, a) for o, a in av if o != _sc.NEGATE)
            if any(o not in (_sc.LITERAL, _sc.RANGE, _sc.CATEGORY) for o, _ in items):
                raise _Unsupported("set")
            t = nfa.new()
            nfa.edges[s].append((("set", items, len(items) != len(av)), t))
            return t
        if op in (_sc.MAX_REPEAT, _sc.MIN_REPEAT):
            lo, hi, sub = av
            if lo > 20 or (hi != _sc.MAXREPEAT and hi > 20):
                raise _Unsupported("repeat")
            for _ in range(lo):
                s = seq(s, sub)
            if hi == _sc.MAXREPEAT:
                loop = nfa.new()
                nfa.eps[s].append(loop)
                end = seq(loop, sub)
                nfa.eps[end].append(loop)
                return loop
            ends = [s]
            for _ in range(hi - lo):
                s = seq(s, sub)
                ends.append(s)
            out = nfa.new()
            for e in ends:
                nfa.eps[e].append(out)
            return out
        if op == _sc.SUBPATTERN:
            _, add, remove, sub = av
            if add or remove:
                raise _Unsupported("inline flags")
            return seq(s, sub)
        if op == _sc.BRANCH:
            out = nfa.new()
            for sub in av[1]:
                b = nfa.new()
                nfa.eps[s].append(b)
                nfa.eps[seq(b, sub)].append(out)
            return out
        if op == _sc.AT:
            return s
        raise _Unsupported(str(op))

    nfa.accept = seq(0, tree)
    return nfa


def _parts(p: Pattern) -> list[tuple[str, str]]:
    """A pattern's parsed parts as ("lit", text) / ("field", "name" or "name:kind")."""
    return [
        ("field", x.name if x.kind == "seg" else f"{x.name}:{x.kind}") if isinstance(x, Cap) else ("lit", x.text) for x in p.parts
    ]


def pattern_kinds(p: Pattern) -> dict[str, Pred]:
    """Capture name -> the predicate its characters satisfy (regex groups: any text)."""
    if p.is_regex:
        return {n: _ANY for n in p.captures}
    return {name: _KIND_PRED[kind] for name, kind in p.kinds.items()}


def pattern_nfa(p: Pattern) -> NFA | None:
    """The language of a pattern, or None for a regex this module does not compile."""
    if p.is_regex:
        try:
            return _regex_nfa(p.regex)
        except _Unsupported:
            return None
    nfa = NFA()
    s = 0
    for x in p.parts:
        s = nfa.plus(s, _KIND_PRED[x.kind]) if isinstance(x, Cap) else nfa.lit(s, x.text)
    nfa.accept = s
    _ends(nfa, _parts(p))
    return nfa


def _ends(nfa: NFA, parts: list[tuple[str, Any]]) -> None:
    lits = [(k == "lit", str(v)) for k, v in parts]
    if lits and lits[0][0]:
        nfa.prefix = lits[0][1]
    if lits and lits[-1][0]:
        nfa.suffix = lits[-1][1]


def template_nfa(t: Template, kinds: Mapping[str, Pred], vars_: Mapping[str, Any] | None) -> NFA:
    """The keys a template can produce. ``vars_`` None: a var may be any text (the generous view)."""
    nfa = NFA()
    s = 0
    for kind, value in t.parts:
        if kind == "lit":
            s = nfa.lit(s, str(value))
        elif isinstance(value, str) and value in kinds:
            s = nfa.plus(s, kinds[value])
        elif isinstance(value, str):
            s = nfa.lit(s, str(vars_[value])) if vars_ is not None and value in vars_ else nfa.star(s, _ANY)
        elif isinstance(value, int):
            s = nfa.lit(s, str(value))
        elif vars_ is not None and not (expr_names(value) - set(vars_)) and not (expr_names(value) & set(kinds)):
            try:
                s = nfa.lit(s, str(eval_expr(value, dict(vars_))))
            except Exception:  # noqa: BLE001 - a bad default is the planner's business
                s = nfa.plus(s, _INT)
        else:
            s = nfa.plus(s, _INT)
    nfa.accept = s
    _ends(nfa, [("lit", v) if k == "lit" else ("field", v) for k, v in t.parts])
    return nfa


class _Budget(Exception):
    pass


_BUDGET = 20_000


def _compatible(a: str, b: str, at_end: bool) -> bool:
    return a.endswith(b) or b.endswith(a) if at_end else a.startswith(b) or b.startswith(a)


_MEMO: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[NFA, ...], str | None | bool]] = {}


def witness(pos: Sequence[NFA], neg: Sequence[NFA] = (), budget: int = _BUDGET) -> str | None:
    """Shortest key in every ``pos`` language and in no ``neg`` language; None if there is none.

    Raises ``_Budget`` when the search explores more than ``budget`` states (no answer).
    """
    for a in pos:
        for b in pos:
            if a is not b and not (_compatible(a.prefix, b.prefix, False) and _compatible(a.suffix, b.suffix, True)):
                return None
    autos = list(pos) + list(neg)
    letters = set().union(*(a.chars() for a in pos)) if pos else set()
    taken = letters.union(*(a.chars() for a in neg)) if neg else letters
    alphabet: list[str] = []
    for pool in ("xyzwvuqabcdefghijklmnoprst", "0123456789", "XYZABCDEFGHIJKLMNOPQRSTUVW", "-~#@!"):
        free = [c for c in pool if c not in taken]
        if free:
            alphabet.append(free[0])
    alphabet += sorted(letters | {".", "_"} - set(alphabet))
    npos = len(pos)
    start = tuple(a.start() for a in autos)
    if any(not s for s in start[:npos]):
        return None
    pos_acc = [a.accept for a in autos[:npos]]
    neg_acc = [a.accept for a in autos[npos:]]
    parent: dict[tuple[frozenset[int], ...], tuple[Any, str]] = {start: (None, "")}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        if all(acc in st for acc, st in zip(pos_acc, state)) and not any(acc in st for acc, st in zip(neg_acc, state[npos:])):
            out = []
            while state is not None:
                state, ch = parent[state]
                out.append(ch)
            return "".join(reversed(out))
        for ch in alphabet:
            nxt = []
            for n, (a, st) in enumerate(zip(autos, state)):
                t = a.step(st, ch) if st else st
                if not t and n < npos:
                    break
                nxt.append(t)
            else:
                key = tuple(nxt)
                if key in parent:
                    continue
                parent[key] = (state, ch)
                if len(parent) > budget:
                    raise _Budget
                queue.append(key)
    return None


def _try_witness(pos: Sequence[NFA], neg: Sequence[NFA] = ()) -> str | None | bool:
    """Like :func:`witness`, but ``False`` (not None) when the budget ran out."""
    key = (tuple(id(a) for a in pos), tuple(id(a) for a in neg))
    hit = _MEMO.get(key)
    if hit is not None and hit[0] == tuple(pos) + tuple(neg):  # ids are only unique while alive
        return hit[1]
    try:
        got: str | None | bool = witness(pos, neg)
    except _Budget:
        got = False
    if len(_MEMO) > 50_000:
        _MEMO.clear()
    _MEMO[key] = (tuple(pos) + tuple(neg), got)
    return got


# -- per-rule facts -------------------------------------------------------------------------------


def _identity_parts(p: Pattern) -> tuple[tuple[str, Any], ...] | None:
    if p.is_regex:
        return None
    return tuple(("expr", x.name) if isinstance(x, Cap) else ("lit", x.text) for x in p.parts)


@dataclass
class _Info:
    rule: Rule
    src: NFA | None  # None: no source, or a regex we cannot compile
    kinds: dict[str, Pred]
    consumes: bool  # the matched keys leave the table
    consumed: list[NFA] = field(default_factory=list)  # languages of the keys it removes
    outs: list[tuple[Template, NFA, NFA]] = field(default_factory=list)  # (target, default vars, any vars)
    n_literal: int = 0  # specificity: literal characters in the source pattern

    @property
    def label(self) -> str:
        return self.rule.label

    @property
    def loc(self) -> str:
        return str(self.rule.loc)


def _literal_count(p: Pattern) -> int:
    if not p.is_regex:
        return sum(len(v) for k, v in _parts(p) if k == "lit")

    def count(items: Any) -> int:
        n = 0
        for op, av in items:
            if op == _sc.LITERAL:
                n += 1
            elif op == _sc.SUBPATTERN:
                n += count(av[-1])
            elif op == _sc.BRANCH:
                n += min(count(b) for b in av[1])
            elif op in (_sc.MAX_REPEAT, _sc.MIN_REPEAT):
                n += av[0] * count(av[2])
        return n

    try:
        return count(_sre.parse(p.regex))
    except Exception:  # noqa: BLE001
        return 0


def _info(rule: Rule, vars_: Mapping[str, Any]) -> _Info:
    op = REGISTRY[rule.op]
    src = rule.sources[0] if rule.sources else None
    kinds = pattern_kinds(src) if src is not None else {}
    extra = op.target_kinds(op.params(rule))  # names the op adds to its targets (split over: an index)
    if extra:
        kinds = {**kinds, **{n: _KIND_PRED[k] for n, k in extra.items() if n not in kinds}}
    ident = _identity_parts(src) if src is not None else None
    outs = []
    has_identity = False
    for t in rule.targets:
        if ident is not None and t.parts == ident:
            has_identity = True
            continue
        outs.append((t, template_nfa(t, kinds, vars_), template_nfa(t, kinds, None)))
    if op.n_targets == "same" and not rule.targets:  # keep
        has_identity = True
    src_nfa = pattern_nfa(src) if src is not None else None
    # a conditional rule (`when:`) leaves the keys its conditions reject to later rules
    consumes = src is not None and not op.keeps_sources and not has_identity and not rule.when
    info = _Info(rule, src_nfa, kinds, consumes, outs=outs, n_literal=_literal_count(src) if src is not None else 0)
    if consumes and src_nfa is not None:
        # merge's other sources are consumed only where the first source matched, so they are
        # left out: a later rule may still see them (the generous reading for SM105)
        info.consumed.append(src_nfa)
    return info


def _f(code: str, severity: str, info: _Info | None, spec: Spec, message: str, hint: str = "") -> Finding:
    if info is None:
        return Finding(code, severity, str(spec.loc), "", message, hint)
    return Finding(code, severity, info.loc, info.label, message, hint)


# -- the checks ------------------------------------------------------------------------------------


def _check_dead(spec: Spec, infos: list[_Info]) -> tuple[list[Finding], set[int]]:
    """SM105: every key a rule could match is consumed earlier, and nothing re-creates one."""
    out: list[Finding] = []
    dead: set[int] = set()
    for j, rj in enumerate(infos):
        if rj.src is None:
            continue
        earlier = [(i, ri) for i, ri in enumerate(infos[:j]) if ri.consumes]
        blockers = [(i, ri, c) for i, ri in earlier for c in ri.consumed if _try_witness([rj.src, c]) is not None]
        if not blockers:
            continue
        if _try_witness([rj.src], [c for _, _, c in blockers]) is not None:
            continue  # some source key gets through (or the search gave up)
        alive = False
        for k, rk in enumerate(infos[:j]):
            for _, _, generous in rk.outs:
                later = [c for i, ri, c in blockers if i > k]
                if _try_witness([generous, rj.src], later) is not None:
                    alive = True
                    break
            if alive:
                break
        if alive:
            continue
        dead.add(j)
        by = sorted({i for i, _, _ in blockers})
        names = ", ".join(f"{infos[i].label} at {infos[i].loc}" for i in by)
        sev = WARNING if rj.rule.optional else ERROR
        out.append(
            _f(
                "SM105",
                sev,
                rj,
                spec,
                f"can never match: every key it could match is consumed earlier by {names}",
                "move it before that rule, or narrow the earlier pattern",
            )
        )
    return out, dead


def _check_overlap(spec: Spec, infos: list[_Info], dead: set[int]) -> list[Finding]:
    """SM101: rules i < j both match a key; i takes it, though j is the more specific pattern."""
    out: list[Finding] = []
    for j, rj in enumerate(infos):
        if rj.src is None or j in dead:
            continue
        for i, ri in enumerate(infos[:j]):
            pi, pj = ri.rule.sources[0] if ri.rule.sources else None, rj.rule.sources[0]
            if not ri.consumes or ri.src is None or pi is None or pi.is_regex or pj.is_regex:
                continue  # (where a regex's literal text sits is not tracked)
            before = [c for rk in infos[:i] if rk.consumes for c in rk.consumed]
            w = _try_witness([ri.src, rj.src], before)
            if not isinstance(w, str) or ri.rule.sources[0].match(w) is None or rj.rule.sources[0].match(w) is None:
                continue
            if _try_witness([rj.src], [ri.src]) is None:
                continue  # j is inside i: it only sees keys made later (SM105 covers the rest)
            if _try_witness([ri.src], [rj.src]) is None:
                continue  # i is inside j: j is the catch-all after it, as intended
            if _absorbs(pj, rj.kinds, pi, w):
                continue  # j's {x:path} covers text i spells out: j is the catch-all after i
            if rj.n_literal > ri.n_literal:
                out.append(
                    _f(
                        "SM101",
                        WARNING,
                        rj,
                        spec,
                        f"also matches keys such as {w!r}, which the earlier, less specific {ri.label} at {ri.loc} takes first",
                        f"move this rule before {ri.label.split(' (')[0]}, or narrow that rule's pattern",
                    )
                )
            else:
                out.append(
                    _f(
                        "SM101",
                        INFO,
                        rj,
                        spec,
                        f"overlaps {ri.label} at {ri.loc} on keys such as {w!r}; the earlier rule takes them",
                    )
                )
    return out


def _absorbs(later: Pattern, kinds: Mapping[str, Pred], earlier: Pattern, key: str) -> bool:
    """Does a ``{x:path}`` capture of ``later`` cover, on ``key``, text that ``earlier`` matches literally?"""
    ml, me = later.spans(key), earlier.spans(key)  # linear-time matcher, never re on a pattern
    if ml is None or me is None:
        return False
    captured: set[int] = set()
    for span in me.values():
        if span is not None:
            captured.update(range(*span))
    literal = set(range(len(key))) - captured
    for name, span in ml.items():
        if kinds.get(name) == _ANY and span is not None and literal & set(range(*span)):
            return True
    return False


def _check_idempotent(spec: Spec, infos: list[_Info]) -> list[Finding]:
    """SM102: a target of the rule is matched by the rule's own source pattern."""
    out: list[Finding] = []
    vars_ = spec.var_dict
    for r in infos:
        if r.src is None:
            continue
        pat = r.rule.sources[0]
        for t, exact, _ in r.outs:
            w = _try_witness([exact, r.src])
            if not isinstance(w, str):
                continue
            caps = pat.match(w)
            if caps is None:
                continue
            try:
                again = f" -> {t.fill({**vars_, **caps})!r}"
            except Exception:  # noqa: BLE001
                again = ""
            out.append(
                _f(
                    "SM102",
                    WARNING,
                    r,
                    spec,
                    f"not idempotent: its output {w!r} matches its own source {pat.text!r} again{again}; "
                    "a checkpoint already in the target layout (or this spec run twice) is changed again",
                    "anchor the pattern with literal text the output does not have",
                )
            )
            break
    return out


def _check_cascade(spec: Spec, infos: list[_Info]) -> list[Finding]:
    """SM103: captures not bounded by '.' (or '_' / '-' for one-segment captures)."""
    out: list[Finding] = []
    for r in infos:
        for p in r.rule.sources[:1]:
            if p.is_regex:
                continue
            parts = _parts(p)
            for n, (kind, value) in enumerate(parts):
                if kind != "field":
                    continue
                name, _, typ = value.partition(":")
                name, typ = name.strip(), typ.strip() or "seg"
                if typ == "int":
                    continue
                prev = parts[n - 1] if n > 0 else None
                nxt = parts[n + 1] if n + 1 < len(parts) else None
                for side, nb in (("before", prev), ("after", nxt)):
                    if nb is None:
                        continue
                    if nb[0] == "field":
                        if side == "after":
                            out.append(
                                _f(
                                    "SM103",
                                    WARNING,
                                    r,
                                    spec,
                                    f"captures {{{value}}}{{{nb[1]}}} in {p.text!r} touch: where one ends is a guess",
                                    "put literal text such as '.' between them",
                                )
                            )
                        continue
                    ch = nb[1][-1] if side == "before" else nb[1][0]
                    text = nb[1]
                    if ch in "./":  # '/' separates an input file's captures from its keys (`inputs:`)
                        continue
                    example = _cascade_example(parts, n, typ, side)
                    if typ == "path":
                        out.append(
                            _f(
                                "SM103",
                                WARNING,
                                r,
                                spec,
                                f"{{{value}}} in {p.text!r} runs into {text!r} with no '.' between, so it also "
                                f"matches inside longer names, e.g. {example!r}",
                                f"write '.' between {{{name}:path}} and {text!r}",
                            )
                        )
                    elif ch.isalnum():
                        out.append(
                            _f(
                                "SM103",
                                WARNING,
                                r,
                                spec,
                                f"{{{value}}} in {p.text!r} is glued to {text!r} mid-word, so it also matches "
                                f"longer names, e.g. {example!r}",
                                "capture whole segments, or use {x:int} for numbers",
                            )
                        )
                    else:
                        out.append(
                            _f(
                                "SM103",
                                INFO,
                                r,
                                spec,
                                f"{{{value}}} in {p.text!r} captures part of a segment, so it binds any prefix or "
                                f"suffix there, e.g. {example!r}",
                            )
                        )
    return out


def _cascade_example(parts: list[tuple[str, str]], n: int, typ: str, side: str) -> str:
    out = []
    for m, (kind, value) in enumerate(parts):
        if kind == "lit":
            out.append(value)
            continue
        t = value.partition(":")[2].strip() or "seg"
        if m == n:
            longer = "qk" if side == "after" else "xyz"
            out.append(("a." + longer) if (typ == "path" and side == "after") else (longer + ".a") if typ == "path" else longer)
        else:
            out.append({"int": "0", "path": "a.b"}.get(t, "x"))
    return "".join(out)


def _has_path_field(t: Template, kinds: Mapping[str, Pred]) -> bool:
    return any(k == "expr" and isinstance(v, str) and kinds.get(v) == _ANY for k, v in t.parts)


def _is_literal(t: Template, kinds: Mapping[str, Pred]) -> bool:
    return not any(k == "expr" and (not isinstance(v, str) or v in kinds) for k, v in t.parts)


def _segments(t: Template, kinds: Mapping[str, Pred], vars_: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """A template as dotted segments of literal text and capture slots.

    A slot copying a capture is ``0``; an arithmetic slot is its expression (``{i}`` and
    ``{i+6}`` meet only for some layer counts, which the checkpoint decides).
    """
    segs: list[list[Any]] = [[]]
    for k, v in t.parts:
        if k == "expr" and isinstance(v, str) and v not in kinds and v in vars_:
            k, v = "lit", str(vars_[v])
        if k == "lit":
            first, *rest = str(v).split(".")
            segs[-1].append(first)
            segs += [[r] for r in rest]
        else:
            segs[-1].append(0 if isinstance(v, str) else ("expr", expr_str(v)))
    out = []
    for seg in segs:  # merge adjacent literal pieces, drop empty ones
        merged: list[Any] = []
        for x in seg:
            if isinstance(x, str) and merged and isinstance(merged[-1], str):
                merged[-1] += x
            elif x != "":
                merged.append(x)
        out.append(tuple(merged))
    return out


def _structural(ti: Template, ki: Mapping[str, Pred], tj: Template, kj: Mapping[str, Pred], vars_: Mapping[str, Any]) -> bool:
    """Do the templates line up segment by segment, literal text with literal text and slot with slot?

    ``{stack}.ffn.{p}`` and ``{s}.ffn.{q}`` do: they collide on every checkpoint with both kinds of
    source. ``lm_head.{m}.{p}`` and ``lm_head.decoder.weight`` only collide if ``{m}`` happens to
    be ``decoder``, which depends on the checkpoint (``--against`` finds it).
    """
    return _segments(ti, ki, vars_) == _segments(tj, kj, vars_)


def _check_writes(spec: Spec, infos: list[_Info], dead: set[int]) -> list[Finding]:
    """SM104: one key written twice, within a rule or by two rules."""
    out: list[Finding] = []
    vars_ = spec.var_dict
    for r in infos:
        seen: set[str] = set()
        for t in r.rule.targets:
            if t.text in seen:
                out.append(_f("SM104", ERROR, r, spec, f"lists target {t.text!r} twice", "remove the duplicate"))
            seen.add(t.text)
        if r.rule.sources:
            caps = set(r.rule.sources[0].captures) - REGISTRY[r.rule.op].joined(REGISTRY[r.rule.op].params(r.rule))
            for t, _, _ in r.outs:
                unused = sorted(caps - t.names)
                if unused:
                    out.append(
                        _f(
                            "SM104",
                            WARNING,
                            r,
                            spec,
                            f"target {t.text!r} does not use {', '.join('{' + u + '}' for u in unused)}: two keys "
                            "that differ only there are written to one key",
                            "use every capture in the target, or write the source as literal text",
                        )
                    )
    for j, rj in enumerate(infos):
        if j in dead:
            continue
        for i, ri in enumerate(infos[:j]):
            if i in dead:
                continue
            between = [c for rk in infos[i + 1 : j + 1] if rk.consumes for c in rk.consumed]
            for ti, exact_i, _ in ri.outs:
                if _has_path_field(ti, ri.kinds):
                    continue
                for tj, exact_j, _ in rj.outs:
                    if _has_path_field(tj, rj.kinds):
                        continue
                    if not _structural(ti, ri.kinds, tj, rj.kinds, vars_):
                        continue  # only if a capture takes a value the other spells out: data-dependent
                    w = _try_witness([exact_i, exact_j], between)
                    if not w:
                        continue
                    optional = ri.rule.optional or rj.rule.optional
                    literal = _is_literal(ti, ri.kinds) and _is_literal(tj, rj.kinds)
                    sev = INFO if optional else ERROR if literal else WARNING
                    alt = " (both may be meant as alternatives: one is optional)" if optional else ""
                    out.append(
                        _f(
                            "SM104",
                            sev,
                            rj,
                            spec,
                            f"target {tj.text!r} can write {w!r}, which {ri.label} at {ri.loc} already writes "
                            f"({ti.text!r}) and nothing consumes in between{alt}",
                            "rename one of them, or drop / rename the first before this rule",
                        )
                    )
    return out


def _check_params(spec: Spec, infos: list[_Info]) -> list[Finding]:
    """SM108: sizes and dims that cannot work (evaluated with the vars' defaults), as each op sees them."""
    out: list[Finding] = []
    vars_ = spec.var_dict
    for r in infos:
        for fact in REGISTRY[r.rule.op].lint(r.rule, vars_):
            out.append(_f("SM108", WARNING if fact.severity == "warning" else ERROR, r, spec, fact.message, fact.hint))
    return out


# -- against a checkpoint --------------------------------------------------------------------------

_WHERE = re.compile(r"^(?P<loc>.*?:\d+): rule #(?P<n>\d+) \((?P<op>[a-z]+)[^:]*?\): ")


def _check_against(spec: Spec, infos: list[_Info], metas: list[TensorMeta]) -> list[Finding]:
    """SM106 / SM107: plan every rule as optional, so one run lists every rule matching nothing."""
    from .plan import make_plan

    out: list[Finding] = []
    by_index = {r.rule.index: r for r in infos}
    relaxed = replace(spec, rules=tuple(replace(r, optional=True) for r in spec.rules), strict=False)
    counts: dict[int, int] = {}
    try:
        plan = make_plan(relaxed, metas)
        counts = dict(plan.matches)
        if spec.strict and plan.passthrough:
            keys = ", ".join(plan.passthrough[:8]) + (", ..." if len(plan.passthrough) > 8 else "")
            out.append(
                _f(
                    "SM107",
                    ERROR,
                    None,
                    spec,
                    f"strict spec: {len(plan.passthrough)} source key(s) not accounted for by any rule: {keys}",
                    "add rules for them, or list them under 'keep:' or 'drop:'",
                )
            )
    except PlanError as e:
        msg = str(e)
        m = _WHERE.match(msg)
        failed = by_index.get(int(m.group("n"))) if m else None
        text = msg[m.end() :] if m else msg
        out.append(_f("SM107", ERROR, failed, spec, text))
        if failed is not None:
            upto = [r for r in relaxed.rules if r.index < failed.rule.index]
            if upto:
                try:
                    counts = dict(make_plan(replace(relaxed, rules=tuple(upto)), metas).matches)
                except PlanError:
                    counts = {}
            later = [r for r in infos if r.rule.index > failed.rule.index]
            if later:
                out.append(
                    _f(
                        "SM107",
                        INFO,
                        failed,
                        spec,
                        f"the {len(later)} rule(s) after this one were not checked against the checkpoint",
                    )
                )
    for index, n in counts.items():
        r = by_index.get(index)
        if r is None or n:
            continue
        if r.rule.optional:
            out.append(_f("SM106", INFO, r, spec, "optional rule matches nothing on this checkpoint"))
        else:
            out.append(
                _f(
                    "SM106",
                    ERROR,
                    r,
                    spec,
                    "matches nothing on this checkpoint",
                    "fix the pattern, or mark the rule 'optional: true' if that is expected",
                )
            )
    return out


# -- entry points ----------------------------------------------------------------------------------


def lint(spec: Spec, against_metas: Iterable[TensorMeta] | None = None) -> list[Finding]:
    """Lint a parsed spec; with ``against_metas`` (a checkpoint's metadata) also plan against it.

    Findings come sorted by line, then code. Nothing here reads tensor bytes.

    Example::

        >>> from statemap import load_spec
        >>> spec = load_spec("name: t\\nversion: 1\\nrules:\\n  - rename: '{x}_head.weight -> lm_{x}_head.weight'\\n")
        >>> for f in lint(spec):
        ...     print(f.code, f.severity)
        SM102 warning
        SM103 info
    """
    vars_ = spec.var_dict
    infos = [_info(r, vars_) for r in spec.rules]
    findings: list[Finding] = []
    dead_findings, dead = _check_dead(spec, infos)
    findings += dead_findings
    findings += _check_overlap(spec, infos, dead)
    findings += _check_idempotent(spec, infos)
    findings += _check_cascade(spec, infos)
    findings += _check_writes(spec, infos, dead)
    findings += _check_params(spec, infos)
    if against_metas is not None:
        findings += _check_against(spec, infos, list(against_metas))
    return sorted(findings, key=_sort_key)


def _sort_key(f: Finding) -> tuple[str, int, str]:
    file, _, line = f.loc.rpartition(":")
    return (file, int(line) if line.isdigit() else 0, f.code)


def lint_file(spec: str | Spec, against: str | None = None, vars: Mapping[str, Any] | None = None) -> list[Finding]:
    """``statemap lint SPEC [--against CHECKPOINT] [--set k=v]``: load, open, lint.

    ``spec`` is a path, catalog name or YAML text (as :func:`statemap.load_spec` takes).
    """
    from .spec import load_spec

    s = load_spec(spec, vars)
    if against is None:
        return lint(s)
    from .source import open_source

    ck, s = open_source(s, against)
    with ck:
        metas = list(ck.metas.values())
    return lint(s, metas)


__all__ = ["CODES", "Finding", "exit_code", "lint", "lint_file", "witness"]
