"""Turn a loaded object (dicts, placeholders, tensor references) into a :class:`Checkpoint`.

Shared by every format whose file holds a tree of objects (torch pickles, TorchScript archives,
Flax msgpack, DCP folders): the container is chosen (:mod:`.containers`), nested names are
flattened, each tensor gets its byte location or in-memory array, and ``module.`` /
``_orig_mod.`` prefixes are stripped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..meta import TensorMeta
from .checkpoint import ByteTensor, Checkpoint, FileReader, LazyTensor, TypedArray
from .containers import choose_container, describe, flatten, is_module
from .unpickle import Opaque, TensorRef

if TYPE_CHECKING:
    import numpy as np

AUTO_PREFIXES = ("module.", "_orig_mod.")

__all__ = ["from_object", "finish_flat"]


def from_object(
    path: str,
    fmt: str,
    obj: Any,
    locate: Callable[[TensorRef, str], ByteTensor] | None,
    unwrap: tuple[str, ...] | None,
    strip_prefix: tuple[str, ...] | None,
) -> Checkpoint:
    """Choose the container in ``obj`` and build the Checkpoint. ``locate(ref, name)`` gives a
    TensorRef's bytes; other leaves are ByteTensors, arrays, or LazyTensors (read by the format).

    Example::

        >>> from statemap.load.torch_format import load_zip, tensor_location
        >>> obj, locs = load_zip("ckpt.pt")
        >>> ck = from_object("ckpt.pt", "torch-zip", obj, lambda r, k: tensor_location(r, locs, k, "ckpt.pt"), None, None)
        >>> ck.container, len(ck.metas)
        ('model', 395)
    """
    from ..dtypes import from_numpy

    if not isinstance(obj, Mapping) and not is_module(obj):
        if isinstance(obj, (TensorRef, ByteTensor, TypedArray)) or hasattr(obj, "shape"):
            raise CheckpointError(f"{path}: holds a single tensor, not a state dict (save a dict of name -> tensor)")
        what = obj.qualname if isinstance(obj, Opaque) else type(obj).__name__
        raise CheckpointError(f"{path}: holds a {what}, not a state dict or a model")
    container, where, alternatives = choose_container(obj, unwrap, path)
    if not isinstance(container, Mapping):
        raise CheckpointError(f"{path}: {where or 'top level'} is a {type(container).__name__}, not a state dict")
    flat: dict[str, Any] = {}
    skipped: list[str] = []
    flatten(container, "", flat, skipped, whole_file=container is obj)
    if not flat:
        keys = ", ".join(map(str, list(obj)[:12])) if isinstance(obj, Mapping) else type(obj).__name__
        if container is obj and not obj:
            raise CheckpointError(f"{path}: state dict is empty")
        raise CheckpointError(
            f"{path}: no tensors found{' under ' + repr(where) if where else ''} (top-level keys: {keys}); set 'unwrap' to the state dict's key"
        )
    metas: dict[str, TensorMeta] = {}
    locations: dict[str, ByteTensor] = {}
    arrays: dict[str, Any] = {}
    readers: dict[str, Callable[[], np.ndarray]] = {}
    for k, v in flat.items():
        if isinstance(v, TensorRef):
            if locate is None:
                raise CheckpointError(f"{path}: tensor {k!r} has no storage data")
            loc = locate(v, k)
            locations[k] = loc
            metas[k] = TensorMeta(k, loc.shape, loc.dtype)
        elif isinstance(v, ByteTensor):
            locations[k] = v
            metas[k] = TensorMeta(k, v.shape, v.dtype)
        elif isinstance(v, TypedArray):
            arrays[k] = v.array
            metas[k] = TensorMeta(k, tuple(v.array.shape), v.dtype)
        elif isinstance(v, LazyTensor):
            readers[k] = v.read
            metas[k] = TensorMeta(k, v.shape, v.dtype)
        else:
            arrays[k] = v
            metas[k] = TensorMeta(k, tuple(v.shape), from_numpy(v.dtype).name)
    top = where.split("/")[0] if where else None
    extras = {}
    if isinstance(obj, Mapping) and container is not obj:
        extras = {str(k): describe(v) for k, v in obj.items() if str(k) != top}
    files = FileReader()

    def read(k: str) -> np.ndarray:
        if k in arrays:
            return arrays[k]
        if k in readers:
            return readers[k]()
        return files.read(locations[k])

    ck = Checkpoint(
        path,
        fmt,
        metas,
        read,
        container=where,
        extras=extras,
        skipped=skipped,
        locations=locations,
        storage_ids={k: v.storage for k, v in locations.items()},
        closer=files.close,
        alternatives=alternatives,
    )
    return finish_flat(ck, strip_prefix)


def finish_flat(ck: Checkpoint, strip_prefix: tuple[str, ...] | None) -> Checkpoint:
    """Strip ``module.`` / ``_orig_mod.`` style prefixes; keep readers keyed by original names."""
    if strip_prefix == ():
        return ck
    names = list(ck.metas)
    rename: dict[str, str] = {}
    if strip_prefix is None and not any(all(n.startswith(pre) for n in names) for pre in AUTO_PREFIXES):
        return ck  # no key set carries an automatic prefix (the usual case: decided by the first key)
    if strip_prefix is None:
        stripped = ""
        changed = True
        cur = dict(zip(names, names))
        while changed and cur:
            changed = False
            for pre in AUTO_PREFIXES:
                if all(v.startswith(pre) for v in cur.values()):
                    cur = {k: v[len(pre) :] for k, v in cur.items()}
                    stripped += pre
                    changed = True
        rename = {k: v for k, v in cur.items() if k != v}
    else:
        stripped = ",".join(strip_prefix)
        for n in names:
            for pre in strip_prefix:
                if n.startswith(pre):
                    rename[n] = n[len(pre) :]
                    break
    if not rename:
        return ck
    new_names = [rename.get(n, n) for n in names]
    if len(set(new_names)) != len(new_names):
        seen: set[str] = set()
        dup = next(n for n in new_names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise CheckpointError(f"{ck.path}: stripping {stripped!r} makes two keys named {dup!r}")
    back = {rename.get(n, n): n for n in names}
    old_read = ck.reader
    ck.metas = {rename.get(n, n): TensorMeta(rename.get(n, n), m.shape, m.dtype) for n, m in ck.metas.items()}
    ck.reader = lambda k: old_read(back[k])
    ck.locations = {rename.get(k, k): v for k, v in ck.locations.items()}
    ck.storage_ids = {rename.get(k, k): v for k, v in ck.storage_ids.items()}
    ck.stripped_prefix = stripped
    return ck
