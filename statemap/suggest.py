"""suggest: draft a spec from two layouts (names, shapes, dtypes only; no tensor is read).

Given the metadata of a source checkpoint and of a target layout, :func:`suggest` aligns
the two and proposes rules, one per tensor *kind* (layer indices folded into ``{i}``):

* keys are cut into tokens (on ``.``, ``_``, camelCase and letter/digit boundaries) and
  compared with a small table of synonyms and abbreviations (``attn`` ~ ``attention``,
  ``ln`` ~ ``norm``, ``q`` ~ ``query``, ``fc`` ~ ``dense``), tokens common to every key
  (``model``, ``roberta``) weighing little;
* layered blocks (``encoder.layers.{i}``, ``blocks.{i}``) are paired first, by their prefix
  tokens and by how well their kinds match; kinds are then matched inside paired blocks;
* shapes decide the op: equal -> ``rename``; a reversed matrix -> ``transpose`` (and square
  matrices follow the majority of their block, so GPT-2 Conv1D ``c_proj [d, d]`` is
  transposed with its ``[d, 4d]`` siblings); equal element count with the same non-1 dims ->
  ``reshape``; a fused tensor whose dim is the sum of sibling targets -> ``split``
  (``qkv [3d, d]`` -> ``query/key/value [d, d]``, Conv1D ``c_attn [d, 3d]`` -> transpose +
  split), and the reverse -> ``merge``; a target left over with the shape of a source
  already used -> ``copy`` (tied embeddings);
* ties between equal shapes and names are broken by order (the rank of a kind among the
  kinds of its block with the same shape).

Each rule gets a confidence in [0, 1], written into its ``note``. What could not be mapped
is listed as YAML comments. The draft is a valid spec (``statemap.load_spec``) and plans
against the source; it is a starting point to review, not a proof.

Example::

    >>> from statemap.meta import TensorMeta as T
    >>> src = [T("encoder.layers.0.fc1.weight", (8, 4), "float32"),
    ...        T("encoder.layers.1.fc1.weight", (8, 4), "float32")]
    >>> tgt = [T("model.encoder.layers.0.fc1.weight", (8, 4), "float32"),
    ...        T("model.encoder.layers.1.fc1.weight", (8, 4), "float32")]
    >>> s = suggest(src, tgt)
    >>> [(r.op, r.sources, r.targets) for r in s.rules]
    [('rename', ('encoder.layers.{i}.fc1.weight',), ('model.encoder.layers.{i}.fc1.weight',))]
    >>> print(s.to_yaml(name="draft").splitlines()[0])
    # DRAFT spec written by `statemap suggest`: review every rule before use.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import StatemapError
from .meta import TensorMeta

__all__ = ["SuggestError", "SuggestedRule", "Suggestion", "suggest", "suggest_files"]

PLACEHOLDERS = "ijklmn"
MAX_FAMILY = 8  # siblings considered for one split/merge


class SuggestError(StatemapError):
    """The inputs to ``statemap suggest`` cannot be aligned (empty layout, bad listing, ...)."""


# -- tokens ------------------------------------------------------------------------------------

# canonical spellings: tokens that mean the same thing in different frameworks
_SYNONYMS = {
    "query": "q",
    "key": "k",
    "value": "v",
    "attention": "attn",
    "att": "attn",
    "ln": "norm",
    "layernorm": "norm",
    "layrnorm": "norm",
    "norm": "norm",
    "embedding": "embed",
    "embeddings": "embed",
    "emb": "embed",
    "position": "pos",
    "positional": "pos",
    "projection": "proj",
    "dense": "fc",
    "linear": "fc",
    "gamma": "weight",
    "kernel": "weight",
    "beta": "bias",
    "classifier": "head",
    "tok": "token",
    "tokens": "token",
    "out": "output",
}
_WEIGHT_ROLES = {"weight": "w", "gamma": "w", "kernel": "w", "bias": "b", "beta": "b"}
_BUFFER_ROLES = {"running_mean", "running_var", "num_batches_tracked"}
_FUSED_HINTS = {
    "qkv",
    "kv",
    "in_proj",
    "c_attn",
    "fused",
    "qkv_proj",
    "in_proj_weight",
    "in_proj_bias",
    "wqkv",
    "query_key_value",
}
_QKV_ORDER = {"q": 0, "k": 1, "v": 2}

_SPLIT_RE = re.compile(r"[._]+")
_CAMEL_RE = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])")


def tokens_of(name: str) -> list[str]:
    """``encoder.layers.{i}.self_attn.LayerNorm.weight`` -> encoder layers self attn layer norm weight."""
    out: list[str] = []
    for seg in name.split("."):
        if seg.isdigit() or (seg.startswith("{") and seg.endswith("}")):
            continue  # a layer index, not a name
        for part in _SPLIT_RE.split(seg):
            out.extend(t.lower() for t in _CAMEL_RE.split(part) if t)
    return out


def token_similarity(a: str, b: str) -> float:
    """1 equal; 0.9 synonyms; 0.7 one abbreviates the other (``attn``/``attention``); 0.6 shared stem."""
    if a == b:
        return 1.0
    if a.isdigit() or b.isdigit():
        return 0.0
    if _SYNONYMS.get(a, a) == _SYNONYMS.get(b, b):
        return 0.9
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    if len(short) >= 2 and short[0] == long_[0] and _is_subsequence(short, long_):
        return 0.7
    common = len(os.path.commonprefix([a, b]))
    if common >= 3 and common >= 0.5 * len(short):
        return 0.6
    return 0.0


def _is_subsequence(short: str, long_: str) -> bool:
    it = iter(long_)
    return all(c in it for c in short)


# -- kinds: keys with their layer indices folded -----------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One tensor kind: ``encoder.layers.{i}.fc1.weight`` and the keys it stands for."""

    pattern: str  # with {i}, {j} ... in place of numeric segments
    shape: tuple[int, ...]
    dtype: str
    keys: tuple[str, ...]
    instances: tuple[tuple[int, ...], ...]  # the index values, one tuple per key
    order: int  # position of the first key in its layout
    tokens: tuple[str, ...]

    @property
    def n_holes(self) -> int:
        return len(self.instances[0]) if self.instances else 0

    @property
    def scope(self) -> str:
        """The block the kind lives in: the pattern up to its first placeholder ('' at the top)."""
        if not self.n_holes:
            return ""
        return self.pattern[: self.pattern.index("{") + 3]

    @property
    def last(self) -> str:
        return self.pattern.rsplit(".", 1)[-1]

    def describe(self) -> str:
        n = f" (x{len(self.keys)})" if len(self.keys) > 1 else ""
        return f"{self.pattern} {list(self.shape)}{n}"


