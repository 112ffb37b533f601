"""statemap: map PyTorch state dicts between layouts with YAML specs.

The data flow, one module each: ``load`` -> ``plan`` -> ``apply`` -> ``write`` -> ``report``.

Example::

    >>> import statemap
    >>> fairseq_sd = statemap.load_state_dict("checkpoint_best.pt")     # or fairseq_model.state_dict()
    >>> new_sd, report = statemap.map_state_dict("deltalm-fairseq-to-hf", fairseq_sd)
    >>> report.ok, len(new_sd)
    (True, 395)
    >>> # then: hf_model.load_state_dict(new_sd, strict=True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Names are imported on first use (PEP 562), so `import statemap` and metadata-only commands
# stay fast: each command loads only the modules its step of load -> plan -> apply -> write needs.
_EXPORTS = {
    "convert": "api",
    "map_state_dict": "api",
    "iter_state_dict": "iterate",
    "load_state_dict": "api",
    "save_state_dict": "api",
    "diff_checkpoints": "diff",
    "CheckpointError": "errors",
    "OutputError": "errors",
    "PlanError": "errors",
    "SpecError": "errors",
    "StatemapError": "errors",
    "UnsafeCheckpointError": "errors",
    "Checkpoint": "load",
    "from_state_dict": "load",
    "open_checkpoint": "load",
    "TensorMeta": "meta",
    "Plan": "plan",
    "make_plan": "plan",
    "Report": "report",
    "Spec": "spec",
    "load_spec": "spec",
}


if TYPE_CHECKING:  # static view for type checkers and IDEs
    from .api import convert, load_state_dict, map_state_dict, save_state_dict
    from .diff import diff_checkpoints
    from .errors import CheckpointError, OutputError, PlanError, SpecError, StatemapError, UnsafeCheckpointError
    from .iterate import iter_state_dict
    from .load import Checkpoint, from_state_dict, open_checkpoint
    from .meta import TensorMeta
    from .plan import Plan, make_plan
    from .report import Report
    from .spec import Spec, load_spec


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'statemap' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [
    "__version__",
    "load_spec",
    "convert",
    "map_state_dict",
    "iter_state_dict",
    "load_state_dict",
    "save_state_dict",
    "open_checkpoint",
    "from_state_dict",
    "make_plan",
    "diff_checkpoints",
    "Spec",
    "Plan",
    "Report",
    "Checkpoint",
    "TensorMeta",
    "StatemapError",
    "SpecError",
    "PlanError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "OutputError",
]
