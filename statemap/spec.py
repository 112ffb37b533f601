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
from .inputs import Inputs, parse_inputs
from .rules import Loc, Rule, unknown_field
from .template import Pattern, Template, parse_pattern, parse_template
from .textsafe import short_repr
from .vardefs import VarDef, parse_vars, resolve

SPEC_VERSION = 1
MAX_SPEC_BYTES = 4 << 20
MAX_YAML_NODES = 200_000
_MAP_TAG, _SEQ_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
MAX_YAML_DEPTH = 64  # nesting levels; a spec needs about five


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
    inputs: Inputs | None = None  # several input files (`inputs:`), None = one checkpoint
    config: tuple[str, str] | None = None  # ("file", "params.json") or ("checkpoint", "cfg.model")
    var_defs: tuple[VarDef, ...] = ()  # the declarations; `vars` holds their current values
    overrides: tuple[tuple[str, Any], ...] = ()  # --set / vars={...}: win over config and defaults
    pending: tuple[tuple[str, str], ...] = ()  # vars without a value yet (name, why): from a config not read
    config_label: str = ""  # the config the vars were read from ("" = none)
    config_data: Any = field(default=None, compare=False, repr=False)

    @property
    def var_dict(self) -> dict[str, Any]:
        return dict(self.vars)

    def _resolved(self, overrides: dict[str, Any], config: Any, label: str, bound: bool) -> Spec:
        if not self.var_defs:  # a Spec built by hand: plain values
            current = {**self.var_dict, **overrides}
            return replace(self, vars=tuple(current.items()), overrides=tuple(overrides.items()))
        values, pending = resolve(self.var_defs, overrides, config, label, bound)
        return replace(
            self,
            vars=tuple(values.items()),
            overrides=tuple(overrides.items()),
            pending=tuple(pending.items()),
            config_label=label,
            config_data=config,
        )

    def bind_config(self, config: Any, label: str) -> Spec:
        """Read the vars again with ``config`` (the config's data, or None: no config): a conversion
        calls this once it knows the input. A var whose config key is missing and which has no
        default is an error naming the config, the key and the var.

        Example::

            >>> vars_ = "vars:\\n  n_heads: {config: n_heads}\\n  dim: {config: dim}\\n  head_dim: dim // n_heads\\n"
            >>> spec = load_spec("name: t\\nversion: 1\\n" + vars_ + "rules:\\n  - keep: '{k:path}'\\n")
            >>> spec.bind_config({"n_heads": 32, "dim": 4096}, "params.json").var_dict["head_dim"]
            128
        """
        return self._resolved(dict(self.overrides), config, label, True)

    def require_vars(self) -> None:
        """Raise :class:`SpecError` naming each var that still has no value (its config was not read)."""
        if self.pending:
            why = "; ".join(f"{n} {w}" for n, w in self.pending)
            raise SpecError(f"{self.path}: spec {self.name!r}: var {why}")

    def inverse(self) -> Spec:
        """The reverse spec (see :mod:`statemap.invert`; ``invert(spec).lost`` lists what it cannot restore).

        Example::

            >>> back = load_spec("vit-timm-to-hf").inverse()
        """
        from .invert import invert

        return invert(self).spec

    @classmethod
    def from_data(cls, data: Any, file: str = "<dict>") -> Spec:
        """Parse YAML-shaped data (what :func:`parse_spec` takes); lets lower modules such as
        :mod:`statemap.invert` build a spec without importing this module."""
        return parse_spec(data, file)

    def with_vars(self, overrides: Mapping[str, Any] | None) -> Spec:
        """Return a copy with some ``vars`` overridden (names must exist in the spec)."""
        if not overrides:
            return self
        known = [d.name for d in self.var_defs] if self.var_defs else list(self.var_dict)
        for k in overrides:
            if k not in known:
                raise SpecError(f"{self.path}: spec {self.name!r} has no var {k!r} (vars: {', '.join(known) or 'none'})")
        merged = {**dict(self.overrides), **{k: _coerce(v) for k, v in overrides.items()}}
        return self._resolved(merged, self.config_data, self.config_label, bool(self.config_label))


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
    "inputs",
    "config",
}


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
            fix = {"version": f"; add `version: {SPEC_VERSION}`", "name": "; add `name: my-spec`"}.get(required, "")
            raise SpecError(f"{file}:{top}: spec has no {required!r} field{fix}")
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
    raw_rules = data["rules"]
    if not isinstance(raw_rules, list):
        raise SpecError(f"{at('rules')}'rules' must be a list")
    var_at = {str(k): f"{file}:{getattr(raw_vars, 'key_lines', {}).get(k, lines.get('vars', top))}: " for k in raw_vars}
    all_vars = dict(raw_vars)
    items = _expand(raw_rules, file, lines.get("rules", top), (_identity(file),), all_vars, var_at, [0])
    var_defs = parse_vars(all_vars, at("vars"), var_at)
    values, pending = resolve(var_defs, {}, None, "", bound=False)

    inputs: Inputs | None = None
    if data.get("inputs") is not None:
        raw_in = data["inputs"]
        if isinstance(raw_in, dict):
            extra = set(raw_in) - {"files", "key"}
            if extra or "files" not in raw_in:
                raise SpecError(f"{at('inputs')}'inputs' is a file pattern, or {{files: PATTERN, key: TEMPLATE}}")
            raw_in, raw_key = raw_in["files"], raw_in.get("key")
        else:
            raw_key = None
        try:
            inputs = parse_inputs(raw_in, raw_key)
        except SpecError as e:
            raise SpecError(f"{at('inputs')}{e}") from None

    config: tuple[str, str] | None = None
    if data.get("config") is not None:
        c = data["config"]
        if isinstance(c, str) and c and len(c) <= 1000 and "\0" not in c:
            config = ("file", c)
        elif isinstance(c, dict) and set(c) == {"checkpoint"} and isinstance(c["checkpoint"], str) and c["checkpoint"]:
            config = ("checkpoint", c["checkpoint"])
        else:
            raise SpecError(
                f"{at('config')}'config' is a JSON/YAML file beside the input (params.json), "
                "or {checkpoint: KEY} for a dict stored in the checkpoint (args, cfg.model)"
            )

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
            if file not in ("<string>", "<dict>") and not os.path.isabs(expect) and not expect.startswith("hf:"):
                expect = str(Path(file).parent / expect)
        else:
            raise SpecError(f"{at('expect')}'expect' is a reference file path or a mapping of key: shape")

    rules: list[Rule] = []
    for item, loc in items:
        for r in parse_rule(item, loc, len(rules) + 1, set(all_vars)):
            rules.append(r)

    return Spec(
        name=name,
        rules=tuple(rules),
        description=data.get("description", ""),
        version=data["version"],
        source=data.get("source", ""),
        target=data.get("target", ""),
        verified=data.get("verified", ""),
        vars=tuple(values.items()),
        unwrap=unwrap,
        strip_prefix=strip,
        strict=strict,
        tied=tied,
        expect=expect,
        path=file,
        loc=Loc(file, top),
        inputs=inputs,
        config=config,
        var_defs=var_defs,
        pending=tuple(pending.items()),
    )


