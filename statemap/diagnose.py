"""diagnose: guess the real mistake behind a spec that matches nothing in its input.

A rule that matches no key is usually not a rule to mark ``optional: true``: the input is already
converted (its keys look like the spec's *output*), or it belongs to another family (a catalog
spec's source patterns cover it). Both are judged on names only (metadata), by the share of the
input's keys each pattern set covers.

Example::

    >>> from statemap.spec import load_spec
    >>> spec = load_spec("name: t\\nversion: 1\\nrules:\\n  - rename: enc.{i}.w -> model.enc.{i}.weight\\n")
    >>> wrong_input(spec, ["model.enc.0.weight", "model.enc.1.weight"])
    'the input looks converted already: 2 of 2 keys look like what this spec writes (e.g. model.enc.0.weight); give it the unconverted checkpoint'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from .spec import Spec

CONVERTED = 0.6  # share of input keys that look like the spec's output: "converted already"
OTHER_FAMILY = 0.8  # share of input keys a catalog spec's source patterns cover: "another family"
MAX_KEYS = 2000  # keys judged at most


Match = Callable[[str], object]


def _source_res(spec: Spec) -> list[list[Match]]:
    """Each rule's source matchers (linear time: keymatch); a pattern of captures only
    (``{k:path}``) says nothing of a family."""
    out = []
    for rule in spec.rules:
        res: list[Match] = []
        for p in rule.sources:
            text = getattr(p, "text", "")
            if hasattr(p, "match") and re.search("[A-Za-z]", re.sub(r"\{[^}]*\}", "", text)):
                res.append(p.match)
        out.append(res)
    return out


def _fit(spec: Spec, keys: Sequence[str]) -> tuple[int, float]:
    """(input keys the spec's source patterns cover, share of its rules that match a key)."""
    rules = [r for r in _source_res(spec) if r]
    covered = _covered([m for res in rules for m in res], keys)
    hit = sum(1 for res in rules if any(m(k) is not None for m in res for k in keys))
    return len(covered), hit / len(rules) if rules else 0.0


def _target_res(spec: Spec) -> list[Match]:
    from .errors import SpecError
    from .keymatch import compile_regex

    out: list[Match] = []
    for rule in spec.rules:
        for t in rule.targets:
            parts = getattr(t, "parts", ())
            if any(kind == "lit" and "." in text for kind, text in parts):  # a bare `{x}` would match anything
                try:
                    m = compile_regex("".join(re.escape(text) if kind == "lit" else ".+" for kind, text in parts))
                except SpecError:
                    continue
                out.append(m.match)
    return out


def _covered(matchers: Sequence[Match], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if any(m(k) is not None for m in matchers)]


def _catalog() -> Iterable[Spec]:
    """The catalog specs, parsed with the C YAML loader (a hint must not cost seconds)."""
    import yaml

    from .catalog import catalog_dir, names
    from .errors import StatemapError
    from .spec import parse_spec

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for n in names():
        path = str(catalog_dir() / f"{n}.yaml")
        try:
            with open(path, encoding="utf-8") as f:
                yield parse_spec(yaml.load(f.read(), Loader=loader), path)  # noqa: S506 - a safe loader
        except (OSError, StatemapError, yaml.YAMLError):
            continue


def wrong_input(spec: Spec, keys: Iterable[str], refuses: Callable[[Spec], bool] | None = None) -> str | None:
    """Why ``spec`` may not fit an input with these keys, or None when nothing stands out.

    ``refuses(other)``: whether a catalog spec that covers the keys states a fact the input
    contradicts (an ``assume:`` on shapes: the other direction of a pair of layouts that share
    their names, as HF GPT-2 and nanoGPT do); such a spec is not suggested."""
    keys = list(keys)
    if not keys:
        return None
    total = len(keys)
    if total > MAX_KEYS:  # a hint must stay cheap on a 100k-key checkpoint: judge an even sample
        keys = keys[:: -(-total // MAX_KEYS)]
    of = f"{len(keys)} keys" if len(keys) == total else f"{len(keys)} keys sampled of {total}"
    own, _ = _fit(spec, keys)
    done = _covered(_target_res(spec), keys)
    if len(done) >= CONVERTED * len(keys) and len(done) > own:
        return (
            f"the input looks converted already: {len(done)} of {of} look like what this spec writes "
            f"(e.g. {done[0]}); give it the unconverted checkpoint"
        )
    best: list[tuple[int, float, str, Spec]] = []
    for other in _catalog():
        if other.name == spec.name:
            continue
        n, rules = _fit(other, keys)
        if n >= OTHER_FAMILY * len(keys) and n > own:
            best.append((n, rules, other.name, other))
    best.sort(key=lambda b: (-b[0], -b[1], b[2]))
    if refuses is not None:
        best = [b for b in best if not refuses(b[3])]
    if best:
        top = [name for n, rules, name, _ in best if (n, rules) == best[0][:2]][:3]
        names = " or ".join(repr(n) for n in top)
        return (
            f"the input looks like another family: catalog spec {names} covers {best[0][0]} of {of} "
            f"(this spec {own}); use that spec"
        )
    return None


__all__ = ["wrong_input"]