def fold_kinds(metas: Iterable[TensorMeta]) -> list[Kind]:
    """Group keys that differ only in their numeric segments; keep the layout's order."""
    groups: dict[str, list[tuple[int, TensorMeta, tuple[int, ...]]]] = {}
    for n, m in enumerate(metas):
        segs = m.name.split(".")
        idx: list[int] = []
        out: list[str] = []
        for s in segs:
            if s.isdigit() and len(idx) < len(PLACEHOLDERS):
                out.append("{" + PLACEHOLDERS[len(idx)] + "}")
                idx.append(int(s))
            else:
                out.append(s)
        groups.setdefault(".".join(out), []).append((n, m, tuple(idx)))
    kinds: list[Kind] = []
    for pattern, members in groups.items():
        shapes = {m.shape for _, m, _ in members}
        if len(shapes) > 1:  # shapes differ per layer: one kind per key, names literal
            kinds.extend(_kind(m.name, [(n, m, ())]) for n, m, _ in members)
        else:
            kinds.append(_kind(pattern, members))
    kinds.sort(key=lambda k: k.order)
    return kinds


def _kind(pattern: str, members: list[tuple[int, TensorMeta, tuple[int, ...]]]) -> Kind:
    first = members[0][1]
    return Kind(
        pattern=pattern,
        shape=tuple(first.shape),
        dtype=first.dtype,
        keys=tuple(m.name for _, m, _ in members),
        instances=tuple(i for _, _, i in members),
        order=members[0][0],
        tokens=tuple(tokens_of(pattern)),
    )


def _idf(kinds: list[Kind]) -> dict[str, float]:
    df: Counter[str] = Counter()
    for k in kinds:
        df.update(set(k.tokens))
    n = max(len(kinds), 1)
    return {t: math.log(1 + n / c) for t, c in df.items()}


def name_similarity(a: Kind, b: Kind, idf_a: Mapping[str, float], idf_b: Mapping[str, float]) -> float:
    """IDF-weighted soft token overlap, averaged over both directions (0..1)."""

    def cover(x: tuple[str, ...], y: tuple[str, ...], idf: Mapping[str, float]) -> float:
        if not x:
            return 0.0
        total = sum(idf.get(t, 1.0) for t in x)
        got = sum(idf.get(t, 1.0) * max((token_similarity(t, u) for u in y), default=0.0) for t in x)
        return got / total if total else 0.0

    return 0.5 * (cover(a.tokens, b.tokens, idf_a) + cover(b.tokens, a.tokens, idf_b))


# -- shapes ------------------------------------------------------------------------------------


def shape_relation(src: tuple[int, ...], tgt: tuple[int, ...]) -> tuple[str, float] | None:
    """How a 1 -> 1 rule turns ``src`` into ``tgt``: (op, evidence), or None."""
    if src == tgt:
        return "rename", 1.0
    if len(src) == 2 and src == tgt[::-1]:
        return "transpose", 0.95
    if math.prod(src) == math.prod(tgt) and [d for d in src if d != 1] == [d for d in tgt if d != 1]:
        return "reshape", 0.8
    return None


def _roles_clash(a: Kind, b: Kind) -> bool:
    ra, rb = _WEIGHT_ROLES.get(a.last.lower()), _WEIGHT_ROLES.get(b.last.lower())
    if ra and rb and ra != rb:
        return True
    buf_a, buf_b = a.last in _BUFFER_ROLES, b.last in _BUFFER_ROLES
    return (buf_a or buf_b) and a.last != b.last


def _index_map(a: Kind, b: Kind) -> tuple[int, ...] | None:
    """Offsets per placeholder that turn ``a``'s indices into ``b``'s (all zeros: same), or None."""
    if a.n_holes != b.n_holes or len(a.instances) != len(b.instances):
        return None
    if set(a.instances) == set(b.instances):
        return (0,) * a.n_holes
    sa, sb = sorted(a.instances), sorted(b.instances)
    offsets = tuple(sb[0][h] - sa[0][h] for h in range(a.n_holes))
    if all(tuple(x + o for x, o in zip(ia, offsets)) == ib for ia, ib in zip(sa, sb)):
        return offsets
    return None


# -- the result --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuggestedRule:
    """One proposed rule over kinds. ``to_spec_rules`` turns it into spec rule mappings."""

    op: str  # rename | transpose | reshape | split | merge | copy
    sources: tuple[str, ...]  # patterns
    targets: tuple[str, ...]  # templates
    confidence: float
    reason: str
    dim: int = 0
    sizes: tuple[int, ...] = ()  # split: chunk sizes when unequal
    transpose: bool = False  # split/merge/copy: transpose as well
    shape: tuple[int, ...] = ()  # reshape: the target shape
    transpose_targets: tuple[str, ...] = ()  # copy: targets that need a transpose
    verify: str = ""  # non-empty: no name evidence; the rule is left out of the draft unless accepted

    @property
    def note(self) -> str:
        if self.verify:
            return f"VERIFY (confidence {self.confidence:.2f}): {self.verify}; {self.reason}"
        return f"confidence {self.confidence:.2f}: {self.reason}"

    def accepted_by(self, accept: bool | Iterable[str]) -> bool:
        """Active in the draft: not marked for verification, or accepted (``True``: all; else
        glob patterns matched against the rule's source and target patterns)."""
        import fnmatch

        if not self.verify or accept is True:
            return True
        if accept is False:
            return False
        pats = list(accept)
        return any(fnmatch.fnmatchcase(k, p) for p in pats for k in (*self.sources, *self.targets))

    def to_spec_rules(self) -> list[dict[str, Any]]:
        note = self.note
        src, tgt = self.sources, self.targets
        if self.op == "rename":
            return [{"rename": {"from": src[0], "to": tgt[0], "note": note}}]
        if self.op == "transpose":
            return [{"transpose": {"from": src[0], "to": tgt[0], "note": note}}]
        if self.op == "reshape":
            return [{"reshape": {"from": src[0], "to": tgt[0], "shape": list(self.shape), "note": note}}]
        if self.op == "split":
            out: list[dict[str, Any]] = []
            if self.transpose:
                out.append({"transpose": {"from": src[0], "note": "transposed before the split below"}})
            body: dict[str, Any] = {"from": src[0], "to": list(tgt), "dim": self.dim}
            if self.sizes:
                body["sizes"] = list(self.sizes)
            body["note"] = note
            out.append({"split": body})
            return out
        if self.op == "merge":
            out = [{"merge": {"from": list(src), "to": tgt[0], "dim": self.dim, "note": note}}]
            if self.transpose:
                out.append({"transpose": {"from": tgt[0], "note": "transposed after the merge above"}})
            return out
        if self.op == "copy":
            out = [{"copy": {"from": src[0], "to": list(tgt), "note": note}}]
            for t in self.transpose_targets:
                out.append({"transpose": {"from": t, "note": "this copy is transposed"}})
            return out
        raise AssertionError(self.op)


