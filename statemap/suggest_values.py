"""suggest from values: a draft spec built from content correspondences, checked before it is written.

When source and target hold the same weights, :func:`statemap.correspond.explain` says exactly where
every target tensor comes from. :func:`suggest_from_values` turns that into rules (``rename``,
``copy``, ``transpose``, ``split``, ``merge``, ``reshape``, ``cast``, ``inject``, ``drop``), folds
rules that differ only in layer indices into one rule with ``{i}`` placeholders (only where the
pattern matches exactly those keys), and falls back to :func:`statemap.suggest.suggest` (names and
shapes) for keys the values do not explain, saying so in each rule's ``note``. Then it plans the
draft on the source and runs it in memory, one tensor at a time, comparing every output with the
target bitwise: ``verified`` is True only if the draft reproduces the target exactly.

Rows reordered by a known pattern are drafted as one ``rearrange`` rule (:func:`known_rearrange`):
the rotary permutation between Meta's LLaMA (interleaved pairs) and HF (halves), either way, and
a fused q/k/v between per-head rows ``[h, 3, d]`` (GPT-NeoX, BLOOM) and q|k|v blocks, either way
(with the ``split`` or ``merge`` around it). Other row orders are listed, not drafted.

Example::

    >>> from statemap import open_checkpoint
    >>> with open_checkpoint("model.pt") as a, open_checkpoint("model.safetensors") as b:
    ...     s = suggest_from_values(a, b)
    ...     print(s.verified, len(s.rules))
    True ...
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .correspond import Correspondence, Explanation, explain
from .meta import TensorMeta

__all__ = ["ValueSuggestion", "known_rearrange", "suggest_from_values", "swap_pattern"]

_PH = "ijklmn"
_INT = re.compile(r"(?<![^.])\d+(?![^.])")


@dataclass
class _Draft:
    op: str
    body: dict[str, Any]
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    note: str
    order: int = 0
    extra: list[dict[str, Any]] = field(default_factory=list)  # in-place follow-ups (transpose, cast)


@dataclass
class ValueSuggestion:
    """The draft: spec rule mappings, whether they reproduce the target, and what was left out."""

    rules: list[dict[str, Any]]
    verified: bool
    problems: list[str]
    from_values: int
    from_names: int
    not_drafted: list[str]  # target keys no rule produces (with why)
    unmapped_sources: list[str]
    source_label: str = "source"
    target_label: str = "target"

    def spec_dict(self, name: str = "suggested") -> dict[str, Any]:
        return {
            "name": name,
            "version": 1,
            "description": f"DRAFT written by statemap suggest --values: {self.source_label} -> {self.target_label}",
            "source": self.source_label,
            "target": self.target_label,
            "strict": False,
            "rules": self.rules,
        }

    def to_yaml(self, name: str = "suggested") -> str:
        import yaml

        from .textsafe import show  # comment lines: a newline in a key must not start a YAML line

        head = [
            "# DRAFT spec written by `statemap suggest --values` from the tensor values of both checkpoints.",
            f"# source: {show(self.source_label, None)}",
            f"# target: {show(self.target_label, None)}",
            f"# {self.from_values} rule(s) from values, {self.from_names} from names and shapes (values gave no evidence).",
            "# check: "
            + (
                "planned on the source and run in memory, it reproduces the target BITWISE."
                if self.verified
                else "it does NOT reproduce the target:"
            ),
        ]
        head += [f"#   {show(p, None)}" for p in self.problems[:40]]
        body = yaml.safe_dump(self.spec_dict(name), sort_keys=False, default_flow_style=None, width=200, allow_unicode=True)
        tail = []
        if self.not_drafted:
            tail += ["", f"# Target keys not drafted ({len(self.not_drafted)}):"] + [
                f"#   {show(t, None)}" for t in self.not_drafted
            ]
        return "\n".join(head) + "\n" + body + ("\n".join(tail) + "\n" if tail else "")


def _dim(meta: TensorMeta, axis: str) -> int | None:
    """The real dim of a ``rows`` / ``cols`` piece axis, when the tensor is a plain matrix or vector."""
    if any(d == 1 for d in meta.shape) or len(meta.shape) > 2:
        return None
    return 0 if axis == "rows" else 1 if len(meta.shape) == 2 else None


def _literal_drafts(
    ex: Explanation, am: Mapping[str, TensorMeta], bm: Mapping[str, TensorMeta]
) -> tuple[list[_Draft], list[Correspondence]]:
    """One draft rule per A tensor used (or per merge / inject), and the correspondences left over."""
    drafts: list[_Draft] = []
    left: list[Correspondence] = []
    order = {k: i for i, k in enumerate(am)}
    whole: dict[str, list[Correspondence]] = {}
    pieces: dict[str, list[Correspondence]] = {}
    gathered: dict[str, list[Correspondence]] = {}
    for c in ex.b:
        if c.kind in ("same", "renamed", "tied", "swapped", "cast", "reshaped") and len(c.a) == 1 and not c.pieces:
            whole.setdefault(c.a[0], []).append(c)
        elif c.kind in ("split", "transposed") and len(c.pieces) == 1:
            pieces.setdefault(c.a[0], []).append(c)
        elif c.kind == "merged":
            p = c.pieces
            dim = _dim(bm[c.b], p[0].b_axis)
            if dim is None or any(x.a_axis != p[0].b_axis for x in p):
                left.append(c)
                continue
            body: dict[str, Any] = {"from": list(c.a), "to": c.b, "dim": dim}
            d = _Draft("merge", body, c.a, (c.b,), f"from values: {c.detail}", min(order[k] for k in c.a))
            _cast_after(d, c, bm)
            drafts.append(d)
        elif c.kind == "constant":
            m = bm[c.b]
            v = float(c.detail.split()[2])  # "every element V (...)"
            body = {"to": c.b, "shape": list(m.shape), "value": int(v) if v.is_integer() else v, "dtype": m.dtype}
            drafts.append(_Draft("inject", body, (), (c.b,), "from values: every element is this value", 10**9))
        elif c.kind == "permuted" and len(c.a) == 1 and (bt := _permuted_draft(c, am[c.a[0]], bm[c.b], order)):
            drafts.append(bt)
        elif c.kind == "gathered" and len(c.a) > 1 and (gd := _fused_merge_draft(c, am, bm, order)):
            drafts.append(gd)
        elif c.kind == "gathered" and len(c.a) == 1:
            gathered.setdefault(c.a[0], []).append(c)
        else:
            left.append(c)
    for ak, cs in gathered.items():
        gd = _fused_split_draft(ak, cs, am, bm, order)
        if gd is None:
            left += cs
        else:
            drafts.append(gd)
    for ak, cs in whole.items():
        targets = [c.b for c in cs]
        extras = sorted({c.detail.split("; ", 1)[-1] for c in cs if c.kind in ("cast", "reshaped") or "; " in c.detail})
        note = "from values: equal values" + (" (one source, several targets)" if len(cs) > 1 else "")
        note += "".join(f"; {x}" for x in extras)
        if len(cs) == 1 and targets[0] == ak:
            d = _Draft("keep", {"from": ak}, (ak,), (ak,), note, order[ak])
        elif len(cs) == 1:
            d = _Draft("rename", {"from": ak, "to": targets[0]}, (ak,), (targets[0],), note, order[ak])
        else:
            d = _Draft("copy", {"from": ak, "to": targets}, (ak,), tuple(targets), note, order[ak])
        for c in cs:
            if tuple(am[ak].shape) != tuple(bm[c.b].shape):
                d.extra.append({"reshape": {"from": c.b, "shape": list(bm[c.b].shape)}})
            _cast_after(d, c, bm)
        drafts.append(d)
    for ak, cs in pieces.items():
        a = am[ak]
        axes = {(c.pieces[0].a_axis, c.pieces[0].b_axis) for c in cs}
        if len(axes) != 1:
            left += cs
            continue
        a_axis, b_axis = axes.pop()
        dim = _dim(a, a_axis)
        cs = sorted(cs, key=lambda c: c.pieces[0].a_range[0])
        spans = [c.pieces[0].a_range for c in cs]
        total = a.shape[dim] if dim is not None else -1
        tiles = spans[0][0] == 0 and spans[-1][1] == total and all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
        if dim is None or not tiles:
            left += cs
            continue
        outs = tuple(c.b for c in cs)
        transposed = a_axis != b_axis
        first = cs[0]
        note = f"from values: {first.b} = {first.detail}" + (f"; and {len(cs) - 1} more blocks in order" if len(cs) > 1 else "")
        if len(cs) == 1:  # the whole tensor, transposed
            d = _Draft("transpose", {"from": ak, "to": outs[0]}, (ak,), outs, note, order[ak])
        else:
            body = {"from": ak, "to": list(outs), "dim": dim}
            sizes = [y - x for x, y in spans]
            if len(set(sizes)) > 1:
                body["sizes"] = sizes
            d = _Draft("split", body, (ak,), outs, note, order[ak])
            if transposed:
                d.extra += [{"transpose": {"from": t}} for t in outs]
        for c in cs:
            _cast_after(d, c, bm)
        drafts.append(d)
    for x in ex.a_left:
        drafts.append(_Draft("drop", {"from": x.a}, (x.a,), (), f"from values: no target holds it ({x.kind})", -1))
    return drafts, left


def swap_pattern(perm: Sequence[int]) -> tuple[int, int, int, int] | None:
    """``(a, b, c, e)`` when row ``i`` of B is row ``perm[i]`` of A and B is A's rows seen as
    ``[a, b, c, e]`` with the middle two swapped (einops ``(a b c e) -> (a c b e)``), with
    ``b, c >= 2``; else None. Found in one pass: ``e`` is the first run of consecutive rows,
    ``c * e`` the first step, ``b`` how many such steps follow.

    Example::

        >>> swap_pattern([0, 2, 4, 6, 1, 3, 5, 7])  # one head of 8, rotary halves from pairs
        (1, 4, 2, 1)
    """
    import numpy as np

    p = np.asarray(perm, dtype=np.int64)
    m = len(p)
    if m < 4 or p[0] != 0:
        return None
    e = 1
    while e < m and p[e] == e:
        e += 1
    if e == m:
        return None
    step = int(p[e])
    if step % e:
        return None
    c = step // e
    b = 1
    while b * e < m and p[b * e] == b * step:
        b += 1
    if b < 2 or c < 2 or m % (b * c * e):
        return None
    a = m // (b * c * e)
    if np.array_equal(p, np.arange(m).reshape(a, b, c, e).transpose(0, 2, 1, 3).reshape(-1)):
        return a, b, c, e
    return None


def known_rearrange(perm: Sequence[int], ndim: int) -> tuple[str, dict[str, int], str] | None:
    """A row order that a known pattern explains, as (``rearrange`` pattern, sizes, what it is):
    the rotary permutation between Meta's LLaMA layout (pairs) and HF's (halves), either way, and a
    fused q/k/v between per-head rows ``[h, 3, d]`` (GPT-NeoX, BLOOM) and q|k|v blocks, either way.

    Example::

        >>> known_rearrange([h * 8 + j for h in range(4) for j in (0, 2, 4, 6, 1, 3, 5, 7)], 2)
        ('(h d two) c -> (h two d) c', {'h': 4, 'two': 2}, 'rotary: interleaved pairs -> halves, per head')
    """
    found = swap_pattern(perm)
    if found is None:
        return None
    a, b, c, e = found
    rest = " c" if ndim == 2 else "".join(f" c{i}" for i in range(1, ndim))
    if e == 1 and c == 2:
        return f"(h d two){rest} -> (h two d){rest}", {"h": a, "two": 2}, "rotary: interleaved pairs -> halves, per head"
    if e == 1 and b == 2:
        return f"(h two d){rest} -> (h d two){rest}", {"h": a, "two": 2}, "rotary: halves -> interleaved pairs, per head"
    if a == 1 and c == 3 and e > 1:
        return f"(h three d){rest} -> (three h d){rest}", {"h": b, "three": 3}, "fused q/k/v: per head [h, 3, d] -> q|k|v blocks"
    if a == 1 and b == 3 and e > 1:
        return f"(three h d){rest} -> (h three d){rest}", {"h": c, "three": 3}, "fused q/k/v: q|k|v blocks -> per head [h, 3, d]"
    return None


def has_rearrange() -> bool:
    """The spec engine knows the ``rearrange`` op."""
    from .errors import StatemapError
    from .spec import load_spec

    try:
        load_spec(
            {
                "name": "probe",
                "version": 1,
                "rules": [{"rearrange": {"from": "x", "pattern": "(a b) -> (b a)", "sizes": {"a": 2}}}],
            }
        )
    except StatemapError:
        return False
    return True


def _rows_perm(c: Correspondence) -> list[int]:
    return [p.a_range[0] + j for p in c.pieces for j in range(p.b[1] - p.b[0])]


def _permuted_draft(c: Correspondence, a: TensorMeta, b: TensorMeta, order: Mapping[str, int]) -> _Draft | None:
    """B is A with its rows reordered by a known pattern: one ``rearrange`` rule (when the engine
    has it; else the reshape -> permute -> reshape of :func:`_blockwise_transpose`)."""
    if any(p.a_axis != "rows" or p.b_axis != "rows" for p in c.pieces) or tuple(a.shape) != tuple(b.shape):
        return None
    if not a.shape or any(d == 1 for d in a.shape):
        return None
    if has_rearrange():
        known = known_rearrange(_rows_perm(c), len(a.shape))
        if known is None:
            return None
        pattern, sizes, what = known
        body = {"from": c.a[0], "to": c.b, "pattern": pattern, "sizes": sizes}
        return _Draft("rearrange", body, c.a, (c.b,), f"from values: {what}: {c.detail}", order[c.a[0]])
    return _blockwise_transpose(c, a, b, order)


def _fused_split_draft(
    ak: str, cs: list[Correspondence], am: Mapping[str, TensorMeta], bm: Mapping[str, TensorMeta], order: Mapping[str, int]
) -> _Draft | None:
    """B tensors each gathered from row blocks of one A tensor, together all of it, in an order a
    known pattern explains (per-head q/k/v): ``rearrange`` A in place, then ``split`` it."""
    a = am[ak]
    if not has_rearrange() or not a.shape or any(d == 1 for d in a.shape):
        return None
    if any(p.a != ak or p.a_axis != "rows" or p.b_axis != "rows" for c in cs for p in c.pieces):
        return None
    if any(tuple(bm[c.b].shape[1:]) != tuple(a.shape[1:]) for c in cs):
        return None
    cs = sorted(cs, key=lambda c: c.pieces[0].a_range[0])
    perm = [r for c in cs for r in _rows_perm(c)]
    if sorted(perm) != list(range(a.shape[0])):
        return None
    known = known_rearrange(perm, len(a.shape))
    if known is None:
        return None
    pattern, sizes, what = known
    outs = [c.b for c in cs]
    split: dict[str, Any] = {"from": ak, "to": outs, "dim": 0}
    lengths = [bm[o].shape[0] for o in outs]
    if len(set(lengths)) > 1:
        split["sizes"] = lengths
    body = {"from": ak, "pattern": pattern, "sizes": sizes}
    note = f"from values: {what}, then split along dim 0 into the {len(outs)} targets below"
    return _Draft("rearrange", body, (ak,), tuple(outs), note, order[ak], [{"split": split}])


def _fused_merge_draft(
    c: Correspondence, am: Mapping[str, TensorMeta], bm: Mapping[str, TensorMeta], order: Mapping[str, int]
) -> _Draft | None:
    """B gathered from whole A tensors in an order a known pattern explains: ``merge`` them, then
    ``rearrange`` B in place."""
    b = bm[c.b]
    if not has_rearrange() or any(p.a_axis != "rows" or p.b_axis != "rows" for p in c.pieces):
        return None
    keys = sorted(c.a, key=lambda k: min(p.b[0] for p in c.pieces if p.a == k))
    if any(tuple(am[k].shape[1:]) != tuple(b.shape[1:]) for k in keys):
        return None
    offset, start = 0, {}
    for k in keys:
        start[k] = offset
        offset += am[k].shape[0]
    if offset != b.shape[0]:
        return None
    perm = [start[p.a] + p.a_range[0] + j for p in c.pieces for j in range(p.b[1] - p.b[0])]
    if sorted(perm) != list(range(offset)):
        return None
    known = known_rearrange(perm, len(b.shape))
    if known is None:
        return None
    pattern, sizes, what = known
    merge = {"from": keys, "to": c.b, "dim": 0}
    note = f"from values: merged, then {what}"
    return _Draft(
        "merge",
        merge,
        tuple(keys),
        (c.b,),
        note,
        min(order[k] for k in keys),
        [{"rearrange": {"from": c.b, "pattern": pattern, "sizes": sizes}}],
    )


def _blockwise_transpose(c: Correspondence, a: TensorMeta, b: TensorMeta, order: Mapping[str, int]) -> _Draft | None:
    """Rows reordered within blocks of ``k`` as a reshape to ``[m/k, k/g, g, ...]``, a swap of the
    two middle dims and a reshape back: the rotary permutation between Meta's LLaMA and HF
    (``g`` = 2) and its inverse (``g`` = head_dim/2) are such. None when the order is another one."""
    import numpy as np

    if any(p.a_axis != "rows" or p.b_axis != "rows" for p in c.pieces) or tuple(a.shape) != tuple(b.shape):
        return None
    if not a.shape or any(d == 1 for d in a.shape):
        return None
    perm = np.array([p.a_range[0] + j for p in c.pieces for j in range(p.b[1] - p.b[0])])
    m = a.shape[0]
    if len(perm) != m:
        return None
    for k in range(2, m + 1):
        if m % k:
            continue
        for g in range(2, k):
            if k % g:
                continue
            pattern = np.arange(k).reshape(k // g, g).T.reshape(-1)
            if np.array_equal(perm, (np.arange(m) // k) * k + np.tile(pattern, m // k)):
                split = [m // k, k // g, g, *a.shape[1:]]
                dims = [0, 2, 1, *range(3, len(split))]
                note = f"from values: {c.detail}: in each block of {k} rows, rows seen as [{k // g}, {g}] transposed"
                body = {"from": c.a[0], "to": c.b, "shape": split}
                extra = [{"permute": {"from": c.b, "dims": dims}}, {"reshape": {"from": c.b, "shape": list(b.shape)}}]
                return _Draft("reshape", body, c.a, (c.b,), note, order[c.a[0]], extra)
    return None


def _cast_after(d: _Draft, c: Correspondence, bm: Mapping[str, TensorMeta]) -> None:
    if c.cast or "(from " in c.detail and "exact)" in c.detail:
        d.extra.append({"cast": {"from": c.b, "dtype": bm[c.b].dtype}})


def _ints(key: str) -> list[str]:
    return _INT.findall(key)


def _templ(key: str, ints: list[str], vary: set[int]) -> str:
    """Replace dotted integer segments equal to a varying source index by its placeholder."""
    pos: dict[str, int] = {}
    for i, v in enumerate(ints):
        if i in vary:
            pos.setdefault(v, i)

    def sub(mo: re.Match[str]) -> str:
        i = pos.get(mo.group(0))
        return mo.group(0) if i is None else "{" + _PH[i] + "}"

    return _INT.sub(sub, key)


def _map_keys(body: Any, f: Any) -> Any:
    if isinstance(body, str):
        return f(body)
    if isinstance(body, list):
        return [_map_keys(x, f) for x in body]
    return body


_KEY_FIELDS = ("from", "to")


def _signature(d: _Draft) -> str:
    ints = _ints(d.sources[0])
    allpos = set(range(min(len(ints), len(_PH))))

    def gen(x: Any) -> Any:
        return _map_keys(x, lambda s: _templ(s, ints, allpos))

    body = {k: gen(v) for k, v in d.body.items()}
    extra = [{op: {k: gen(v) for k, v in b.items()} for op, b in e.items()} for e in d.extra]
    return repr((d.op, body, extra))


def _generalize(drafts: list[_Draft], a_keys: Iterable[str]) -> list[_Draft]:
    """Fold drafts that differ only in the layer indices of their keys into one rule with
    placeholders, where the folded source pattern matches exactly those source keys."""
    from .template import parse_pattern

    a_keys = list(a_keys)
    groups: dict[str, list[_Draft]] = {}
    for d in drafts:
        if not d.sources or d.op == "inject":
            groups.setdefault(f"#{id(d)}", []).append(d)
            continue
        groups.setdefault(_signature(d), []).append(d)
    out: list[_Draft] = []
    for members in groups.values():
        if len(members) == 1:
            out += members
            continue
        ints0 = _ints(members[0].sources[0])
        vary = {i for i in range(min(len(ints0), len(_PH))) if len({_ints(m.sources[0])[i] for m in members}) > 1}
        d0 = members[0]

        def gen(x: Any, ints0: list[str] = ints0, vary: set[int] = vary) -> Any:
            return _map_keys(x, lambda s: _templ(s, ints0, vary))

        body = {k: gen(v) if k in _KEY_FIELDS else v for k, v in d0.body.items()}
        pattern = body["from"][0] if isinstance(body["from"], list) else body["from"]
        try:
            pat = parse_pattern(pattern)
            matched = {k for k in a_keys if pat.match(k) is not None}
        except Exception:  # a key that is not a valid pattern: keep the literal rules
            matched = set()
        if matched != {m.sources[0] for m in members}:
            out += members
            continue
        extra = [{op: {k: gen(v) if k in _KEY_FIELDS else v for k, v in b.items()} for op, b in e.items()} for e in d0.extra]
        n = len(members)
        note = f"{d0.note} (x{n})" if len(d0.note) < 200 else d0.note
        sources = tuple(x for m in members for x in m.sources)
        targets = tuple(x for m in members for x in m.targets)
        out.append(_Draft(d0.op, body, sources, targets, note, min(m.order for m in members), extra))
    return out


def _rules(drafts: list[_Draft]) -> list[dict[str, Any]]:
    out = []
    for d in sorted(drafts, key=lambda d: d.order):
        if d.op == "keep" and not d.extra:
            continue  # passes through unchanged
        if d.op != "keep":
            out.append({d.op: {**d.body, "note": d.note}})
        out += d.extra
    return out


def _verify(rules: list[dict[str, Any]], a: Any, b: Any) -> tuple[bool, list[str], dict[int, str]]:
    """Plan the draft on A, run it in memory, compare with B bitwise. Returns (ok, problems,
    rule item -> problem)."""
    from .apply import run_node
    from .errors import StatemapError
    from .plan import make_plan
    from .spec import load_spec

    spec_dict = {"name": "draft", "version": 1, "rules": rules}
    item_of: list[int] = []  # Rule index - 1 -> rules item
    for i, r in enumerate(rules):
        try:
            n = len(load_spec({"name": "one", "version": 1, "rules": [r]}).rules)
        except StatemapError as e:
            return False, [f"rule {i + 1}: {e}"], {i: str(e)}
        item_of += [i] * n
    try:
        plan = make_plan(load_spec(spec_dict), a.metas.values(), a.tied_groups())
    except StatemapError as e:
        return False, [f"the draft does not plan on the source: {e}"], {}
    problems: list[str] = []
    bad: dict[int, str] = {}
    names = {o.name for o in plan.outputs}
    for k in b.metas:
        if k not in names:
            problems.append(f"{k}: not produced")
    for o in plan.outputs:
        item = item_of[o.rule.index - 1] if o.rule is not None else None
        if o.name not in b.metas:
            problems.append(f"{o.name}: produced, not in the target")
            if item is not None:
                bad.setdefault(item, f"{o.name} is not in the target")
            continue
        mb = b.metas[o.name]
        if tuple(mb.shape) != tuple(o.node.shape) or mb.dtype != o.node.dtype:
            why = f"{o.name}: {list(o.node.shape)} {o.node.dtype}, target {list(mb.shape)} {mb.dtype}"
        else:
            x, y = run_node(o.node, a.read), b.read(o.name)
            why = "" if x.tobytes() == y.tobytes() else f"{o.name}: values differ from the target"
            del x, y
        if why:
            problems.append(why)
            if item is not None:
                bad.setdefault(item, why)
    return not problems, problems, bad


def suggest_from_values(a: Any, b: Any) -> ValueSuggestion:
    """Draft a spec from opened checkpoints ``a`` (source) and ``b`` (target) by their values,
    fall back to names and shapes where values say nothing, and check the draft bitwise.

    Example::

        >>> with open_checkpoint("fairseq.pt") as a, open_checkpoint("hf.safetensors") as b:
        ...     s = suggest_from_values(a, b)
        ...     s.verified, s.from_values, s.from_names
        (True, 60, 0)
    """
    from .suggest import SuggestError, suggest

    ex = explain(a.metas, a.read, b.metas, b.read)
    drafts, left = _literal_drafts(ex, a.metas, b.metas)
    drafts = _generalize(drafts, a.metas)
    rules = _rules(drafts)
    n_values = sum(1 for r in rules if "note" in next(iter(r.values())))
    # names and shapes for what the values do not explain
    used_a = {s for d in drafts for s in d.sources}
    made_b = {t for d in drafts for t in d.targets}
    not_drafted = [
        f"{c.b}: {c.kind}: {c.detail}"
        + ("; no known row order (rotary, per-head q/k/v) fits: write its `rearrange` by hand" if c.kind == "permuted" else "")
        for c in left
        if c.kind == "permuted"
    ]
    rest_a = [m for k, m in a.metas.items() if k not in used_a]
    rest_b = [m for k, m in b.metas.items() if k not in made_b and not any(k == c.b and c.kind == "permuted" for c in left)]
    n_names = 0
    if rest_a and rest_b:
        try:
            s = suggest(rest_a, rest_b)
        except SuggestError:
            s = None
        if s is not None:
            for r in s.spec_dict(accept=True)["rules"]:  # the bitwise check below is the verification
                body = next(iter(r.values()))
                if isinstance(body, dict):
                    body["note"] = "from names and shapes (values gave no evidence): " + str(body.get("note", ""))
                rules.append(r)
                n_names += 1
            not_drafted += [f"{k.describe()}: no source fits by value, name or shape" for k in s.unmapped_targets]
    elif rest_b:
        not_drafted += [f"{m.name}: no source holds these values" for m in rest_b]
    ok, problems, bad = _verify(rules, a, b)
    for i, why in bad.items():
        body = next(iter(rules[i].values()))
        if isinstance(body, dict):
            body["note"] = f"NOT REPRODUCED ({why}); " + str(body.get("note", ""))
    return ValueSuggestion(rules, ok, problems, n_values, n_names, not_drafted, [m.name for m in rest_a], a.path, b.path)
