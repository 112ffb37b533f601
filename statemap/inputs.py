"""Several input files: the ``inputs:`` spec header, parsed and checked (no file is touched here).

``inputs: "consolidated.{rank:int}.pth"`` names every file of a model-parallel checkpoint by a
pattern relative to the input folder; each capture binds within one path component (never
across ``/``). Keys are addressed by ``key`` (a template over the captures and ``key``); the
default joins the capture values with ``/`` and puts the key last: file ``consolidated.00.pth``
gives keys ``00/layers.0.attention.wq.weight``.

Example::

    >>> inp = parse_inputs("mp_rank_{tp:int}/model_optim_rng.pt")
    >>> inp.captures, inp.key
    (('tp',), '{tp}/{key}')
    >>> inp.key_for({"tp": "01"}, "embedding.weight")
    '01/embedding.weight'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .template import Pattern, Template, _fields, parse_pattern, parse_template

MAX_INPUT_FILES = 4096  # files one `inputs:` pattern may name
MAX_PATTERN_CHARS = 1000

__all__ = ["Inputs", "parse_inputs", "MAX_INPUT_FILES"]


@dataclass(frozen=True)
class Inputs:
    """The parsed ``inputs:`` header: a file pattern (one :class:`Pattern` per path component)
    and the key template. ``kinds`` maps each capture to ``seg`` / ``int``."""

    files: str
    key: str
    components: tuple[Pattern, ...]
    captures: tuple[str, ...]
    kinds: tuple[tuple[str, str], ...]
    template: Template

    def key_for(self, captures: Mapping[str, str], key: str) -> str:
        """The key a tensor named ``key`` in the file with ``captures`` is addressed by."""
        return self.template.fill({**captures, "key": key})

    def order(self, captures: Mapping[str, str]) -> tuple[Any, ...]:
        """Sort key of a file: its captures in pattern order, ``int`` captures numerically."""
        kinds = dict(self.kinds)
        return tuple((0, int(captures[c]), "") if kinds[c] == "int" else (1, 0, captures[c]) for c in self.captures)

    def with_files(self, files: str) -> Inputs:
        """The same key template over another file pattern (the CLI may name the pattern itself)."""
        default = self.key == default_key(self.captures)
        out = parse_inputs(files, None if default else self.key)
        return out


def default_key(captures: tuple[str, ...]) -> str:
    return "".join(f"{{{c}}}/" for c in captures) + "{key}"


def parse_inputs(files: Any, key: Any = None) -> Inputs:
    """Check an ``inputs:`` pattern and key template; raise :class:`SpecError` saying what is wrong."""
    if not isinstance(files, str) or not files.strip():
        raise SpecError(f"'inputs' names the files with a pattern such as 'consolidated.{{rank:int}}.pth', got {files!r}")
    if len(files) > MAX_PATTERN_CHARS:
        raise SpecError(f"'inputs' pattern longer than {MAX_PATTERN_CHARS} characters")
    if files.startswith("re:"):
        raise SpecError("'inputs' takes a file pattern with {name} / {name:int} captures, not a regex")
    if files.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", files) or "\\" in files:
        raise SpecError(f"'inputs' pattern {files!r} must be relative to the input folder, with '/' between folders")
    components: list[Pattern] = []
    names: list[str] = []
    kinds: dict[str, str] = {}
    for comp in files.split("/"):
        if comp in ("", ".", ".."):
            raise SpecError(f"'inputs' pattern {files!r}: path component {comp!r} is not allowed (no empty, '.' or '..' parts)")
        for kind, value in _fields(comp):
            if kind != "field":
                continue
            name, _, typ = value.partition(":")
            name, typ = name.strip(), typ.strip() or "seg"
            if typ not in ("seg", "int"):
                raise SpecError(
                    f"'inputs' pattern {files!r}: capture {{{value}}} must be {{{name}}} or {{{name}:int}} "
                    "(a capture stays inside one file or folder name)"
                )
            if name == "key":
                raise SpecError(f"'inputs' pattern {files!r}: 'key' is reserved for the tensor's key; name the capture otherwise")
            if name in kinds and kinds[name] != typ:
                raise SpecError(f"'inputs' pattern {files!r}: capture {name!r} is given two types")
            if name not in kinds:
                names.append(name)
            kinds[name] = typ
        try:
            components.append(parse_pattern(comp))
        except SpecError as e:
            raise SpecError(f"'inputs' pattern {files!r}: {e}") from None
    if key is None:
        key = default_key(tuple(names))
    if not isinstance(key, str) or not key:
        raise SpecError(f"'inputs' key must be a template such as '{default_key(tuple(names))}', got {key!r}")
    try:
        template = parse_template(key)
    except SpecError as e:
        raise SpecError(f"'inputs' key {key!r}: {e}") from None
    unknown = template.names - set(names) - {"key"}
    if unknown:
        raise SpecError(f"'inputs' key {key!r} uses {sorted(unknown)}, which the file pattern {files!r} does not capture")
    if "key" not in template.names:
        raise SpecError(f"'inputs' key {key!r} must contain {{key}} (the tensor's name in its file)")
    if set(names) - template.names:
        missing = sorted(set(names) - template.names)
        raise SpecError(
            f"'inputs' key {key!r} leaves out the capture(s) {missing}: keys of different files would collide; "
            f"e.g. key: '{default_key(tuple(names))}'"
        )
    return Inputs(files, key, tuple(components), tuple(names), tuple(kinds.items()), template)
