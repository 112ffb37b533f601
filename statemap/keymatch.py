"""Linear-time key matching for templates and ``re:`` patterns.

Python's ``re`` backtracks: ``(.+){30}Z``, ``(a|aa)+`` or a dozen ``{x:path}`` captures can
take longer than the universe on a key of a few hundred characters. Key patterns are
compiled here to a small automaton (a Thompson NFA) and matched in time linear in the
key's length (times the pattern's size), whatever the pattern and the key:

1. a backward pass computes, for every position ``i`` of the key, the set of automaton
   states from which the rest of the key ``key[i:]`` can still be matched (each step is one
   cached dict lookup after the first time a (state set, character) pair is seen);
2. if the start state is in the set for position 0, the key matches, and a forward walk
   follows, at every choice, the first alternative in priority order whose target is in the
   set for its position. It never has to back up, and it picks the same captures a
   backtracking engine would (greedy repeats take as much as the rest of the key allows).

Supported regex syntax: literals, ``.``, classes (``[a-z]``, ``\\d``, ``\\w``, ``\\s`` and
negations), groups (capturing, named, non-capturing), ``|``, greedy and lazy ``* + ? {m,n}``,
``^ $ \\A \\Z``, and the inline flags ``(?s)`` and ``(?x)``. Back-references, look-arounds,
``\\b``, atomic groups, possessive repeats and other flags are refused with a SpecError:
they cannot be matched in linear time (or are not needed for dotted keys).

Example::

    >>> m = compile_regex(r"enc\\.(?P<i>\\d+)\\.w")
    >>> m.match("enc.3.w")
    {'i': '3'}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from .errors import SpecError

try:  # Python >= 3.11
    from re import _constants as _sc  # type: ignore[attr-defined,unused-ignore]
    from re import _parser as _sre  # type: ignore[attr-defined,unused-ignore]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sc  # type: ignore[no-redef,unused-ignore]
    import sre_parse as _sre  # type: ignore[no-redef,unused-ignore]

MAX_STATES = 20_000  # automaton size limit for one pattern (a regex repeat like {500} is unrolled)
MAX_CACHE = 50_000  # cached (state set, character) transitions per pattern; past it, steps are computed
_CHAR, _SPLIT, _SAVE, _ASSERT, _MATCH = range(5)
_CAT = {
    _sc.CATEGORY_DIGIT: re.compile(r"\d"),
    _sc.CATEGORY_NOT_DIGIT: re.compile(r"\D"),
    _sc.CATEGORY_WORD: re.compile(r"\w"),
    _sc.CATEGORY_NOT_WORD: re.compile(r"\W"),
    _sc.CATEGORY_SPACE: re.compile(r"\s"),
    _sc.CATEGORY_NOT_SPACE: re.compile(r"\S"),
}


class Matcher:
    """A compiled key pattern. ``match(key)`` returns the captures or None, in linear time."""

    def __init__(self, names: Sequence[str], groups: Sequence[int], literal: str | None = None) -> None:
        self.kind: list[int] = []
        self.arg: list[Any] = []
        self.out: list[tuple[int, ...]] = []
        self.names = tuple(names)  # capture name per entry of ``groups``
        self.groups = tuple(groups)  # group number per name (slots 2g, 2g+1)
        self.n_groups = max(self.groups, default=0)
        self.literal = literal  # set when the pattern has no captures and no regex: plain equality
        self.fast: re.Pattern[str] | None = None  # a template `re` cannot backtrack on (see _linear_regex)
        self.prefix = ""
        self.suffix = ""
        self.middles: tuple[str, ...] = ()  # literal text a key must hold, in this order (a quick rejection)
        self.start = 0
        self.has_assert = False
        self._rev_eps: list[list[int]] = []
        self._rev_char: list[list[int]] = []
        self._trans: dict[frozenset[int], dict[Any, frozenset[int]]] = {}
        self._cached = 0
        self._end: dict[Any, frozenset[int]] = {}

    # -- building ---------------------------------------------------------------------------

    def new(self, kind: int, arg: Any = None, out: tuple[int, ...] = ()) -> int:
        if len(self.kind) >= MAX_STATES:
            raise SpecError(f"pattern too large to match (over {MAX_STATES} automaton states); use fewer or smaller repeats")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append(out)
        return len(self.kind) - 1

    def finish(self, start: int) -> Matcher:
        self.start = start
        n = len(self.kind)
        self._rev_eps = [[] for _ in range(n)]
        self._rev_char = [[] for _ in range(n)]
        for s in range(n):
            k = self.kind[s]
            for t in self.out[s]:
                (self._rev_char if k == _CHAR else self._rev_eps)[t].append(s)
            if k == _ASSERT:
                self.has_assert = True
        # character chains: a character state in the set for position i takes key[i], and its successor,
        # if a character state too, is in the set for i+1 and takes key[i+1], ...: the walk jumps them
        self._jump = list(range(n))
        self._jump_len = [0] * n
        for s in range(n):
            t, m = s, 0
            while self.kind[t] == _CHAR and m <= n:
                t, m = self.out[t][0], m + 1
            if m > 1:
                self._jump[s], self._jump_len[s] = t, m
        return self

    # -- matching ---------------------------------------------------------------------------

    def _test(self, s: int, ch: str) -> bool:
        a = self.arg[s]
        return bool(a == ch) if isinstance(a, str) else bool(a(ch))

    def _assert_ok(self, cond: str, ctx: tuple[bool, bool, bool]) -> bool:
        bos, eos, eol = ctx
        return bos if cond == "bos" else eos if cond == "eos" else eol

    def _close(self, seed: set[int], ctx: tuple[bool, bool, bool]) -> frozenset[int]:
        """Every state with an epsilon path (asserts checked at this position) into ``seed``."""
        out = set(seed)
        todo = list(seed)
        while todo:
            t = todo.pop()
            for p in self._rev_eps[t]:
                if p not in out and (self.kind[p] != _ASSERT or self._assert_ok(self.arg[p], ctx)):
                    out.add(p)
                    todo.append(p)
        return frozenset(out)

    def _step(self, nxt: frozenset[int], ch: str, ctx: tuple[bool, bool, bool]) -> frozenset[int]:
        seed = {q for t in nxt for q in self._rev_char[t] if self._test(q, ch)}
        return self._close(seed, ctx) if seed else frozenset()

    def _viable(self, key: str) -> list[frozenset[int]] | None:
        """Per position i, the states from which ``key[i:]`` matches; None when the key cannot match."""
        n = len(key)
        plain = (False, False, False)
        ctx_end = (n == 0, True, True) if self.has_assert else plain
        cur = self._end.get(ctx_end)
        if cur is None:
            for s, k in enumerate(self.kind):
                if k == _MATCH:
                    cur = self._end[ctx_end] = self._close({s}, ctx_end)
                    break
        assert cur is not None
        sets: list[frozenset[int]] = [cur] * (n + 1)
        trans = self._trans
        for i in range(n - 1, -1, -1):
            ch = key[i]
            ctx = plain
            if self.has_assert and (i == 0 or i >= n - 1):
                ctx = (i == 0, False, i == n - 1 and key[-1] == "\n")
            ck: Any = ch if ctx == plain else (ch, ctx)
            row = trans.get(cur)
            got = row.get(ck) if row is not None else None
            if got is None:
                got = self._step(cur, ch, ctx)
                if self._cached < MAX_CACHE:
                    self._cached += 1
                    if row is None:
                        row = trans[cur] = {}
                    row[ck] = got
            cur = got
            if not cur:
                return None
            sets[i] = cur
        return sets if self.start in sets[0] else None

    def _walk(self, key: str, sets: list[frozenset[int]]) -> list[int | None]:
        """Follow the first viable alternative at every choice; returns capture slot positions."""
        n = len(key)
        slots: list[int | None] = [None] * (2 * self.n_groups + 2)
        q, i = self.start, 0
        kind, out, arg = self.kind, self.out, self.arg
        jump, jump_len = self._jump, self._jump_len
        asserts = self.has_assert
        ctx = (False, False, False)
        while True:
            k = kind[q]
            if k == _CHAR:  # the backward pass put it in sets[i]: it takes key[i] (and a literal chain, the next ones)
                if jump_len[q]:
                    q, i = jump[q], i + jump_len[q]
                else:
                    q, i = out[q][0], i + 1
                continue
            here = sets[i]
            if k == _SPLIT and not asserts:  # the common case: the first viable branch is a character
                o = out[q]
                t = o[0] if o[0] in here else o[1] if len(o) == 2 else next(t for t in o if t in here)
                if kind[t] == _CHAR:
                    q, i = out[t][0], i + 1
                    continue
            if asserts:
                ctx = (i == 0, i == n, i == n or (i == n - 1 and key[-1] == "\n"))
            stack = [[q, 0]]
            seen = {q}
            while True:
                s, j = stack[-1]
                k = kind[s]
                if k == _CHAR or k == _MATCH:
                    break
                outs = out[s]
                if k == _ASSERT and not self._assert_ok(arg[s], ctx):
                    outs = ()
                if j < len(outs):
                    stack[-1][1] = j + 1
                    t = outs[j]
                    if t in here and t not in seen:
                        seen.add(t)
                        stack.append([t, 0])
                else:
                    stack.pop()
                    if not stack:  # pragma: no cover - the backward pass proved a path exists
                        raise AssertionError("key matcher lost its path")
            for s, _ in stack:
                if kind[s] == _SAVE:
                    slots[arg[s]] = i
            leaf = stack[-1][0]
            if kind[leaf] == _MATCH:
                return slots
            q, i = out[leaf][0], i + 1

    def spans(self, key: str) -> dict[str, tuple[int, int] | None] | None:
        """Capture name -> (start, end) in ``key`` (None: did not take part); None: no match."""
        if self.literal is not None:
            return {} if key == self.literal else None
        if self.fast is not None:
            r = self.fast.fullmatch(key)
            return None if r is None else {name: r.span(name) for name in self.names}
        if not (key.startswith(self.prefix) and key.endswith(self.suffix)):
            return None
        at = len(self.prefix)
        for lit in self.middles:
            at = key.find(lit, at)
            if at < 0:
                return None
            at += len(lit)
        sets = self._viable(key)
        if sets is None:
            return None
        slots = self._walk(key, sets)
        got: dict[str, tuple[int, int] | None] = {}
        for name, g in zip(self.names, self.groups):
            a, b = slots[2 * g], slots[2 * g + 1]
            span = None if a is None or b is None else (a, b)
            if name in got:  # a repeated template capture must capture the same text each time
                prev = got[name]
                if (prev is None) != (span is None) or (
                    prev is not None and span is not None and key[prev[0] : prev[1]] != key[span[0] : span[1]]
                ):
                    return None
                continue
            got[name] = span
        return got

    def match(self, key: str) -> dict[str, Any] | None:
        """Capture name -> captured text (None for a regex group that did not take part), or None."""
        if self.fast is not None:
            r = self.fast.fullmatch(key)
            return None if r is None else r.groupdict()
        sp = self.spans(key)
        if sp is None:
            return None
        return {k: (None if v is None else key[v[0] : v[1]]) for k, v in sp.items()}


# -- templates ------------------------------------------------------------------------------------

_KIND_TEST: dict[str, Callable[[str], bool]] = {
    "seg": lambda c: c != ".",
    "int": lambda c: _CAT[_sc.CATEGORY_DIGIT].fullmatch(c) is not None,  # like the regex \\d
    "path": lambda c: c != "\n",  # like the regex '.'
}


def compile_template(parts: Sequence[tuple[str, ...]]) -> Matcher:
    """``parts``: ("lit", text) or ("cap", name, kind) from a parsed template pattern."""
    caps = [p for p in parts if p[0] == "cap"]
    if not caps:
        return Matcher((), (), literal="".join(p[1] for p in parts)).finish(0)
    m = Matcher([p[1] for p in caps], list(range(1, len(caps) + 1)))
    if parts[0][0] == "lit":
        m.prefix = parts[0][1]
    if parts[-1][0] == "lit" and len(parts) > 1:
        m.suffix = parts[-1][1]
    m.middles = tuple(p[1] for p in parts[1:-1] if p[0] == "lit")
    nxt = m.new(_MATCH)
    g = len(caps)
    for part in reversed(parts):
        if part[0] == "lit":
            for ch in reversed(part[1]):
                nxt = m.new(_CHAR, ch, (nxt,))
        else:
            end = m.new(_SAVE, 2 * g + 1, (nxt,))
            loop = m.new(_SPLIT)
            body = m.new(_CHAR, _KIND_TEST[part[2]], (loop,))
            m.out[loop] = (body, end)
            nxt = m.new(_SAVE, 2 * g, (body,))
            g -= 1
    m.fast = _linear_regex(parts)
    return m.finish(nxt)


_KIND_RE = {"seg": r"[^.]+", "int": r"\d+", "path": r".+"}


def _linear_regex(parts: Sequence[tuple[str, ...]]) -> re.Pattern[str] | None:
    """The template as a Python regex, when backtracking cannot cost more than linear time.

    That holds when every capture has distinct names, no two captures share a key segment
    (a literal with a ``.`` separates them) or touch, and a ``{x:path}`` capture is the last
    one: each seg/int capture then ends at the only place the literal after it allows within
    its segment, and the path capture only gives back characters to a fixed literal tail.
    Same captures as the automaton (both pick what a backtracking engine picks); the
    automaton handles every other template. Most catalog patterns qualify, and `re` runs in C.
    """
    out: list[str] = []
    names: set[str] = set()
    in_segment = False  # a capture already sits in the current key segment
    after_path = False
    for i, part in enumerate(parts):
        if part[0] == "lit":
            out.append(re.escape(part[1]))
            if "." in part[1]:
                in_segment = False
            continue
        _, name, kind = part
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if name in names or after_path or in_segment or (nxt is not None and nxt[0] != "lit") or kind not in _KIND_RE:
            return None
        names.add(name)
        in_segment = True
        after_path = kind == "path"
        out.append(f"(?P<{name}>{_KIND_RE[kind]})")
    return re.compile("".join(out))


_JOINED_KIND_RE = {"seg": r"[^.\n]+", "int": r"\d+", "path": r".+"}


def joined_regex(parts: Sequence[tuple[str, ...]], key: bool = True) -> re.Pattern[str] | None:
    """A regex that finds, in ``"\\n" + "\\n".join(keys) + "\\n"``, exactly the keys the
    template matches (group 1: the key, unless ``key`` is False; then its captures, in order), for
    keys that hold no newline; None when :func:`_linear_regex` gives no regex or a literal holds
    a newline. Each match is the newline before the key and the key.

    Equivalent to ``fullmatch`` key by key: every match starts at a newline (the pattern's first
    character), no part of the pattern can take a newline (a segment capture excludes it here,
    ``.`` and ``\\d`` never take one), so a match stays within one key, and the look-ahead accepts
    exactly the ends ``fullmatch`` accepts, tried in the same order (same captures).

    Example::

        >>> rx = joined_regex([("lit", "a."), ("cap", "i", "int"), ("lit", ".w")])
        >>> rx.findall("\\na.1.w\\nb.2.w\\na.3.w\\n")
        [('a.1.w', '1'), ('a.3.w', '3')]
    """
    if _linear_regex(parts) is None or not any(p[0] == "cap" for p in parts):
        return None
    out: list[str] = []
    for part in parts:
        if part[0] == "lit":
            if "\n" in part[1]:
                return None
            out.append(re.escape(part[1]))
        else:
            out.append(f"({_JOINED_KIND_RE[part[2]]})")
    body = "".join(out)
    return re.compile(f"\n({body})(?=\n)" if key else f"\n{body}(?=\n)")


# -- regexes ----------------------------------------------------------------------------------------


def _refuse(src: str, what: str) -> SpecError:
    return SpecError(
        f"regex {src!r} uses {what}, which statemap's linear-time key matcher does not support; "
        "write it with a template capture ({x}, {x:int}, {x:path}) or a simpler regex"
    )


def _class_test(src: str, items: list[tuple[Any, Any]]) -> Callable[[str], bool]:
    negate = False
    lits: set[str] = set()
    ranges: list[tuple[int, int]] = []
    cats: list[re.Pattern[str]] = []
    for op, av in items:
        if op == _sc.NEGATE:
            negate = True
        elif op == _sc.LITERAL:
            lits.add(chr(av))
        elif op == _sc.RANGE:
            ranges.append((av[0], av[1]))
        elif op == _sc.CATEGORY and av in _CAT:
            cats.append(_CAT[av])
        else:
            raise _refuse(src, f"a character class item ({op})")

    def test(c: str) -> bool:
        hit = c in lits or any(lo <= ord(c) <= hi for lo, hi in ranges) or any(rx.fullmatch(c) for rx in cats)
        return hit != negate

    return test


def compile_regex(src: str) -> Matcher:
    """Compile the supported regex subset (see the module docstring); SpecError otherwise."""
    try:
        tree = _sre.parse(src)
    except Exception as e:  # noqa: BLE001 - re.error, RecursionError, OverflowError on hostile text
        raise SpecError(f"invalid regex {src!r}: {e}") from None
    flags = tree.state.flags
    if flags & ~(_sc.SRE_FLAG_UNICODE | _sc.SRE_FLAG_DOTALL | _sc.SRE_FLAG_VERBOSE):
        raise _refuse(src, "an inline flag other than (?s) and (?x)")
    dotall = bool(flags & _sc.SRE_FLAG_DOTALL)
    groupindex = dict(tree.state.groupdict)
    names = list(groupindex)
    m = Matcher(names, [groupindex[n] for n in names])
    m.n_groups = tree.state.groups

    def seq(items: Any, nxt: int) -> int:
        for op, av in reversed(list(items)):
            nxt = one(op, av, nxt)
        return nxt

    def one(op: Any, av: Any, nxt: int) -> int:
        if op == _sc.LITERAL:
            return m.new(_CHAR, chr(av), (nxt,))
        if op == _sc.NOT_LITERAL:
            return m.new(_CHAR, _class_test(src, [(_sc.NEGATE, None), (_sc.LITERAL, av)]), (nxt,))
        if op == _sc.ANY:
            return m.new(_CHAR, (lambda c: True) if dotall else (lambda c: c != "\n"), (nxt,))
        if op == _sc.IN:
            return m.new(_CHAR, _class_test(src, list(av)), (nxt,))
        if op in (_sc.MAX_REPEAT, _sc.MIN_REPEAT):
            lo, hi, sub = av
            greedy = op == _sc.MAX_REPEAT
            if hi == _sc.MAXREPEAT:
                entry = loop = m.new(_SPLIT)
                body = seq(sub, loop)
                m.out[loop] = (body, nxt) if greedy else (nxt, body)
            else:
                if hi > MAX_STATES or lo > MAX_STATES:
                    raise SpecError(f"regex {src!r}: repeat count {hi} is too large to match")
                entry = nxt
                for _ in range(hi - lo):
                    s = m.new(_SPLIT)
                    body = seq(sub, entry)
                    m.out[s] = (body, nxt) if greedy else (nxt, body)
                    entry = s
            for _ in range(lo):
                entry = seq(sub, entry)
            return entry
        if op == _sc.SUBPATTERN:
            gid, add, remove, sub = av
            if add or remove:
                raise _refuse(src, "a scoped inline flag")
            if gid is None:
                return seq(sub, nxt)
            close = m.new(_SAVE, 2 * gid + 1, (nxt,))
            return m.new(_SAVE, 2 * gid, (seq(sub, close),))
        if op == _sc.BRANCH:
            return m.new(_SPLIT, None, tuple(seq(b, nxt) for b in av[1]))
        if op == _sc.AT:
            cond = {
                _sc.AT_BEGINNING: "bos",
                _sc.AT_BEGINNING_STRING: "bos",
                _sc.AT_END: "eol",
                _sc.AT_END_STRING: "eos",
            }.get(av)
            if cond is None:
                raise _refuse(src, "a word-boundary assertion (\\b, \\B)")
            return m.new(_ASSERT, cond, (nxt,))
        if op in (_sc.GROUPREF, getattr(_sc, "GROUPREF_EXISTS", None)):
            raise _refuse(src, "a back-reference")
        if op in (_sc.ASSERT, _sc.ASSERT_NOT):
            raise _refuse(src, "a look-around")
        if op in (getattr(_sc, "ATOMIC_GROUP", None), getattr(_sc, "POSSESSIVE_REPEAT", None)):
            raise _refuse(src, "an atomic group or possessive repeat")
        raise _refuse(src, str(op).lower())

    try:
        start = seq(tree, m.new(_MATCH))
    except RecursionError:
        raise SpecError(f"regex {src[:60]!r}...: nested too deeply") from None
    return m.finish(start)


__all__ = ["MAX_STATES", "Matcher", "compile_regex", "compile_template", "joined_regex"]
