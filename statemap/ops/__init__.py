"""The ops: every rule a spec may contain, one module per op family.

=================  ============================================
module             ops
=================  ============================================
``rename``         rename
``drop``           drop, keep
``copy``           copy, tie
``inject``         inject
``split_merge``    split, merge (also over a capture)
``transforms``     transpose, permute, reshape, slice, pad, view, cast
``rearrange``      rearrange (einops notation)
=================  ============================================

Each op module holds the op's typed fields, its cross-field checks, its JSON-Schema fragments,
its planning, its inverse and its lint facts (the contract is :class:`~statemap.ops.base.Op`).
:mod:`statemap.plan`, :mod:`statemap.invert`, :mod:`statemap.lint` and :mod:`statemap.schema`
ask the op; none of them names one. Adding an op is one module here (plus its import below)
and its section in docs/spec.md: see docs/architecture.md.
"""

from __future__ import annotations

# isort: off
# importing an op module registers its ops; this order is the order ops are listed in (messages, schema)
from . import rename, drop, copy, inject, split_merge, transforms, rearrange  # noqa: F401

# isort: on
from .base import COMMON, REGISTRY, Ctx, LintFact, Op, register
from .fields import DimOf, Field, int_value, int_yaml
from .keymap import KeyMap, NotInvertible
from .parse import parse_rule

__all__ = [
    "COMMON",
    "REGISTRY",
    "Ctx",
    "DimOf",
    "Field",
    "KeyMap",
    "LintFact",
    "NotInvertible",
    "Op",
    "int_value",
    "int_yaml",
    "parse_rule",
    "register",
]
