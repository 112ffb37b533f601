"""Mapping specs: YAML in, frozen dataclasses out.

Parsing happens in two passes, like einops separates syntax from meaning:

1. ``yaml`` -> plain values that remember their line (``_Y*`` below), with limits against
   alias bombs; safe tags only.
2. Each field is checked (unknown fields are errors, with the closest valid name), and every
   shorthand is normalized into one canonical :class:`Rule` form that keeps ``file:line``.

Nothing here looks at a checkpoint; that is :mod:`statemap.plan`'s job.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError
from .fsutil import read_regular
from .template import Pattern, Template, parse_pattern, parse_template
from .textsafe import short_repr

SPEC_VERSION = 1
MAX_SPEC_BYTES = 4 << 20
MAX_YAML_NODES = 200_000
_MAP_TAG, _SEQ_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
MAX_YAML_DEPTH = 64  # nesting levels; a spec needs about five


@dataclass(frozen=True)
class Loc:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Rule:
    """One canonical rule. ``params`` holds the op's checked fields (see :mod:`statemap.ops`)."""

    op: str
    index: int
    loc: Loc
    sources: tuple[Pattern, ...]
    targets: tuple[Template, ...]
    params: tuple[tuple[str, Any], ...] = ()
    optional: bool = False
    inverse: Any = None  # declared inverse rule(s) (raw mapping, or list of them), for lossy ops
    when: tuple[Any, ...] = ()  # guards.Cond: which matched keys the rule acts on (metadata only)
    assume: tuple[Any, ...] = ()  # guards.Assume: facts the rule relies on, verified before writing

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        src = ", ".join(map(str, self.sources)) or "-"
        return f"rule #{self.index} ({self.op} {src})"

    def where(self) -> str:
        return f"{self.loc}: {self.label}: "


@dataclass(frozen=True)
class Spec:
    """A parsed mapping spec. Build one with :func:`load_spec`."""

    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    version: int = SPEC_VERSION
    source: str = ""
    target: str = ""
    verified: str = ""
    vars: tuple[tuple[str, Any], ...] = ()
    unwrap: tuple[str, ...] | None = None  # None = auto-detect; () = use the file's top level
    strip_prefix: tuple[str, ...] | None = None  # None = auto (module., _orig_mod.)
    strict: bool = False
    tied: str = "clone"
    expect: Any = None  # path string, or {key: shape}
    path: str = "<string>"
    loc: Loc = field(default_factory=lambda: Loc("<string>", 1))

    @property
    def var_dict(self) -> dict[str, Any]:
        return dict(self.vars)

    def inverse(self) -> Spec:
        """The reverse spec (see :mod:`statemap.invert`; ``invert(spec).lost`` lists what it cannot restore).

        Example::

            >>> back = load_spec("vit-timm-to-hf").inverse()
        """
        from .invert import invert

        return invert(self).spec

    def with_vars(self, overrides: Mapping[str, Any] | None) -> Spec:
        """Return a copy with some ``vars`` overridden (names must exist in the spec)."""
        if not overrides:
            return self
        current = self.var_dict
        for k in overrides:
            if k not in current:
                raise SpecError(f"{self.path}: spec {self.name!r} has no var {k!r} (vars: {', '.join(current) or 'none'})")
        current.update({k: _coerce(v) for k, v in overrides.items()})
        return replace(self, vars=tuple(current.items()))


def _coerce(v: Any) -> Any:
    """``--set k=v`` values arrive as text; read integers and floats as numbers."""
    if isinstance(v, str):
        s = v.strip()
        try:
            return int(s)
        except ValueError:
            pass
        try:
            return float(s)
        except ValueError:
            return s
    return v


# -- YAML with line numbers --------------------------------------------------------------


class _YMap(dict):
    line: int
    key_lines: dict[str, int]


class _YList(list):
    line: int
    item_lines: list[int]


def _line_of(obj: Any, default: int) -> int:
    return getattr(obj, "line", default)


_FLOW_SPECIAL = re.compile(r"[\"'#\[\]{}]")


def _escaped(text: str, start: int, k: int) -> bool:
    """Is the quote at ``k`` escaped (an odd run of backslashes before it, after ``start``)?"""
    b = k - 1
    while b > start and text[b] == "\\":
        b -= 1
    return (k - 1 - b) % 2 == 1


def _check_flow_depth(text: str, file: str) -> None:
    """Refuse ``[[[[...`` before PyYAML sees it: its scanner takes quadratic time in flow depth.

    One pass; quoted text and comments are skipped (never rescanned), an unclosed quote ends the scan.
    """
    if text.count("[") + text.count("{") <= MAX_YAML_DEPTH:
        return
    depth, i = 0, 0
    while (m := _FLOW_SPECIAL.search(text, i)) is not None:
        j = m.start()
        c = text[j]
        if c == "'":
            k = text.find("'", j + 1)
            while k >= 0 and text.startswith("''", k):
                k = text.find("'", k + 2)
        elif c == '"':
            k = text.find('"', j + 1)
            while k >= 0 and _escaped(text, j, k):
                k = text.find('"', k + 1)
        elif c == "#":
            k = text.find("\n", j)
        else:
            depth = depth + 1 if c in "[{" else max(depth - 1, 0)
            if depth > MAX_YAML_DEPTH:
                raise SpecError(f"{file}:{text.count(chr(10), 0, j) + 1}: YAML nested more than {MAX_YAML_DEPTH} levels deep")
            k = j
        if k < 0:
            return
        i = k + 1