@dataclass
class Suggestion:
    """A draft spec: the rules, what was left unmapped, and per-rule confidence."""

    rules: list[SuggestedRule]
    unmapped_sources: list[Kind]
    unmapped_targets: list[Kind]
    source_label: str = "source"
    target_label: str = "target"
    n_source_keys: int = 0
    n_target_keys: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def confidence(self) -> dict[int, float]:
        """Rule number (1-based, in file order) -> confidence."""
        return {n: r.confidence for n, r in enumerate(self.rules, 1)}

    @property
    def to_verify(self) -> list[SuggestedRule]:
        """Rules the names and shapes do not support (square-matrix coincidences, fused layouts
        with several known row orders, rotary q/k): left out of the draft unless accepted."""
        return [r for r in self.rules if r.verify]

    def spec_dict(self, name: str = "suggested", accept: bool | Iterable[str] = False) -> dict[str, Any]:
        """The draft as a spec mapping: rules marked for verification only when ``accept``ed."""
        rules: list[dict[str, Any]] = []
        for r in self.rules:
            if r.accepted_by(accept):
                rules.extend(r.to_spec_rules())
        return {
            "name": name,
            "version": 1,
            "description": f"DRAFT written by statemap suggest: {self.source_label} -> {self.target_label}",
            "source": self.source_label,
            "target": self.target_label,
            "strict": False,
            "rules": rules,
        }

    def to_yaml(self, name: str = "suggested", accept: bool | Iterable[str] = False) -> str:
        """The whole draft file: a header, the spec, and what could not be mapped, as comments.

        A rule marked for verification and not accepted stays in its place as YAML comments:
        applying the draft leaves its targets unproduced (``--expect`` reports them missing)."""
        import yaml

        from .textsafe import show  # comment lines: a newline in a key must not start a YAML line

        accept = accept if isinstance(accept, bool) else list(accept)
        held = [r for r in self.rules if not r.accepted_by(accept)]
        taken = [r for r in self.rules if r.verify and r.accepted_by(accept)]
        head = [
            "# DRAFT spec written by `statemap suggest`: review every rule before use.",
            f"# source: {show(self.source_label, None)} ({self.n_source_keys} keys)",
            f"# target: {show(self.target_label, None)} ({self.n_target_keys} keys)",
            f"# {len(self.rules)} suggested rule(s); each note gives a confidence in [0, 1] and the evidence.",
        ]
        if held:
            head.append(
                f"# {len(held)} rule(s) marked VERIFY are commented out (not applied): names and shapes do not decide them."
            )
            head.append("# Check each (e.g. `statemap suggest SOURCE TARGET --values` on checkpoints holding the same weights,")
            head.append("# or the converted model's outputs), then uncomment it or rerun with --accept [PATTERN].")
        if taken:
            head.append(f"# {len(taken)} rule(s) marked VERIFY were accepted (--accept) without evidence in the names.")
        head.append("# Check it with: statemap check THIS.yaml --against SOURCE, then apply with --expect TARGET.")
        head += [f"# {show(n, None)}" for n in self.notes]
        spec = self.spec_dict(name, accept=True)
        spec["rules"] = []
        top = yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=200, allow_unicode=True)
        top = top.replace("rules: []\n", "rules:\n")
        lines: list[str] = []
        for r in self.rules:
            items = yaml.safe_dump(r.to_spec_rules(), sort_keys=False, default_flow_style=None, width=200, allow_unicode=True)
            if r.accepted_by(accept):
                lines += items.splitlines()
            else:
                lines += ["# " + x for x in items.splitlines()]
        body = top + "\n".join(lines) + ("\n" if lines else "")
        if not any(r.accepted_by(accept) for r in self.rules):
            body = body.replace("rules:\n", "rules: []\n", 1)
        tail: list[str] = []
        if self.unmapped_sources:
            tail.append("")
            tail.append(f"# Source kinds not mapped ({len(self.unmapped_sources)}): they pass through unchanged")
            tail.append("# unless you drop them, e.g. `- drop: [...]`:")
            tail += [f"#   {show(k.describe(), None)}" for k in self.unmapped_sources]
        if self.unmapped_targets:
            tail.append("")
            tail.append(
                f"# Target kinds not produced ({len(self.unmapped_targets)}): no source fits; inject or map them by hand:"
            )
            tail += [f"#   {show(k.describe(), None)}" for k in self.unmapped_targets]
        return "\n".join(head) + "\n" + body + ("\n".join(tail) + "\n" if tail else "")


# -- matching ----------------------------------------------------------------------------------


@dataclass
class _Edge:
    score: float
    op: str
    sources: tuple[Kind, ...]
    targets: tuple[Kind, ...]
    name_sim: float
    offsets: tuple[int, ...]
    dim: int = 0
    transpose: bool = False
    ambiguous: bool = False  # square matrices: transposed or not is decided by the block's vote
    why: str = ""
    verify: str = ""  # why the names do not support this edge (empty: they do, or shapes do)


