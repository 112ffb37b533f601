"""The thin torch adapter: torch tensors <-> numpy arrays in statemap's storage form.

The only module that imports torch, and only when called.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dtypes import dtype as lookup_dtype


def to_numpy(t: Any) -> tuple[np.ndarray, str]:
    """A torch tensor -> (numpy array holding its bits, dtype name). No copy when contiguous on CPU."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    name = str(t.dtype).removeprefix("torch.")
    dt = lookup_dtype(name)
    t = t.contiguous()
    if dt.name == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16), dt.name
    if not dt.native:
        return t.view(torch.uint8).numpy().view(dt.np), dt.name
    return t.numpy(), dt.name


def require_torch(what: str) -> Any:
    """``import torch``, or one clear error saying what needs it and what works without it.

    Example::

        >>> require_torch("writing out.pt").__name__
        'torch'
    """
    try:
        import torch
    except ImportError:
        from .errors import StatemapError

        raise StatemapError(
            f"{what} needs torch, which is not installed: pip install torch (safetensors files need no torch)"
        ) from None
    return torch


def to_torch(a: np.ndarray, dtype_name: str) -> Any:
    """Numpy bits -> a torch tensor of ``dtype_name`` (copies read-only arrays)."""
    torch = require_torch("returning torch tensors")

    dt = lookup_dtype(dtype_name)
    a = np.asarray(a, order="C")
    if not a.flags.writeable:
        a = a.copy()
    if dt.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if not dt.native:
        return torch.from_numpy(a.view(np.uint8)).view(getattr(torch, dt.name))
    return torch.from_numpy(a)
