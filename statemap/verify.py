"""verify: check a plan's ``assume:`` facts against the tensor bytes, before anything is written.

The planner proves what metadata can prove (two keys on one storage are equal). What is left
is checked here by reading the tensors; a fact that does not hold stops the conversion with
one line naming both keys and how they differ, and nothing is written.

Example::

    >>> import numpy as np
    >>> from statemap import load_spec, make_plan, TensorMeta
    >>> spec = load_spec("name: t\\nversion: 1\\nrules:\\n  - drop: {from: b, assume: {equal: a}}\\n")
    >>> plan = make_plan(spec, [TensorMeta("a", (2,), "float32"), TensorMeta("b", (2,), "float32")])
    >>> run_checks(plan, {"a": np.ones(2, "f4"), "b": np.ones(2, "f4")}.__getitem__)  # raises AssumptionError if not
    ['b == a (<string>:4): bytes compared']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .apply import run_node
from .dtypes import dtype as lookup_dtype
from .errors import AssumptionError
from .meta import Node
from .plan import Check, Plan

if TYPE_CHECKING:
    import numpy as np


def _as_float(a: np.ndarray, dtype: str) -> np.ndarray:
    import numpy as np

    if dtype == "bfloat16":  # stored as uint16 bits: widen to float32
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a


def _where(a: np.ndarray, b: np.ndarray | float) -> str:
    import numpy as np

    diff = np.argwhere(np.asarray(a != b))
    if not len(diff):
        return ""
    first = tuple(int(i) for i in diff[0])
    return f"; {len(diff)} of {a.size} elements differ, first at index {list(first)}"


def _differs(check: Check, evaluate: Callable[[Node], np.ndarray]) -> str:
    """'' when the fact holds; else what differs, for the error line."""
    import numpy as np

    a = np.asarray(evaluate(check.node))
    dt = check.node.dtype
    if check.other_node is not None:
        b = np.asarray(evaluate(check.other_node))
        if a.tobytes() == b.tobytes():
            return ""
        if lookup_dtype(dt).np.kind in "fc" or dt == "bfloat16":
            fa, fb = _as_float(a, dt).astype(np.float64), _as_float(b, dt).astype(np.float64)
            return f"max abs diff {float(np.max(np.abs(fa - fb))):.3g}{_where(a, b)}"
        return f"values differ{_where(a, b)}"
    value = check.value
    assert value is not None
    fa = _as_float(a, dt)
    if a.size == 0 or bool(np.all(fa == value)):
        return ""
    return f"max abs deviation from {value:g} is {float(np.max(np.abs(fa.astype(np.float64) - value))):.3g}{_where(fa, value)}"


def run_checks(plan: Plan, read: Callable[[str], np.ndarray], evaluate: Callable[[Node], np.ndarray] | None = None) -> list[str]:
    """Verify every ``assume:`` fact of ``plan``; return one line per fact and how it was proven.

    ``read`` gives a source tensor's bits; ``evaluate`` (optional) computes a recipe's instead.
    Raises :class:`AssumptionError` at the first fact that does not hold.
    """
    if evaluate is None:

        def evaluate(node: Node) -> np.ndarray:
            return run_node(node, read)

    done: list[str] = []
    for c in plan.checks:
        if c.verified:
            done.append(f"{c.describe()}: {c.verified}")
            continue
        why = _differs(c, evaluate)
        if why:
            if c.why == "replica":
                raise AssumptionError(
                    f"{c.rule.where()}replicas {c.key!r} and {c.other!r} differ ({why}); "
                    "'mode: same' merges only equal copies: nothing was written"
                )
            if c.other:
                raise AssumptionError(
                    f"{c.rule.where()}assumes {c.key!r} equals {c.other!r}, but they differ ({why}); "
                    "the checkpoint does not fit this spec (e.g. an untied head): nothing was written"
                )
            raise AssumptionError(
                f"{c.rule.where()}assumes every element of {c.key!r} is {c.value:g}, but {why}; nothing was written"
            )
        done.append(f"{c.describe()}: bytes compared")
    return done


__all__ = ["run_checks"]
