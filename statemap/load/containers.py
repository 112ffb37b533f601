"""Where the model's state dict is inside a loaded object, and what else could have been it.

A checkpoint file holds more than weights: training checkpoints carry the optimizer state, EMA
copies of the model, arguments, RNG states. This module picks the MODEL's state dict and never
mixes in optimizer state:

* a mapping of names to tensors is a state dict where it stands;
* a pickled ``torch.nn.Module`` (``torch.save(model)``; YOLO-style ``{"model": <module>}``) is
  read as ``model.state_dict()`` would be: parameters, then persistent buffers, then each child
  module, from the pickled ``_parameters`` / ``_buffers`` / ``_non_persistent_buffers_set`` /
  ``_modules`` data (nothing is constructed or called);
* in a training checkpoint, the first of :data:`CONTAINER_KEYS` that holds tensors wins, EMA copies
  (``state_dict_ema``, ``ema``, ``model_ema`` ...) come after it, and optimizer / scheduler state
  (by name, or by shape: ``{"state": ..., "param_groups": [...]}``) is never a candidate. The other
  candidates are kept as ``alternatives``; ``unwrap`` picks one of them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from .checkpoint import ByteTensor, LazyTensor, TypedArray
from .unpickle import Opaque, TensorRef, to_plain

CONTAINER_KEYS = ("state_dict", "model", "module", "weights", "model_state_dict", "network", "net", "params")
EMA_KEYS = (
    "state_dict_ema",
    "model_ema",
    "ema",
    "ema_state_dict",
    "ema_model",
    "params_ema",
    "model_ema_state_dict",
    "shadow",
)
OPTIMIZER_KEYS = (
    "optimizer",
    "optimizers",
    "optimizer_states",
    "optimizer_state_dict",
    "optim",
    "opt",
    "opt_state",
    "scheduler",
    "lr_scheduler",
    "lr_schedulers",
    "scaler",
    "grad_scaler",
    "amp",
    "rng_state",
    "rng_tracker_states",
    "callbacks",
    "loops",
)
WRAPPERS = ("params", "state_dict")  # may wrap a nested module tree
MAX_DEPTH = 32
MAX_VISITS = 1_000_000

__all__ = ["choose_container", "flatten", "describe", "module_state", "is_module"]


def _is_array(v: Any) -> bool:
    """A numpy array, checked without importing numpy (no numpy imported means no arrays)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(v, np.ndarray)


def is_tensor(v: Any) -> bool:
    return isinstance(v, (TensorRef, TypedArray, LazyTensor, ByteTensor)) or _is_array(v)


def _state(obj: Opaque) -> Any:
    state = obj.__dict__["state"]
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
        state = {**(state[0] or {}), **state[1]} if isinstance(state[0], dict) else state[1]
    return state


def is_module(v: Any) -> bool:
    """A pickled ``torch.nn.Module``: a placeholder whose state has ``_parameters`` and ``_modules``."""
    if not isinstance(v, Opaque):
        return False
    st = _state(v)
    return isinstance(st, dict) and isinstance(st.get("_parameters"), Mapping) and isinstance(st.get("_modules"), Mapping)