class _Matcher:
    def __init__(self, source: list[Kind], target: list[Kind]):
        self.src, self.tgt = source, target
        self.idf_s, self.idf_t = _idf(source), _idf(target)
        self._sim: dict[tuple[str, str], float] = {}
        self.rank_s, self.rank_t = _ranks(source), _ranks(target)
        self.scope_pair: dict[str, str] = {}

    def sim(self, a: Kind, b: Kind) -> float:
        key = (a.pattern, b.pattern)
        if key not in self._sim:
            self._sim[key] = name_similarity(a, b, self.idf_s, self.idf_t)
        return self._sim[key]

    # blocks ----------------------------------------------------------------------------
    def pair_scopes(self) -> None:
        """Pair layered blocks (``blocks.{i}`` <-> ``vit.encoder.layer.{i}``), best first."""
        by_s: dict[str, list[Kind]] = defaultdict(list)
        by_t: dict[str, list[Kind]] = defaultdict(list)
        for k in self.src:
            if k.scope:
                by_s[k.scope].append(k)
        for k in self.tgt:
            if k.scope:
                by_t[k.scope].append(k)
        cands: list[tuple[float, str, str]] = []
        for ss, ks in by_s.items():
            for ts, kt in by_t.items():
                n_s = {i[0] for k in ks for i in k.instances}
                n_t = {i[0] for k in kt for i in k.instances}
                if len(n_s) != len(n_t):
                    continue
                fits = []
                for a in ks:
                    best = 0.0
                    for b in kt:
                        if shape_relation(a.shape, b.shape) and not _roles_clash(a, b):
                            best = max(best, self.sim(a, b))
                    fits.append(best)
                prefix = self._prefix_sim(ss, ts)
                shape_overlap = _multiset_overlap([k.shape for k in ks], [k.shape for k in kt])
                cands.append((0.4 * sum(fits) / len(fits) + 0.3 * shape_overlap + 0.3 * prefix, ss, ts))
        used_t: set[str] = set()
        for _, ss, ts in sorted(cands, reverse=True):
            if ss in self.scope_pair or ts in used_t:
                continue
            self.scope_pair[ss] = ts
            used_t.add(ts)

    def _prefix_sim(self, a: str, b: str) -> float:
        ka = Kind(a, (), "", (), (), 0, tuple(tokens_of(a)))
        kb = Kind(b, (), "", (), (), 0, tuple(tokens_of(b)))
        return name_similarity(ka, kb, self.idf_s, self.idf_t) if ka.tokens and kb.tokens else 0.5

    def same_block(self, a: Kind, b: Kind) -> float:
        if not a.scope and not b.scope:
            return 1.0
        if a.scope and b.scope:
            return 1.0 if self.scope_pair.get(a.scope) == b.scope else 0.0
        return 0.0

    # edges -----------------------------------------------------------------------------
    def one_to_one(self) -> list[_Edge]:
        edges = []
        shape_count_s = Counter((k.scope, _shape_sig(k.shape)) for k in self.src)
        shape_count_t = Counter((k.scope, _shape_sig(k.shape)) for k in self.tgt)
        for a in self.src:
            for b in self.tgt:
                block = self.same_block(a, b)
                if block == 0.0:
                    continue
                rel = shape_relation(a.shape, b.shape)
                if rel is None or _roles_clash(a, b):
                    continue
                offsets = _index_map(a, b)
                if offsets is None:
                    continue
                op, evidence = rel
                unique = shape_count_s[(a.scope, _shape_sig(a.shape))] == 1 and shape_count_t[(b.scope, _shape_sig(b.shape))] == 1
                sim = self.sim(a, b)
                order = 1.0 - abs(self.rank_s[a.pattern] - self.rank_t[b.pattern])
                same_indices = 1.0 if not any(offsets) else 0.8
                score = 0.5 * sim + 0.3 * evidence * (1.0 if unique else 0.5) + 0.1 * order + 0.1 * same_indices
                score += 0.05 * _segment_overlap(a, b)  # fc1.weight beats fc1_weight for fc1.weight
                square = len(a.shape) == 2 and a.shape[0] == a.shape[1]
                edges.append(
                    _Edge(
                        score,
                        op,
                        (a,),
                        (b,),
                        sim,
                        offsets,
                        ambiguous=square and op == "rename",
                        why="unique shape" if unique else "",
                    )
                )
        return edges

    def fused(self) -> list[_Edge]:
        """Split edges (one source -> sibling targets) and merge edges (siblings -> one target)."""
        edges: list[_Edge] = []
        for a in self.src:
            for fam in _families(self.tgt):
                edges.extend(self._fused_edges(a, fam, split=True))
        for b in self.tgt:
            for fam in _families(self.src):
                edges.extend(self._fused_edges(b, fam, split=False))
        return edges

    def _fused_edges(self, whole: Kind, family: list[Kind], split: bool) -> list[_Edge]:
        parts = [k for k in family if len(k.shape) == len(whole.shape) and not _roles_clash(whole, k)]
        parts = [k for k in parts if (self.same_block(whole, k) if split else self.same_block(k, whole))]
        if len(parts) < 2:
            return []
        out: list[_Edge] = []
        views = [(whole.shape, False)]
        if len(whole.shape) == 2 and whole.shape[0] != whole.shape[1]:
            views.append((whole.shape[::-1], True))
        for shape, transposed in views:
            for dim in range(len(shape)):
                fit = [
                    k
                    for k in parts
                    if all(k.shape[d] == shape[d] for d in range(len(shape)) if d != dim) and k.shape[dim] < shape[dim]
                ]
                for size in range(len(fit), 1, -1):
                    for combo in itertools.combinations(fit, size):
                        if sum(k.shape[dim] for k in combo) != shape[dim]:
                            continue
                        offsets = [_index_map(whole, k) if split else _index_map(k, whole) for k in combo]
                        if any(o is None for o in offsets) or len(set(offsets)) != 1:
                            continue
                        out.append(self._fused_edge(whole, list(combo), dim, transposed, offsets[0], split))  # type: ignore[arg-type]
                    if out:
                        break
        return out

    def _fused_edge(
        self, whole: Kind, parts: list[Kind], dim: int, transposed: bool, offsets: tuple[int, ...], split: bool
    ) -> _Edge:
        distinct = _distinct_tokens(parts)
        parts = _order_parts(parts, distinct)
        distinct = _distinct_tokens(parts)
        initials = "".join(_SYNONYMS.get(d, d)[:1] for d in distinct)
        whole_tokens = set(whole.tokens) | {"_".join(whole.tokens[i : i + 2]) for i in range(len(whole.tokens))}
        canon = {_SYNONYMS.get(d, d) for d in distinct}
        is_qkv = canon in ({"q", "k", "v"}, {"k", "v"})
        bonus = 0.0
        if initials and (initials in whole_tokens or any(t.startswith(initials) for t in whole.tokens)):
            bonus = 1.0  # qkv -> q, k, v
        elif whole_tokens & _FUSED_HINTS:
            bonus = 0.9 if is_qkv else 0.4  # in_proj -> q_proj, k_proj, v_proj (not out_proj)
        sims = [self.sim(whole, p) if split else self.sim(p, whole) for p in parts]
        sim = sum(sims) / len(sims)
        # an out-of-family part (out_proj among q/k/v) lowers the score through `bonus`
        score = 0.5 * sim + 0.3 + 0.2 * bonus
        kind = "split" if split else "merge"
        why = f"{'+'.join(str(p.shape[dim]) for p in parts)} = {whole.shape[dim] if not transposed else whole.shape[::-1][dim]} along dim {dim}"
        return _Edge(
            score,
            kind,
            (whole,) if split else tuple(parts),
            tuple(parts) if split else (whole,),
            sim,
            offsets,
            dim=dim,
            transpose=transposed,
            why=why,
        )


