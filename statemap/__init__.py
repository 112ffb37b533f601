"""statemap: map PyTorch state dicts between layouts with YAML specs.

The data flow, one module each: ``load`` -> ``plan`` -> ``apply`` -> ``write`` -> ``report``.

Example::

    import statemap
    new_sd, report = statemap.map_state_dict("deltalm-fairseq-to-hf", fairseq_model.state_dict())
    hf_model.load_state_dict(new_sd, strict=True)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import convert, load_state_dict, map_state_dict, save_state_dict
from .diff import diff_checkpoints
from .errors import CheckpointError, OutputError, PlanError, SpecError, StatemapError, UnsafeCheckpointError
from .load import Checkpoint, from_state_dict, open_checkpoint
from .meta import TensorMeta
from .plan import Plan, make_plan
from .report import Report
from .spec import Spec, load_spec

__all__ = [
    "__version__",
    "load_spec",
    "convert",
    "map_state_dict",
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
