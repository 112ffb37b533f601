"""Load and lay out transformers models the same way under transformers 4.x and 5.x.

transformers 5 renames some models' weights in memory and converts them when loading and saving
(its checkpoint conversion mapping): a ViT's ``encoder.layer.0.attention.attention.query.weight``
on disk is ``layers.0.attention.q_proj.weight`` in memory. The catalog writes the layout
``save_pretrained`` writes, which loads with ``from_pretrained`` under both majors; under 4.x it
is also exactly what ``load_state_dict(strict=True)`` asks for. CI runs the tests marked
``transformers`` under both majors (.ci/run).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

TF_MAJOR = int(transformers.__version__.split(".")[0])

__all__ = ["TF_MAJOR", "features", "load_converted", "loading_problems", "saved_layout"]


def loading_problems(info: dict[str, Any]) -> dict[str, list[str]]:
    """The non-empty entries of ``from_pretrained(..., output_loading_info=True)``'s info
    (lists under 4.x, sets under 5.x)."""
    keys = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    return {k: sorted(map(str, info[k])) for k in keys if info.get(k)}


def load_converted(cls: Any, config: Any, state_dict: dict[str, torch.Tensor], **model_kwargs: Any) -> Any:
    """A ``cls`` model holding ``state_dict`` (a converted checkpoint), loaded strictly, in eval mode.

    4.x: ``cls(config).load_state_dict(state_dict, strict=True)``. 5.x: ``cls.from_pretrained(None,
    config=config, state_dict=state_dict)`` (float32, as the 4.x path), which applies transformers'
    own conversion from the saved names; any missing, unexpected or mismatched key fails.
    """
    if TF_MAJOR < 5:
        model = cls(config, **model_kwargs)
        model.load_state_dict(state_dict, strict=True)
        return model.eval()
    model, info = cls.from_pretrained(
        None, config=config, state_dict=dict(state_dict), output_loading_info=True, dtype=torch.float32, **model_kwargs
    )
    problems = loading_problems(info)
    if problems:
        raise RuntimeError(f"{cls.__name__} did not load the converted state dict strictly: {problems}")
    return model.eval()


def saved_layout(model: Any) -> dict[str, torch.Tensor]:
    """The state dict under the names ``save_pretrained`` writes (tied duplicates kept): 4.x
    ``state_dict()``; 5.x the same reversed through transformers' ``revert_weight_conversion``
    (what save_pretrained calls). Works on meta-device models."""
    sd = model.state_dict()
    if TF_MAJOR < 5:
        return dict(sd)
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, dict(sd)))


def features(out: Any) -> torch.Tensor:
    """CLIP ``get_image_features`` / ``get_text_features``: a tensor under 4.x, an output whose
    ``pooler_output`` holds the projected features under 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