MAX_INCLUDE_DEPTH = 8  # includes within includes
MAX_INCLUDES = 256  # files one spec may include, all levels together
MAX_RULE_ITEMS = MAX_YAML_NODES  # rule entries after expanding every include


def _identity(file: str) -> str:
    if file in ("<string>", "<dict>"):
        return file
    try:
        return os.path.realpath(file)
    except (OSError, ValueError):
        return file


def _include_path(target: str, file: str, where: str) -> Path:
    """An included file: relative to the including spec's folder (the working folder for a spec
    given as text), else a catalog name."""
    base = Path.cwd() if file in ("<string>", "<dict>") else Path(file).parent
    cand = base / target
    if cand.is_file():
        return cand
    if cand.exists():
        raise SpecError(f"{where}include {target!r}: {cand} is not a file")
    from .catalog import find

    found = find(target)
    if found is None:
        raise SpecError(f"{where}include {target!r}: no such file in {base} nor catalog spec")
    return found


def _expand(
    raw_rules: list[Any],
    file: str,
    default_line: int,
    chain: tuple[str, ...],
    all_vars: dict[str, Any],
    var_at: dict[str, str],
    budget: list[int],
) -> list[tuple[Any, Loc]]:
    """Rule entries with every ``- include: FILE`` replaced by that file's rules (recursively),
    each with its own ``file:line``. Included ``vars`` never override one already declared."""
    out: list[tuple[Any, Loc]] = []
    item_lines = getattr(raw_rules, "item_lines", [])
    for n, item in enumerate(raw_rules):
        line = item_lines[n] if n < len(item_lines) else default_line
        if not (isinstance(item, dict) and "include" in item):
            out.append((item, Loc(file, line)))
            if len(out) > MAX_RULE_ITEMS:
                raise SpecError(f"{file}: more than {MAX_RULE_ITEMS} rules after includes")
            continue
        where = f"{file}:{line}: "
        if set(item) != {"include"}:
            raise SpecError(f"{where}an include entry holds only 'include: FILE', found {sorted(item)}")
        target = item["include"]
        if not isinstance(target, str) or not target or len(target) > 1000:
            raise SpecError(
                f"{where}'include' names a spec file (relative to this one) or a catalog spec, got {short_repr(target, 60)}"
            )
        path = _include_path(target, file, where)
        ident = _identity(str(path))
        if ident in chain:
            names = [Path(c).name for c in (*chain, ident)]
            raise SpecError(f"{where}include cycle: {' -> '.join(names)}")
        if len(chain) > MAX_INCLUDE_DEPTH:
            raise SpecError(
                f"{where}include {target!r}: includes nested more than {MAX_INCLUDE_DEPTH} deep ({' -> '.join(Path(c).name for c in chain)})"
            )
        budget[0] += 1
        if budget[0] > MAX_INCLUDES:
            raise SpecError(f"{where}include {target!r}: more than {MAX_INCLUDES} includes in one spec")
        raw = read_regular(path, MAX_SPEC_BYTES, "included spec", SpecError)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"{path}: cannot read included spec: not UTF-8 text ({e.reason} at byte {e.start})") from None
        sub_file = str(path)
        data = _load_yaml(text, sub_file)
        if not isinstance(data, dict) or "rules" not in data:
            raise SpecError(
                f"{sub_file}: an included spec is a mapping with 'rules' (and optional 'vars'); included from {where.rstrip(': ')}"
            )
        klines: dict[str, int] = getattr(data, "key_lines", {})
        for key in data:  # a whole spec may be included (a catalog spec): only its rules and vars are taken
            if key not in _HEADER_FIELDS:
                raise unknown_field(key, _HEADER_FIELDS, f"{sub_file}:{klines.get(key, 1)}: ", "spec field")
        if data.get("version", SPEC_VERSION) != SPEC_VERSION:
            raise SpecError(f"{sub_file}:{klines.get('version', 1)}: spec format version {data['version']!r} is not supported")
        sub_vars = data.get("vars") or {}
        if not isinstance(sub_vars, dict):
            raise SpecError(f"{sub_file}:{klines.get('vars', 1)}: 'vars' must be a mapping of name: default value")
        for k, v in sub_vars.items():
            if k not in all_vars:  # the includer's (and earlier includes') vars win
                all_vars[k] = v
                var_at[str(k)] = f"{sub_file}:{getattr(sub_vars, 'key_lines', {}).get(k, klines.get('vars', 1))}: "
        sub_rules = data["rules"]
        if not isinstance(sub_rules, list):
            raise SpecError(f"{sub_file}:{klines.get('rules', 1)}: 'rules' must be a list")
        out += _expand(sub_rules, sub_file, klines.get("rules", 1), (*chain, ident), all_vars, var_at, budget)
        if len(out) > MAX_RULE_ITEMS:
            raise SpecError(f"{file}: more than {MAX_RULE_ITEMS} rules after includes")
    return out


