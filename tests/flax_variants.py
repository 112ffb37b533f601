"""Shared harness for the PyTorch <-> Flax variant matrices (tests/test_catalog_flax_*.py).

The anchor is transformers' own converter, never a re-implementation of it:

- PT -> Flax: ``transformers.modeling_flax_pytorch_utils.convert_pytorch_state_dict_to_flax``;
- Flax -> PT: ``transformers.modeling_flax_pytorch_utils.load_flax_weights_in_pytorch_model``.

``convert_pytorch_state_dict_to_flax(pt_state_dict, flax_model)`` reads only ``flax_model.params``
(for the key tree and shapes) and ``flax_model.base_model_prefix``; it is given a model built with
``_do_init=False`` through :class:`ShapeView`, which holds the model's real ``params_shape_tree``
(``jax.eval_shape``: no random weights computed). It returns EVERY PyTorch key it saw, renamed,
including ones the Flax model has no parameter for ("also add unexpected weight so that warning is
thrown": e.g. a tied decoder as ``decoder.kernel``); ``FlaxPreTrainedModel.from_pretrained`` then
discards those with a warning. :func:`anchor_pt_to_flax` therefore returns ``(params, extra)``: the
anchor restricted to the Flax model's param keys (what the Flax model ends up holding), and the
extra keys, which callers check are exactly the tied / non-parameter names they expect.

``load_flax_weights_in_pytorch_model(pt_model, flax_params)`` copies into a PyTorch model; keys the
Flax params lack keep the PyTorch model's values (tied ones follow their partner). The anchor's
result is the PyTorch model's ``state_dict()`` afterwards (:func:`anchor_flax_to_pt`); the model
starts from a seeded random init whose values differ from any source, so a key the anchor did not
fill shows up as a mismatch instead of passing by accident.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

__all__ = [
    "ShapeView",
    "anchor_flax_to_pt",
    "anchor_pt_to_flax",
    "bitwise_diff",
    "bits",
    "flat",
    "flax_model_and_shapes",
    "flax_outputs",
    "max_diff",
    "perturbed_flax_params",
    "perturbed_pt_model",
    "pt_outputs",
    "unflat",
]


def _transformers_cls(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def flat(tree: Any) -> dict[str, Any]:
    """A nested Flax param tree flattened with "." (the layout the catalog specs use)."""
    from flax.traverse_util import flatten_dict

    return flatten_dict(tree, sep=".")


def unflat(d: Mapping[str, Any]) -> Any:
    from flax.traverse_util import unflatten_dict

    return unflatten_dict(dict(d), sep=".")


def bits(t: Any) -> bytes:
    """dtype + shape + bytes of a torch tensor / numpy / jax array: equal bits <=> equal bytes."""
    import torch

    a = t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return a.dtype.str.encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes()


def bitwise_diff(got: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """Keys that are missing, unexpected or not bitwise equal (empty list: identical)."""
    bad = [f"missing {k}" for k in want if k not in got] + [f"unexpected {k}" for k in got if k not in want]
    bad += [f"differs {k}" for k in want if k in got and bits(got[k]) != bits(want[k])]
    return bad


def max_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def perturbed_pt_model(cls_name: str, config: Any, seed: int = 0) -> Any:
    """A real transformers PyTorch model with EVERY parameter perturbed (tied ones once), eval mode."""
    import torch

    torch.manual_seed(seed)
    model = _transformers_cls(cls_name)(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@dataclass(frozen=True)
class ShapeView:
    """What convert_pytorch_state_dict_to_flax reads of a Flax model: params (shapes) and prefix."""

    params: Any
    base_model_prefix: str


def flax_model_and_shapes(cls_name: str, config: Any) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """A Flax model built with _do_init=False and its flattened param shapes (no weights computed)."""
    model = _transformers_cls(cls_name)(config, _do_init=False)
    return model, {k: tuple(v.shape) for k, v in flat(model.params_shape_tree).items()}


def anchor_pt_to_flax(pt_state_dict: Mapping[str, Any], flax_model: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """transformers' PT -> Flax conversion: (params on the Flax model's keys, extra keys it also returned)."""
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    view = ShapeView(flax_model.params_shape_tree, flax_model.base_model_prefix)
    # the converter replaces the dict's values by numpy arrays: give it a copy
    out = {k: np.asarray(v) for k, v in flat(convert_pytorch_state_dict_to_flax(dict(pt_state_dict), view)).items()}
    keys = set(flat(flax_model.params_shape_tree))
    return {k: v for k, v in out.items() if k in keys}, {k: v for k, v in out.items() if k not in keys}


def anchor_flax_to_pt(cls_name: str, config: Any, flax_params: Any, seed: int = 12345) -> dict[str, Any]:
    """transformers' Flax -> PT conversion: the state_dict() of a fresh PyTorch model it loaded into."""
    import torch
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    torch.manual_seed(seed)
    model = _transformers_cls(cls_name)(config).eval()
    # writable numpy copies (torch.from_numpy warns on read-only arrays such as np.asarray(jax array))
    load_flax_weights_in_pytorch_model(model, unflat({k: np.array(a) for k, a in flat(flax_params).items()}))
    return {k: v.clone() for k, v in model.state_dict().items()}


def perturbed_flax_params(params: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Flat Flax params with noise added (a native Flax source whose values no PyTorch model had)."""
    rng = np.random.default_rng(seed)
    return {k: (np.asarray(v) + rng.standard_normal(np.shape(v)) * 0.02).astype(np.asarray(v).dtype) for k, v in params.items()}


def _arrays(out: Any, to_np: Callable[[Any], np.ndarray]) -> dict[str, np.ndarray]:
    res = {}
    for k in out.keys():
        v = out[k]
        if hasattr(v, "shape") and k not in ("past_key_values",):
            res[k] = to_np(v)
    return res


def pt_outputs(model: Any, ids: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every array field of a PyTorch model's output on fixed ids (logits, hidden states, ...)."""
    import torch

    kw: dict[str, Any] = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        out = model(torch.from_numpy(ids), **kw, return_dict=True)
    return _arrays(out, lambda t: t.numpy())


def flax_outputs(model: Any, params: Mapping[str, Any], ids: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every array field of a Flax model's output with the given flat params."""
    kw: dict[str, Any] = {} if mask is None else {"attention_mask": mask}
    out = model(ids, params=unflat(params), **kw)
    return _arrays(out, np.asarray)