def module_state(obj: Opaque, path: str) -> dict[str, Any]:
    """``model.state_dict()`` of a pickled module, from its pickled data: name -> tensor.

    Example::

        >>> from statemap.load.torch_format import load_zip
        >>> obj, _ = load_zip("yolo.pt")                 # {"model": <a pickled nn.Module>, "epoch": ...}
        >>> sd = module_state(obj["model"], "yolo.pt")   # {'model.0.conv.weight': <tensor>, ...}
        >>> list(sd)[:4]
        ['steps', 'proj_t', 'emb.weight', 'fc.weight']
    """
    out: dict[str, Any] = {}
    budget = [MAX_VISITS]

    def walk(m: Opaque, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{path}: modules nest deeper than {MAX_DEPTH} levels at {prefix!r}")
        budget[0] -= 1
        if budget[0] < 0:  # a module shared by two parents appears under both names, as in torch
            raise CheckpointError(f"{path}: more than {MAX_VISITS} module paths; refusing")
        st = _state(m)
        non_persistent = st.get("_non_persistent_buffers_set") or ()
        for name, t in st["_parameters"].items():
            if t is not None:
                _put(out, prefix + str(name), t, path)
        buffers = st.get("_buffers") or {}
        if isinstance(buffers, Mapping):
            for name, t in buffers.items():
                if t is not None and name not in non_persistent:
                    _put(out, prefix + str(name), t, path)
        for name, child in st["_modules"].items():
            if child is None:
                continue
            if not is_module(child):
                raise CheckpointError(f"{path}: submodule {prefix + str(name)!r} is not a module (corrupt pickle?)")
            walk(child, f"{prefix}{name}.", depth + 1)

    walk(obj, "", 0)
    return out


def _put(out: dict[str, Any], name: str, t: Any, path: str) -> None:
    if not is_tensor(t):
        raise CheckpointError(f"{path}: parameter or buffer {name!r} is not a tensor")
    out[name] = t


def _has_tensors(v: Any, depth: int = 0) -> bool:
    if is_tensor(v) or is_module(v):
        return True
    if depth > 6:
        return False
    if isinstance(v, Mapping):
        return any(_has_tensors(x, depth + 1) for x in v.values())
    return False


def _mostly_tensors(v: Any) -> bool:
    if not isinstance(v, Mapping) or not v:
        return False
    n = sum(1 for x in v.values() if is_tensor(x))
    return n * 2 >= len(v)


def _is_optimizer(key: Any, v: Any) -> bool:
    if str(key).lower() in OPTIMIZER_KEYS or "optimizer" in str(key).lower():
        return True
    return isinstance(v, Mapping) and "param_groups" in v and "state" in v


def _rank(key: str) -> tuple[int, int]:
    if key in CONTAINER_KEYS:
        return (0, CONTAINER_KEYS.index(key))
    if key in EMA_KEYS:
        return (1, EMA_KEYS.index(key))
    return (2, 0)


def _candidates(cur: Mapping[Any, Any]) -> list[str]:
    """Children that may be the model's state dict, best first (never optimizer state)."""
    out = []
    for k, v in cur.items():
        if not isinstance(k, str) or _is_optimizer(k, v):
            continue
        if is_module(v) or (isinstance(v, Mapping) and (k in CONTAINER_KEYS or k in EMA_KEYS) and _has_tensors(v)):
            out.append(k)
        elif _mostly_tensors(v):
            out.append(k)
    return sorted(out, key=_rank)


def choose_container(obj: Any, unwrap: tuple[str, ...] | None, path: str) -> tuple[Any, str, list[str]]:
    """Return (the state dict object, its path like ``"model"``, alternative paths)."""
    if unwrap is not None:
        cur: Any = obj
        walked: list[str] = []
        for part in unwrap:
            if is_module(cur):
                cur = module_state(cur, path)
            if not isinstance(cur, Mapping):
                raise CheckpointError(
                    f"{path}: cannot unwrap {'/'.join(unwrap)!r}: {'/'.join(walked) or 'top level'} is not a mapping"
                )
            if part not in cur:
                keys = ", ".join(map(str, list(cur)[:12]))
                raise CheckpointError(f"{path}: cannot unwrap {'/'.join(unwrap)!r}: no key {part!r} (keys: {keys})")
            cur = cur[part]
            walked.append(part)
        if is_module(cur):
            cur = module_state(cur, path)
        return cur, "/".join(unwrap), []
    # Descend into a child when it is a flat state dict (name -> tensor), a pickled module, or
    # through the wrappers `params` / `state_dict`; a nested module tree (Flax: model/encoder/...)
    # is flattened where it stands, so its top-level names stay part of the keys -- unless it has
    # optimizer state beside it (Megatron-LM: {"model": {"language_model": ...}, "optimizer": ...}).
    cur = obj
    walked = []
    alternatives: list[str] = []
    for _ in range(4):
        if is_module(cur):
            return module_state(cur, path), "/".join(walked), alternatives
        if not isinstance(cur, Mapping) or _mostly_tensors(cur):
            break
        cands = _candidates(cur)
        holders = [k for k, v in cur.items() if isinstance(v, Mapping) and _has_tensors(v) or is_module(v)]
        optim = [k for k in holders if _is_optimizer(k, cur[k])]
        nxt = next(
            (
                k
                for k in cands
                if (k in CONTAINER_KEYS or k in EMA_KEYS)
                and (
                    is_module(cur[k])
                    or _mostly_tensors(cur[k])
                    or k in WRAPPERS
                    or optim
                    or any(c != k and (c in CONTAINER_KEYS or c in EMA_KEYS) for c in cands)
                )
            ),
            None,
        )
        if nxt is None:
            flat = [k for k in cands if _mostly_tensors(cur[k]) or is_module(cur[k])]
            if len(flat) == 1 and all(k == flat[0] or k in optim for k in holders):
                nxt = flat[0]
        if nxt is None:
            break
        prefix = "/".join(walked) + "/" if walked else ""
        alternatives += [prefix + k for k in cands if k != nxt and (k in CONTAINER_KEYS or k in EMA_KEYS or is_module(cur[k]))]
        walked.append(str(nxt))
        cur = cur[nxt]
    if is_module(cur):
        return module_state(cur, path), "/".join(walked), alternatives
    return cur, "/".join(walked), alternatives


def flatten(
    obj: Mapping[Any, Any], prefix: str, out: dict[str, Any], skipped: list[str], depth: int = 0, whole_file: bool = False
) -> None:
    """Nested mappings of tensors -> ``a.b.c`` names. ``whole_file``: the top level of the file is the
    container, so optimizer state found there is skipped, not mixed in."""
    if depth > MAX_DEPTH:
        raise CheckpointError(f"state dict nests deeper than {MAX_DEPTH} levels at {prefix!r}")
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if is_tensor(v):
            out[name] = v
        elif whole_file and depth == 0 and _is_optimizer(k, v) and not is_module(v):
            skipped.append(name)
        elif is_module(v):
            for n, t in module_state(v, "").items():
                out[f"{name}.{n}"] = t
        elif isinstance(v, Mapping) and _has_tensors(v):
            flatten(v, name + ".", out, skipped, depth + 1)
        else:
            skipped.append(name)


def describe(v: Any, _depth: int = 0) -> Any:
    """Plain, printable data for the non-tensor content of a checkpoint."""
    if _depth > 64:
        return "..."
    if isinstance(v, TensorRef):
        return f"<tensor {list(v.shape)} {v.element_dtype}>"
    if isinstance(v, (TypedArray, LazyTensor, ByteTensor)):
        return f"<tensor {list(v.shape)} {v.dtype}>"
    if _is_array(v):
        return f"<array {list(v.shape)} {v.dtype}>"
    if is_module(v):
        return f"<module {v.qualname}>"
    if isinstance(v, Opaque):
        return describe(to_plain(v), _depth + 1)
    if isinstance(v, Mapping):
        return {str(k): describe(x, _depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [describe(x, _depth + 1) for x in v[:64]] + (["..."] if len(v) > 64 else [])
    return v