def _binary_hint(path: Path) -> str:
    """What a binary file given as a spec is, when it is a checkpoint (SPEC and INPUT swapped)."""
    from .errors import StatemapError
    from .load.formats import detect

    try:
        fmt = detect(path)
    except (StatemapError, OSError):
        return ""
    if fmt is None:
        return ""
    return f"; it looks like a checkpoint ({fmt.name}), not a spec: were the spec and the checkpoint swapped?"


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
        raise SpecError(f"{path}: cannot read spec: not UTF-8 text ({e.reason} at byte {e.start}){_binary_hint(path)}") from None
    return parse_spec(_load_yaml(text, str(path)), str(path)).with_vars(vars)


__all__ = [
    "Loc",
    "Rule",
    "Spec",
    "CatalogEntry",
    "catalog_entries",
    "load_spec",
    "parse_spec",
    "Pattern",
    "Template",
    "parse_pattern",
    "parse_template",
]


@dataclass(frozen=True)
class CatalogEntry:
    """One catalog spec, as ``statemap list`` shows it."""

    name: str
    description: str
    source: str
    target: str
    verified: str
    path: str


def catalog_entries() -> list[CatalogEntry]:
    """Every catalog spec, parsed (a broken catalog spec raises SpecError naming its file)."""
    from .catalog import catalog_dir, names

    out = []
    for n in names():
        p = catalog_dir() / f"{n}.yaml"
        s = load_spec(p)
        out.append(CatalogEntry(s.name, s.description, s.source, s.target, s.verified, str(p)))
    return out