def _load_yaml(text: str, file: str) -> Any:
    if len(text.encode("utf-8", "replace")) > MAX_SPEC_BYTES:
        raise SpecError(f"{file}: spec larger than {MAX_SPEC_BYTES >> 20} MiB; refusing to parse it")
    _check_flow_depth(text, file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise SpecError(f"{file}: YAML nested too deeply (a spec needs a handful of levels)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else file
        problem = getattr(e, "problem", None) or str(e)
        hint = ""
        if mark and "{" in text.splitlines()[min(mark.line, len(text.splitlines()) - 1)]:
            hint = " (hint: quote patterns that contain braces, e.g. from: 'layers.{i}.fc1.weight')"
        raise SpecError(f"{where}: invalid YAML: {problem}{hint}") from None
    if root is None:
        raise SpecError(f"{file}: spec is empty")
    constructor = yaml.SafeLoader("")
    budget = [MAX_YAML_NODES]

    def scalar(node: yaml.Node, line: int) -> Any:
        try:
            return constructor.construct_object(node)
        except yaml.YAMLError as e:
            raise SpecError(f"{file}:{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
        except Exception as e:  # noqa: BLE001 - ValueError and the like from e.g. 2001-02-30 or !!int abc
            msg = str(e)
            problem = getattr(e, "problem", None) or (msg.splitlines()[0] if msg else "invalid value")
            value = short_repr(getattr(node, "value", ""), 60)
            tag = str(getattr(node, "tag", "")).rsplit(":", 1)[-1]
            raise SpecError(
                f"{file}:{line}: cannot read {value} as {tag or 'a value'}: {problem}; quote it to keep it as text"
            ) from None

    def conv(node: yaml.Node, depth: int = 0) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise SpecError(f"{file}: spec expands to more than {MAX_YAML_NODES} YAML nodes (alias bomb?)")
        line = node.start_mark.line + 1
        if depth > MAX_YAML_DEPTH:
            raise SpecError(f"{file}:{line}: YAML nested more than {MAX_YAML_DEPTH} levels deep")
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in (_MAP_TAG, _SEQ_TAG):
            raise SpecError(f"{file}:{line}: YAML tag {short_repr(node.tag, 60)} is not allowed in a spec (plain data only)")
        if isinstance(node, yaml.MappingNode):
            out = _YMap()
            out.line, out.key_lines = line, {}
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    raise SpecError(f"{file}:{k.start_mark.line + 1}: mapping keys must be plain strings")
                key = str(scalar(k, k.start_mark.line + 1))
                if key in out:
                    raise SpecError(f"{file}:{k.start_mark.line + 1}: duplicate field {key!r}")
                out.key_lines[key] = k.start_mark.line + 1
                out[key] = conv(v, depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            lst = _YList(conv(v, depth + 1) for v in node.value)
            lst.line, lst.item_lines = line, [v.start_mark.line + 1 for v in node.value]
            return lst
        return scalar(node, line)

    try:
        return conv(root)
    except RecursionError:
        raise SpecError(f"{file}: YAML nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else file
        raise SpecError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None


# -- field checking ------------------------------------------------------------------------

_HEADER_FIELDS = {
    "name",
    "description",
    "version",
    "source",
    "target",
    "verified",
    "vars",
    "unwrap",
    "strip_prefix",
    "strict",
    "tied",
    "expect",
    "rules",
}


def unknown_field(name: str, valid: set[str] | list[str], where: str, what: str) -> SpecError:
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return SpecError(f"{where}unknown {what} {name!r}; {hint}valid: {', '.join(sorted(valid))}")


def _str_list(value: Any, where: str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SpecError(f"{where}{what} must be a string or a list of strings, got {value!r}")


def parse_spec(data: Any, file: str = "<string>") -> Spec:
    """Check a YAML-shaped value and normalize it into a :class:`Spec`."""
    from .ops import parse_rule

    if not isinstance(data, dict):
        raise SpecError(f"{file}: a spec is a mapping with 'name', 'version' and 'rules', got {type(data).__name__}")
    top = _line_of(data, 1)
    lines: dict[str, int] = getattr(data, "key_lines", {})

    def at(key: str) -> str:
        return f"{file}:{lines.get(key, top)}: "

    for key in data:
        if key not in _HEADER_FIELDS:
            raise unknown_field(key, _HEADER_FIELDS, at(key), "spec field")
    for required in ("name", "version", "rules"):
        if required not in data:
            raise SpecError(f"{file}:{top}: spec has no {required!r} field")
    if data["version"] != SPEC_VERSION:
        raise SpecError(
            f"{at('version')}spec format version {data['version']!r} is not supported (this statemap reads version {SPEC_VERSION})"
        )
    name = data["name"]
    if not isinstance(name, str) or not name:
        raise SpecError(f"{at('name')}'name' must be a non-empty string")
    for key in ("description", "source", "target", "verified"):
        if key in data and not isinstance(data[key], str):
            raise SpecError(f"{at(key)}{key!r} must be a string")

    raw_vars = data.get("vars") or {}
    if not isinstance(raw_vars, dict):
        raise SpecError(f"{at('vars')}'vars' must be a mapping of name: default value")
    for k, v in raw_vars.items():
        if not k.isidentifier():
            raise SpecError(f"{at('vars')}var name {k!r} is not an identifier")
        if not isinstance(v, (int, float, str)) or isinstance(v, bool):
            raise SpecError(f"{at('vars')}var {k!r} must have a number or string default, got {v!r}")

    unwrap: tuple[str, ...] | None = None
    if "unwrap" in data:
        u = data["unwrap"]
        if u in (None, "none", False, []):
            unwrap = ()
        elif u == "auto":
            unwrap = None
        else:
            unwrap = tuple(p for item in _str_list(u, at("unwrap"), "'unwrap'") for p in item.split("/") if p)

    strip: tuple[str, ...] | None = None
    if "strip_prefix" in data:
        s = data["strip_prefix"]
        strip = None if s == "auto" else () if s in (None, False, []) else _str_list(s, at("strip_prefix"), "'strip_prefix'")

    strict = data.get("strict", False)
    if not isinstance(strict, bool):
        raise SpecError(f"{at('strict')}'strict' must be true or false")
    tied = data.get("tied", "clone")
    if tied not in ("clone", "dedupe"):
        raise SpecError(f"{at('tied')}'tied' must be 'clone' (write every alias) or 'dedupe' (write the first, record the rest)")

    expect = data.get("expect")
    if expect is not None:
        if isinstance(expect, dict):
            for k, v in expect.items():
                if not (isinstance(v, list) and all(isinstance(d, int) for d in v)):
                    raise SpecError(f"{at('expect')}expected shape of {k!r} must be a list of integers, got {v!r}")
            expect = {k: tuple(v) for k, v in expect.items()}
        elif isinstance(expect, str):
            if file not in ("<string>", "<dict>") and not os.path.isabs(expect):
                expect = str(Path(file).parent / expect)
        else:
            raise SpecError(f"{at('expect')}'expect' is a reference file path or a mapping of key: shape")

    raw_rules = data["rules"]
    if not isinstance(raw_rules, list):
        raise SpecError(f"{at('rules')}'rules' must be a list")
    rules: list[Rule] = []
    item_lines = getattr(raw_rules, "item_lines", [])
    for n, item in enumerate(raw_rules):
        line = item_lines[n] if n < len(item_lines) else lines.get("rules", top)
        for r in parse_rule(item, Loc(file, line), len(rules) + 1, set(raw_vars)):
            rules.append(r)

    return Spec(
        name=name,
        rules=tuple(rules),
        description=data.get("description", ""),
        version=data["version"],
        source=data.get("source", ""),
        target=data.get("target", ""),
        verified=data.get("verified", ""),
        vars=tuple(raw_vars.items()),
        unwrap=unwrap,
        strip_prefix=strip,
        strict=strict,
        tied=tied,
        expect=expect,
        path=file,
        loc=Loc(file, top),
    )


def load_spec(spec: str | os.PathLike[str] | Mapping[str, Any] | Spec, vars: Mapping[str, Any] | None = None) -> Spec:
    """Load a spec from a path, a catalog name, a YAML string or a dict.

    Example::

        >>> spec = load_spec("deltalm-fairseq-to-hf")          # catalog name
        >>> spec = load_spec("my-spec.yaml", vars={"vocab": 250001})
        >>> spec = load_spec("name: t\\nversion: 1\\nrules:\\n  - rename: a -> b\\n")
    """
    if isinstance(spec, Spec):
        return spec.with_vars(vars)
    if isinstance(spec, Mapping):
        return parse_spec(dict(spec), "<dict>").with_vars(vars)
    text_or_path = os.fspath(spec)
    if "\n" in text_or_path:
        return parse_spec(_load_yaml(text_or_path, "<string>"), "<string>").with_vars(vars)
    path = Path(text_or_path)
    if not path.exists():
        from .catalog import find

        found = find(text_or_path)
        if found is None:
            from .catalog import names

            close = difflib.get_close_matches(text_or_path, names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; `statemap list` shows the catalog"
            raise SpecError(f"{text_or_path}: no such spec file or catalog name{hint}")
        path = found
    if path.is_dir():
        raise SpecError(f"{path}: is a directory, not a spec file")
    raw = read_regular(path, MAX_SPEC_BYTES, "spec", SpecError)  # refuses FIFOs, devices, > 4 MiB
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: cannot read spec: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_spec(_load_yaml(text, str(path)), str(path)).with_vars(vars)


__all__ = ["Loc", "Rule", "Spec", "load_spec", "parse_spec", "Pattern", "Template", "parse_pattern", "parse_template"]