def _segment_overlap(a: Kind, b: Kind) -> float:
    """Share of the target's segments (after its block) found verbatim in the source's."""
    sa = set(a.pattern[len(a.scope) :].split("."))
    sb = [x for x in b.pattern[len(b.scope) :].split(".") if x]
    return sum(x in sa for x in sb) / len(sb) if sb else 0.0


def _shape_sig(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(shape)) if len(shape) == 2 else shape


def _multiset_overlap(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> float:
    ca, cb = Counter(map(_shape_sig, a)), Counter(map(_shape_sig, b))
    return sum((ca & cb).values()) / max(len(a), len(b), 1)


def _ranks(kinds: list[Kind]) -> dict[str, float]:
    """Rank of each kind among the kinds of its block with the same shape and role, in 0..1."""
    groups: dict[tuple[str, tuple[int, ...], str], list[Kind]] = defaultdict(list)
    for k in kinds:
        groups[(k.scope, _shape_sig(k.shape), _WEIGHT_ROLES.get(k.last.lower(), k.last))].append(k)
    out: dict[str, float] = {}
    for members in groups.values():
        for n, k in enumerate(members):
            out[k.pattern] = n / (len(members) - 1) if len(members) > 1 else 0.5
    return out


def _families(kinds: list[Kind]) -> list[list[Kind]]:
    """Sibling kinds: patterns equal but for one segment (``{q,k,v}_proj.weight``, ``query/key/value``)."""
    groups: dict[tuple[str, int], list[Kind]] = defaultdict(list)
    for k in kinds:
        segs = k.pattern.split(".")
        for n in range(len(segs) - 1):  # never the last segment (weight/bias)
            groups[(".".join(segs[:n] + ["*"] + segs[n + 1 :]), n)].append(k)
    return [g[:MAX_FAMILY] for g in groups.values() if len(g) >= 2]


def _distinct_tokens(parts: list[Kind]) -> list[str]:
    """The segment that tells siblings apart, first token of each: q_proj -> q, query -> query."""
    segs = [p.pattern.split(".") for p in parts]
    for n in range(len(segs[0])):
        vals = [s[n] for s in segs]
        if len(set(vals)) == len(vals):
            return [(tokens_of(v) or [v])[0] for v in vals]
    return [""] * len(parts)


def _order_parts(parts: list[Kind], distinct: list[str]) -> list[Kind]:
    """q, k, v (query, key, value) in that order when the names say so; else layout order."""
    canon = [_SYNONYMS.get(d, d) for d in distinct]
    if all(c in _QKV_ORDER for c in canon):
        return [p for _, p in sorted(zip(canon, parts), key=lambda x: _QKV_ORDER[x[0]])]
    return sorted(parts, key=lambda k: k.order)


# -- templates -----------------------------------------------------------------------------------


def _target_template(pattern: str, offsets: tuple[int, ...]) -> str:
    """Target kind pattern -> template; a constant index offset becomes ``{i+6}`` / ``{i-2}``."""
    for h, off in enumerate(offsets):
        if off:
            name = PLACEHOLDERS[h]
            pattern = pattern.replace("{" + name + "}", "{" + f"{name}{'+' if off > 0 else '-'}{abs(off)}" + "}")
    return pattern


# -- the algorithm -------------------------------------------------------------------------------


def suggest(
    source_metas: Iterable[TensorMeta],
    target_metas: Iterable[TensorMeta],
    source_label: str = "source",
    target_label: str = "target",
) -> Suggestion:
    """Align two layouts and propose a draft spec; see the module docstring for how.

    ``source_metas`` / ``target_metas``: :class:`TensorMeta` (a target listing may leave
    ``dtype`` empty). Raises :class:`SuggestError` when a layout is empty.
    """
    src_list, tgt_list = list(source_metas), list(target_metas)
    if not src_list:
        raise SuggestError(f"{source_label}: has no tensors; nothing to align")
    if not tgt_list:
        raise SuggestError(f"{target_label}: has no tensors; nothing to align to")
    src, tgt = fold_kinds(src_list), fold_kinds(tgt_list)
    m = _Matcher(src, tgt)
    m.pair_scopes()

    one = m.one_to_one()
    fused = m.fused()
    chosen = _assign(src, tgt, one + fused, {})
    # second pass: a module maps as a whole (a bias goes where its weight went)
    chosen = _assign(src, tgt, one + fused, _module_votes(chosen))
    used_s = {k.pattern for e in chosen for k in e.sources}
    used_t = {k.pattern for e in chosen for k in e.targets}

    # a target still missing with the shape of a source already used: copy it (tied weights)
    copies: dict[str, list[tuple[Kind, float, str]]] = defaultdict(list)
    src_by_pattern = {k.pattern: k for k in src}
    for b in tgt:
        if b.pattern in used_t:
            continue
        best: tuple[float, Kind, str] | None = None
        fits = 0
        for a in src:
            if a.pattern not in used_s or not m.same_block(a, b):
                continue
            rel = shape_relation(a.shape, b.shape)
            if rel is None or rel[0] == "reshape" or _roles_clash(a, b) or _index_map(a, b) != (0,) * a.n_holes:
                continue
            fits += 1
            s = m.sim(a, b)
            if best is None or s > best[0] + 1e-9:
                best = (s, a, rel[0])
        if best is not None:  # the best name match; with none, the first that fits (low confidence)
            copies[best[1].pattern].append((b, best[0] if best[0] >= 0.3 or fits == 1 else -0.5, best[2]))
            used_t.add(b.pattern)

    _vote_transposes(chosen)
    _mark_unsupported(chosen, m, src, tgt)

    rules: list[SuggestedRule] = []
    for e in chosen:
        r = _rule_for(e, copies.pop(e.sources[0].pattern, []) if len(e.sources) == 1 else [])
        if r is not None:
            rules.append(r)
    for pattern, extra in copies.items():  # copies of a source whose own rule was a no-op
        a = src_by_pattern[pattern]
        rules.append(_copy_rule(a, a.pattern, "rename", 1.0, extra))

    order = {k.pattern: k.order for k in src}
    rules.sort(key=lambda r: min(order.get(p, 0) for p in r.sources))  # the source's order
    rules = _order_rules(rules, src)
    return Suggestion(
        rules=rules,
        unmapped_sources=[k for k in src if k.pattern not in used_s],
        unmapped_targets=[k for k in tgt if k.pattern not in used_t],
        source_label=source_label,
        target_label=target_label,
        n_source_keys=len(src_list),
        n_target_keys=len(tgt_list),
    )


def _module(pattern: str) -> str:
    return pattern.rsplit(".", 1)[0] if "." in pattern else ""


def _edge_modules(e: _Edge) -> tuple[str, str]:
    return "|".join(_module(k.pattern) for k in e.sources), "|".join(_module(k.pattern) for k in e.targets)


def _module_votes(edges: list[_Edge]) -> dict[str, Counter[tuple[str, str]]]:
    """Source module -> Counter of (target module, voting source kind)."""
    votes: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    for e in edges:
        sm, tm = _edge_modules(e)
        votes[sm][(tm, e.sources[0].pattern)] += 1
    return votes


def _assign(src: list[Kind], tgt: list[Kind], edges: list[_Edge], votes: Mapping[str, Counter[tuple[str, str]]]) -> list[_Edge]:
    """Greedy one-to-one assignment, best score first.

    Identical kinds (same name, shape and indices) are taken first; then edges whose names
    nearly agree (a direct rename beats a split); then all. With ``votes`` from a first
    pass, an edge that maps its module where the module's other kinds went gains 0.15.
    """
    chosen: list[_Edge] = []
    used_s: set[str] = set()
    used_t: set[str] = set()
    tgt_by_pattern = {k.pattern: k for k in tgt}
    for a in src:
        b = tgt_by_pattern.get(a.pattern)
        if b is not None and b.shape == a.shape and set(a.instances) == set(b.instances):
            used_s.add(a.pattern)
            used_t.add(b.pattern)
            square = len(a.shape) == 2 and a.shape[0] == a.shape[1]
            chosen.append(_Edge(1.0, "same", (a,), (b,), 1.0, (0,) * a.n_holes, ambiguous=square))

    def adjusted(e: _Edge) -> float:
        if not votes:
            return e.score
        sm, tm = _edge_modules(e)
        others: Counter[Any] = Counter()
        for (t, voter), n in votes.get(sm, Counter()).items():
            if voter != e.sources[0].pattern:
                others[t] += n
        if others and others.most_common(1)[0][0] == tm:
            return e.score + 0.15
        return e.score

    ranked = sorted(((adjusted(e), e) for e in edges), key=lambda x: (-x[0], x[1].sources[0].order, x[1].targets[0].order))

    def take(min_sim: float) -> None:
        for score, e in ranked:
            if e.name_sim < min_sim:
                continue
            if any(k.pattern in used_s for k in e.sources) or any(k.pattern in used_t for k in e.targets):
                continue
            chosen.append(replace(e, score=min(score, 1.0)))
            used_s.update(k.pattern for k in e.sources)
            used_t.update(k.pattern for k in e.targets)

    take(0.85)
    take(0.0)
    return chosen


def _vote_transposes(edges: list[_Edge]) -> None:
    """Square matrices follow their block: if its other matrices are transposed, so are they."""
    votes: dict[str, Counter[bool]] = defaultdict(Counter)
    for e in edges:
        a = e.sources[0]
        if a.scope and e.op in ("rename", "transpose", "same") and len(a.shape) == 2 and a.shape[0] != a.shape[1]:
            votes[a.scope][e.op == "transpose"] += 1
        if a.scope and e.op in ("split", "merge"):
            whole = e.sources[0] if e.op == "split" else e.targets[0]
            if len(whole.shape) == 2 and whole.shape[0] != whole.shape[1]:
                votes[a.scope][e.transpose] += 1
    for e in edges:
        a = e.sources[0]
        if not e.ambiguous or not a.scope:
            continue
        v = votes.get(a.scope, Counter())
        if v[True] > v[False]:
            e.op = "transpose"
            e.why = (e.why + "; " if e.why else "") + f"square; transposed like the {v[True]} other matrices of its block"


# -- evidence: which edges the names (or shapes) actually support ---------------------------------

_VERIFY_CAP = 0.45  # a rule marked for verification never reads as confident
_ROLE_TOKENS = {"weight", "bias", "w", "b", "gamma", "beta", "kernel", "scale"}
_LIBRARY_QKV = {"in_proj", "c_attn"}  # fused layouts a library defines as [q; k; v] (torch MultiheadAttention, GPT-2 Conv1D)
QKV_ORDERS = (
    "q|k|v blocks (torch in_proj, GPT-2 c_attn, timm qkv), k|v|q blocks (metaseq OPT), per head [h, 3, d] (GPT-NeoX, BLOOM)"
)


def _group_key(k: Kind) -> tuple[str, tuple[int, ...], str]:
    return (k.scope, _shape_sig(k.shape), _WEIGHT_ROLES.get(k.last.lower(), k.last))


def _canon_tokens(k: Kind) -> set[str]:
    return {_SYNONYMS.get(t, t) for t in k.tokens}


def _distinct(k: Kind, group: list[Kind]) -> set[str]:
    """The tokens that tell ``k`` apart from the other kinds of its group (all its own tokens but
    the block's and the role's when it is alone)."""
    own = _canon_tokens(k) - _ROLE_TOKENS
    scope = {_SYNONYMS.get(t, t) for t in tokens_of(k.scope)} if k.scope else set()
    others = [_canon_tokens(g) for g in group if g is not k]
    if not others:
        return own - scope
    common = others[0].intersection(*others[1:])
    return own - common - scope


def _cover(x: set[str], y: set[str], common: set[str]) -> float:
    """Share of ``x``'s words found in ``y`` (``common`` words, a layout's prefixes, weigh 0.2)."""
    if not x:
        return 0.0
    w = {t: 0.2 if t in common else 1.0 for t in x}
    return sum(w[t] * max((token_similarity(t, u) for u in y), default=0.0) for t in x) / sum(w.values())


def _name_evidence(a: Kind, b: Kind, ga: list[Kind], gb: list[Kind], common: tuple[set[str], set[str]]) -> float:
    """How well the words that set ``a`` and ``b`` apart from their groups are found on the other
    side, both ways (0..1): ``attention_norm`` -> ``post_attention_layernorm`` leaves ``post``
    unexplained; ``self_attn.q_proj`` -> ``attention.self.query`` finds ``self`` and ``q``."""
    da, db = _distinct(a, ga), _distinct(b, gb)
    return min(_cover(da, _canon_tokens(b), common[0]), _cover(db, _canon_tokens(a), common[1]))


def _common_tokens(kinds: list[Kind]) -> set[str]:
    """Tokens in more than half of a layout's kinds."""
    df: Counter[str] = Counter()
    for k in kinds:
        df.update(_canon_tokens(k))
    return {t for t, n in df.items() if n > len(kinds) / 2}


def _is_qk(k: Kind) -> bool:
    segs = k.pattern.split(".")
    module = segs[-2] if len(segs) >= 2 else ""
    canon = [_SYNONYMS.get(t, t) for t in tokens_of(module)]
    return bool(canon) and canon[0] in ("q", "k") or module.lower() in ("wq", "wk")


def _has_positions(kinds: list[Kind]) -> bool:
    return any(_SYNONYMS.get(t, t) == "pos" or t in ("positions", "wpe", "pe") for k in kinds for t in k.tokens)


def _mark_unsupported(edges: list[_Edge], m: _Matcher, src: list[Kind], tgt: list[Kind]) -> None:
    """Set ``verify`` on the edges that names and shapes do not decide.

    * one-to-one edges inside a group of same-shaped kinds (square projections, norms), unless the
      words that set the two kinds apart from their group match both ways, or elimination leaves
      one candidate on each side (every other fitting kind is taken by a supported edge);
    * splits / merges of a fused q/k/v tensor, whose row order names do not tell (several known
      orders), except library-defined ones (``in_proj``, ``c_attn``); other fused tensors unless
      the whole's name spells its parts in order (``gate_up_proj`` -> ``gate``, ``up``);
    * q / k projections renamed between layouts with no position-embedding tensor (rotary models
      order their rows per head in one of two ways; names do not say which).
    """
    groups_s: dict[Any, list[Kind]] = defaultdict(list)
    groups_t: dict[Any, list[Kind]] = defaultdict(list)
    for k in src:
        groups_s[_group_key(k)].append(k)
    for k in tgt:
        groups_t[_group_key(k)].append(k)
    rotary = not _has_positions(src) and not _has_positions(tgt)
    vocab_s = set().union(*(_canon_tokens(k) for k in src))
    vocab_t = set().union(*(_canon_tokens(k) for k in tgt))
    common = (_common_tokens(src) - vocab_t, _common_tokens(tgt) - vocab_s)  # prefixes like `model.`, `roberta.`
    one = [e for e in edges if e.op in ("same", "rename", "transpose", "reshape")]
    supported: set[int] = set()
    for e in one:
        a, b = e.sources[0], e.targets[0]
        if e.op == "same":
            supported.add(id(e))
            continue
        ga, gb = groups_s[_group_key(a)], groups_t[_group_key(b)]
        if len(ga) == 1 and len(gb) == 1:
            supported.add(id(e))  # a shape unique in its block on both sides
            continue
        exact_a = [k for k in ga if k.shape == a.shape]
        exact_b = [k for k in gb if k.shape == b.shape]
        if a.shape == b.shape and len(exact_a) == 1 and len(exact_b) == 1 and a.shape[0] != a.shape[-1]:
            supported.add(id(e))  # the only [m, n] on both sides (the others are [n, m])
            continue
        ev = _name_evidence(a, b, ga, gb, common)
        rivals = [_name_evidence(a, x, ga, gb, common) for x in gb if x is not b]
        rivals += [_name_evidence(x, b, ga, gb, common) for x in ga if x is not a]
        if ev >= 0.75 and all(r <= ev - 0.2 for r in rivals):
            supported.add(id(e))
    # elimination (the only fitting kinds left on both sides) and modules (a bias goes where its
    # weight went), until nothing changes
    taken_s = {k.pattern for e in edges if id(e) in supported or e.op in ("split", "merge") for k in e.sources}
    taken_t = {k.pattern for e in edges if id(e) in supported or e.op in ("split", "merge") for k in e.targets}
    changed = True
    while changed:
        changed = False
        for e in one:
            if id(e) in supported:
                continue
            a, b = e.sources[0], e.targets[0]
            fit_t = [x for x in tgt if x.pattern not in taken_t and m.same_block(a, x) and _fits(a, x)]
            fit_s = [x for x in src if x.pattern not in taken_s and m.same_block(x, b) and _fits(x, b)]
            modules = {_edge_modules(x) for x in one if id(x) in supported}
            forced = [x.pattern for x in fit_t] == [b.pattern] and [x.pattern for x in fit_s] == [a.pattern]
            if forced or _edge_modules(e) in modules:
                supported.add(id(e))
                taken_s.add(a.pattern)
                taken_t.add(b.pattern)
                changed = True
    for e in one:
        a, b = e.sources[0], e.targets[0]
        if id(e) not in supported:
            same = len(groups_s[_group_key(a)]) + len(groups_t[_group_key(b)]) - 2
            e.verify = (
                f"no name evidence: {list(a.shape)} fits {same} other kind(s) of the block as well; chosen by order"
                if same
                else "no name evidence"
            )
        elif rotary and e.op != "same" and (_is_qk(a) or _is_qk(b)) and a.pattern.split(".")[-2:] != b.pattern.split(".")[-2:]:
            e.verify = (
                "rotary q/k: the rows of each head may be interleaved pairs (Meta, GGUF) or halves (HF); "
                "a rename is right only if both use the same order"
            )
    for e in edges:
        if e.op not in ("split", "merge"):
            continue
        whole = e.sources[0] if e.op == "split" else e.targets[0]
        parts = e.targets if e.op == "split" else e.sources
        canon = {_SYNONYMS.get(d, d) for d in _distinct_tokens(list(parts))}
        module = whole.pattern.split(".")[-2] if "." in whole.pattern else whole.pattern
        library = any(module.startswith(x) or whole.last.startswith(x) for x in _LIBRARY_QKV)
        if canon <= {"q", "k", "v"} and len(canon) >= 2:
            if not library:
                e.verify = f"fused q/k/v: the row order is not in the names; known orders: {QKV_ORDERS}"
        else:
            spelled = [_SYNONYMS.get(t, t) for t in whole.tokens]
            order = [_SYNONYMS.get(d, d) for d in _distinct_tokens(list(parts))]
            pos = [spelled.index(x) if x in spelled else -1 for x in order]
            if -1 in pos or pos != sorted(pos):
                e.verify = "fused tensor: its name does not list the parts in this order"


def _fits(a: Kind, b: Kind) -> bool:
    return shape_relation(a.shape, b.shape) is not None and not _roles_clash(a, b) and _index_map(a, b) is not None


def _reason(e: _Edge) -> str:
    a, b = e.sources[0], e.targets[0]
    common: list[str] = []
    for t in dict.fromkeys(a.tokens):
        u = max(b.tokens, key=lambda u: token_similarity(t, u), default="")
        if u and token_similarity(t, u) >= 0.6:
            common.append(t if t == u else f"{t}~{u}")
    bits = [f"tokens {', '.join(common)}" if common else "no common tokens"]
    bits.append(f"shape {list(a.shape)}" + (f" -> {list(b.shape)}" if b.shape != a.shape else ""))
    if e.why:
        bits.append(e.why)
    return "; ".join(bits)


def _rule_for(e: _Edge, copies: list[tuple[Kind, float, str]]) -> SuggestedRule | None:
    conf = round(min(1.0, max(0.0, e.score)), 2)
    if e.verify:
        conf = min(conf, _VERIFY_CAP)
    if e.op in ("same", "rename", "transpose", "reshape"):
        a, b = e.sources[0], e.targets[0]
        op = "rename" if e.op == "same" else e.op
        tmpl = _target_template(b.pattern, e.offsets)
        if copies:
            return _copy_rule(a, tmpl, op, conf, copies, e)
        if op == "rename" and tmpl == a.pattern:
            return None  # the key already has its target name
        why = _reason(e)
        if op == "reshape":
            return SuggestedRule("reshape", (a.pattern,), (tmpl,), conf, why, shape=b.shape, verify=e.verify)
        return SuggestedRule(op, (a.pattern,), (tmpl,), conf, why, verify=e.verify)
    parts = e.targets if e.op == "split" else e.sources
    whole = e.sources[0] if e.op == "split" else e.targets[0]
    sizes = [p.shape[e.dim] for p in parts]
    common = sorted(set(whole.tokens) & set().union(*(set(p.tokens) for p in parts)))
    why = f"tokens {', '.join(common) or '-'}; {e.why}" + ("; transposed" if e.transpose else "")
    conf = round(min(1.0, e.score), 2)
    if e.verify:
        conf = min(conf, _VERIFY_CAP)
    if e.op == "split":
        return SuggestedRule(
            "split",
            (whole.pattern,),
            tuple(_target_template(p.pattern, e.offsets) for p in parts),
            conf,
            why,
            dim=e.dim,
            sizes=tuple(sizes) if len(set(sizes)) > 1 else (),
            transpose=e.transpose,
            verify=e.verify,
        )
    return SuggestedRule(
        "merge",
        tuple(p.pattern for p in parts),
        (_target_template(whole.pattern, e.offsets),),
        conf,
        why,
        dim=e.dim,
        transpose=e.transpose,
        verify=e.verify,
    )


def _copy_rule(
    a: Kind, first: str, op: str, conf: float, copies: list[tuple[Kind, float, str]], e: _Edge | None = None
) -> SuggestedRule:
    targets = [first] + [b.pattern for b, _, _ in copies]
    transposed = ([first] if op == "transpose" else []) + [b.pattern for b, _, rel in copies if rel == "transpose"]
    low = min([conf] + [round(0.5 + 0.4 * s, 2) for _, s, _ in copies])
    why = f"shape {list(a.shape)}; one source, {len(targets)} targets (tied weights?)"
    verify = e.verify if e is not None else ""
    if any(s < 0.3 for _, s, _ in copies):
        verify = verify or "a copy chosen by shape alone (no name evidence)"
    if verify:
        low = min(low, _VERIFY_CAP)
    return SuggestedRule("copy", (a.pattern,), tuple(targets), low, why, transpose_targets=tuple(transposed), verify=verify)


def _order_rules(rules: list[SuggestedRule], src: list[Kind]) -> list[SuggestedRule]:
    """Order rules so none writes a key that a later rule still has to read (swaps of names)."""
    src_patterns = {k.pattern for k in src}
    pending = list(rules)
    out: list[SuggestedRule] = []
    consumed: set[str] = set()
    while pending:
        for n, r in enumerate(pending):
            blocked = [t for t in r.targets if t in src_patterns and t not in consumed and t not in r.sources]
            if not blocked:
                out.append(pending.pop(n))
                consumed.update(r.sources)
                break
        else:  # a cycle: leave the order as is; planning the draft will say where
            out.extend(pending)
            break
    return out


# -- files -----------------------------------------------------------------------------------------


def suggest_files(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Suggestion:
    """``statemap suggest A B``: open a source checkpoint and a target (checkpoint or listing)."""
    from .api import load_expect
    from .load import open_checkpoint

    with open_checkpoint(source) as ck:
        src_metas = list(ck.metas.values())
    tgt, label = load_expect(target)
    if not src_metas:
        raise SuggestError(f"{source}: holds no tensors; nothing to align")
    return suggest(src_metas, list(tgt.values()), source_label=str(source), target_label=label)
