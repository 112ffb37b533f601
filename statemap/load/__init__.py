"""load: open any supported checkpoint as a :class:`Checkpoint` (metadata first, bytes later).

Formats (one module each, registered in :data:`statemap.load.formats.FORMATS`, recognised from
the bytes): safetensors (single, sharded with ``*.safetensors.index.json``), torch.save files
(zip and legacy), TorchScript archives (``torch.jit.save``), pickled ``nn.Module`` s, HF
``pytorch_model.bin.index.json`` shards, torch.distributed.checkpoint folders, numpy ``.npz``,
plain pickles of numpy arrays (Paddle ``.pdparams``), Flax msgpack, a directory holding one of
these, and in-memory dicts of torch tensors or numpy arrays.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, StatemapError
from ..meta import TensorMeta
from .build import finish_flat
from .checkpoint import ByteTensor, Checkpoint
from .formats import FORMATS, detect, open_path

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Checkpoint", "open_checkpoint", "from_state_dict", "ByteTensor", "FORMATS", "detect", "finish_flat"]


def open_checkpoint(
    path: str | os.PathLike[str],
    unwrap: str | Sequence[str] | None = None,
    strip_prefix: tuple[str, ...] | None = None,
) -> Checkpoint:
    """Open a checkpoint file or directory; read metadata only (see :func:`_open`)."""
    try:
        return _open(path, unwrap, strip_prefix)
    except StatemapError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # a malformed file must give one clear error, never a traceback
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def _open(
    path: str | os.PathLike[str],
    unwrap: str | Sequence[str] | None = None,
    strip_prefix: tuple[str, ...] | None = None,
) -> Checkpoint:
    """Open a checkpoint file or directory; read metadata only.

    The format is recognised from the file's bytes (:mod:`statemap.load.formats`), not its name.
    ``unwrap``: path of keys to the state dict inside the file (``"model"``, ``"model/language_model"``
    or ``("model", "language_model")``); None picks the model's state dict (``state_dict``,
    ``model``, ``module``, ``weights``, ..., a pickled module, never optimizer state) and lists the
    other candidates in ``Checkpoint.alternatives``; ``()`` or ``""`` uses the top level.
    ``strip_prefix``: prefixes to remove from keys; None strips ``module.`` / ``_orig_mod.`` when
    every key carries it.

    Example::

        >>> ck = open_checkpoint("checkpoint_best.pt")        # fairseq: finds "model"
        >>> ck.container, len(ck.metas)
        ('model', 395)
        >>> open_checkpoint("timm_train.pth.tar").alternatives   # timm's CheckpointSaver with an EMA model
        ['state_dict_ema']
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return open_path(p, unwrap_path(unwrap), strip_prefix)


def unwrap_path(unwrap: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"a/b"``, ``("a", "b")`` or ``["a/b"]`` -> ``("a", "b")``; None stays None (auto)."""
    if unwrap is None:
        return None
    items = [unwrap] if isinstance(unwrap, str) else list(unwrap)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise CheckpointError(f"unwrap: {item!r} is not a key (give 'a/b' or a tuple of strings)")
        out += [part for part in item.split("/") if part]
    return tuple(out)


def from_state_dict(state: Mapping[str, Any], name: str = "<state_dict>") -> Checkpoint:
    """Wrap an in-memory dict of torch tensors or numpy arrays (e.g. ``model.state_dict()``)."""
    import numpy as np

    from ..dtypes import from_numpy

    if not isinstance(state, Mapping):
        raise CheckpointError(f"{name}: expected a mapping of name -> tensor, got {type(state).__name__}")
    metas: dict[str, TensorMeta] = {}
    arrays: dict[str, np.ndarray] = {}
    storage_ids: dict[str, str] = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{name}: key {k!r} is not a string")
        if isinstance(v, np.ndarray):
            dt = from_numpy(v.dtype).name
            arrays[k] = np.asarray(v.astype(v.dtype.newbyteorder("<"), copy=False), order="C")
        elif type(v).__module__.startswith("torch"):
            from ..torch_adapter import to_numpy

            arrays[k], dt = to_numpy(v)
            try:
                # one tensor = same storage, offset, shape and stride (views into one buffer are not ties)
                storage_ids[k] = f"mem:{v.untyped_storage().data_ptr()}:{v.storage_offset()}:{tuple(v.shape)}:{v.stride()}"
            except Exception:
                pass
        else:
            raise CheckpointError(f"{name}: value of {k!r} is {type(v).__name__}, not a tensor")
        metas[k] = TensorMeta(k, tuple(int(d) for d in arrays[k].shape), dt)
    if not metas:
        raise CheckpointError(f"{name}: state dict is empty")
    return Checkpoint(name, "memory", metas, arrays.__getitem__, storage_ids=storage_ids)
