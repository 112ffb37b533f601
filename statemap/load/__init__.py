"""load: open any supported checkpoint as a :class:`Checkpoint` (metadata first, bytes later).

Formats: safetensors (single, sharded with ``*.safetensors.index.json``), torch.save files
(zip and legacy; ``.pt .pth .bin .ckpt``), HF ``pytorch_model.bin.index.json`` shards,
plain pickles of numpy arrays (Paddle ``.pdparams``), a directory holding one of these,
and in-memory dicts of torch tensors or numpy arrays.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, StatemapError
from ..fsutil import check_regular, read_regular
from ..meta import TensorMeta
from .checkpoint import ByteTensor, Checkpoint, FileReader, TypedArray
from .safetensors_format import read_header
from .torch_format import is_zip, load_pickle_file, load_zip, tensor_location
from .unpickle import Opaque, TensorRef, to_plain

if TYPE_CHECKING:
    import numpy as np

CONTAINER_KEYS = ("state_dict", "model", "module", "weights", "model_state_dict", "network", "net", "params", "params_ema", "ema")
AUTO_PREFIXES = ("module.", "_orig_mod.")
WRAPPERS = ("params", "state_dict")  # may wrap a nested module tree
MAX_INDEX = 64 << 20

__all__ = ["Checkpoint", "open_checkpoint", "from_state_dict", "ByteTensor"]


def open_checkpoint(
    path: str | os.PathLike[str],
    unwrap: tuple[str, ...] | None = None,
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
    unwrap: tuple[str, ...] | None = None,
    strip_prefix: tuple[str, ...] | None = None,
) -> Checkpoint:
    """Open a checkpoint file or directory; read metadata only.

    ``unwrap``: path of keys to the state dict inside the file (``("model",)``); None
    auto-detects (``state_dict``, ``model``, ``module``, ``weights``, ...); ``()`` uses the
    top level. ``strip_prefix``: prefixes to remove from keys; None strips ``module.`` /
    ``_orig_mod.`` when every key carries it.

    Example::

        >>> ck = open_checkpoint("checkpoint_best.pt")        # fairseq: finds "model"
        >>> ck.container, len(ck.metas)
        ('model', 395)
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        p = _pick_in_dir(p)
    check_regular(p, "checkpoint")  # a FIFO or /dev/zero would hang or eat memory
    name = p.name
    if name.endswith(".index.json"):
        ck = _open_index(p)
        return _finish_flat(ck, strip_prefix)
    if name.endswith(".safetensors"):
        metas, st_locs, meta = read_header(str(p))
        files = FileReader()
        ck = Checkpoint(
            str(p),
            "safetensors",
            metas,
            lambda k: files.read(st_locs[k]),
            metadata=meta,
            locations=st_locs,
            storage_ids={k: v.storage for k, v in st_locs.items()},
            closer=files.close,
        )
        return _finish_flat(ck, strip_prefix)
    if name.endswith(".msgpack"):
        from .flax_format import read_msgpack

        return _from_object(str(p), "flax-msgpack", read_msgpack(str(p)), {}, unwrap, strip_prefix)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror}") from None
    if size == 0:
        raise CheckpointError(f"{p}: file is empty")
    if is_zip(str(p)):
        obj, locs = load_zip(str(p))
        fmt = "torch-zip"
    else:
        obj, locs, fmt = load_pickle_file(str(p))
    return _from_object(str(p), fmt, obj, locs, unwrap, strip_prefix)


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


# -- helpers -------------------------------------------------------------------------------


def _pick_in_dir(d: Path) -> Path:
    for cand in (
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
        "flax_model.msgpack",
    ):
        if (d / cand).is_file():
            return d / cand
    files = [
        f
        for f in sorted(d.iterdir())
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pdparams", ".msgpack")
    ]
    indexes = [f for f in sorted(d.iterdir()) if f.name.endswith(".index.json")]
    if len(indexes) == 1:
        return indexes[0]
    if len(files) == 1:
        return files[0]
    listing = ", ".join(f.name for f in sorted(d.iterdir())[:10]) or "nothing"
    raise CheckpointError(f"{d}: directory holds no single checkpoint to read (found: {listing}); name the file")


def _open_index(p: Path) -> Checkpoint:
    """Sharded checkpoint: validate the whole index and every shard header before any read."""
    raw = read_regular(p, MAX_INDEX, "index file")
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: index is not valid JSON: {e}") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{p}: index has no 'weight_map' mapping tensor names to shard files")
    shards: dict[str, list[str]] = {}
    for tensor, shard in wm.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{p}: weight_map[{tensor!r}] must be a shard file name")
        if shard.endswith(".index.json"):
            raise CheckpointError(f"{p}: weight_map[{tensor!r}] = {shard!r} is an index, not a shard file")
        pp = PurePosixPath(shard)
        if pp.is_absolute() or ".." in pp.parts or "\\" in shard or os.path.isabs(shard):
            raise CheckpointError(f"{p}: weight_map[{tensor!r}] = {shard!r} points outside the checkpoint folder; refusing")
        shards.setdefault(shard, []).append(tensor)
    for shard in shards:
        if not (p.parent / shard).is_file():
            raise CheckpointError(f"{p}: shard {shard!r} is missing (named by {len(shards[shard])} tensors)")
    metas: dict[str, TensorMeta] = {}
    readers: dict[str, Checkpoint] = {}
    owner: dict[str, str] = {}
    fmt = "safetensors-sharded"
    for shard in shards:
        ck = _open(p.parent / shard, unwrap=None, strip_prefix=())
        fmt = "safetensors-sharded" if ck.format == "safetensors" else "torch-sharded"
        readers[shard] = ck
        for k in ck.metas:
            if k in owner:
                raise CheckpointError(f"{p}: tensor {k!r} is in two shards: {owner[k]!r} and {shard!r}")
            owner[k] = shard
    for shard, listed in shards.items():
        for k in readers[shard].metas:
            if wm.get(k) != shard:
                raise CheckpointError(f"{p}: shard {shard!r} holds {k!r}, which the index maps to {wm.get(k)!r}")
        for k in listed:
            if k not in readers[shard].metas:
                raise CheckpointError(f"{p}: index maps {k!r} to {shard!r}, but that shard does not hold it")
    for k in wm:  # index order
        metas[k] = readers[owner[k]].metas[k]

    def read(k: str) -> np.ndarray:
        return readers[owner[k]].read(k)

    def close() -> None:
        for r in readers.values():
            r.close()

    locations = {k: v for r in readers.values() for k, v in r.locations.items()}
    storage_ids = {k: v for r in readers.values() for k, v in r.storage_ids.items()}
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return Checkpoint(
        str(p),
        fmt,
        metas,
        read,
        metadata={str(k): str(v) for k, v in meta.items()},
        locations=locations,
        storage_ids=storage_ids,
        closer=close,
    )


def _is_array(v: Any) -> bool:
    """A numpy array, checked without importing numpy (no numpy imported means no arrays)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(v, np.ndarray)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, (TensorRef, TypedArray)) or _is_array(v)


def _has_tensors(v: Any, depth: int = 0) -> bool:
    if _is_tensor(v):
        return True
    if depth > 6:
        return False
    if isinstance(v, Mapping):
        return any(_has_tensors(x, depth + 1) for x in v.values())
    return False


def _mostly_tensors(v: Any) -> bool:
    if not isinstance(v, Mapping) or not v:
        return False
    n = sum(1 for x in v.values() if _is_tensor(x))
    return n * 2 >= len(v)


def _find_container(obj: Any, unwrap: tuple[str, ...] | None, path: str) -> tuple[Any, str]:
    if unwrap is not None:
        cur: Any = obj
        walked: list[str] = []
        for part in unwrap:
            if not isinstance(cur, Mapping):
                raise CheckpointError(
                    f"{path}: cannot unwrap {'/'.join(unwrap)!r}: {'/'.join(walked) or 'top level'} is not a mapping"
                )
            if part not in cur:
                keys = ", ".join(map(str, list(cur)[:12]))
                raise CheckpointError(f"{path}: cannot unwrap {'/'.join(unwrap)!r}: no key {part!r} (keys: {keys})")
            cur = cur[part]
            walked.append(part)
        return cur, "/".join(unwrap)
    # Descend into a child only when it is a flat state dict (name -> tensor), or through the
    # wrappers `params` / `state_dict`; a nested module tree (Flax: model/encoder/...) is
    # flattened where it stands, so its top-level names stay part of the keys.
    cur = obj
    walked = []
    for _ in range(4):
        if not isinstance(cur, Mapping) or _mostly_tensors(cur):
            break
        nxt = next(
            (
                k
                for k in CONTAINER_KEYS
                if k in cur
                and isinstance(cur[k], Mapping)
                and (_mostly_tensors(cur[k]) or k in WRAPPERS)
                and _has_tensors(cur[k])
            ),
            None,
        )
        if nxt is None:
            cands = [k for k, v in cur.items() if isinstance(v, Mapping) and _mostly_tensors(v)]
            if len(cands) != 1 or any(isinstance(v, Mapping) and _has_tensors(v) for k, v in cur.items() if k != cands[0]):
                break
            nxt = cands[0]
        walked.append(str(nxt))
        cur = cur[nxt]
    return cur, "/".join(walked)


def _flatten(obj: Any, prefix: str, out: dict[str, Any], skipped: list[str], depth: int = 0) -> None:
    if depth > 32:
        raise CheckpointError(f"state dict nests deeper than 32 levels at {prefix!r}")
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if _is_tensor(v):
            out[name] = v
        elif isinstance(v, Mapping) and _has_tensors(v):
            _flatten(v, name + ".", out, skipped, depth + 1)
        else:
            skipped.append(name)


def _describe(v: Any) -> Any:
    if isinstance(v, TensorRef):
        return f"<tensor {list(v.shape)} {v.element_dtype}>"
    if _is_array(v):
        return f"<array {list(v.shape)} {v.dtype}>"
    if isinstance(v, Opaque):
        return _describe(to_plain(v))
    if isinstance(v, Mapping):
        return {str(k): _describe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_describe(x) for x in v[:64]] + (["..."] if len(v) > 64 else [])
    return v


def _from_object(
    path: str,
    fmt: str,
    obj: Any,
    locs: dict[str, ByteTensor | None],
    unwrap: tuple[str, ...] | None,
    strip_prefix: tuple[str, ...] | None,
) -> Checkpoint:
    from ..dtypes import from_numpy

    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a whole pickled model is not supported; save model.state_dict())"
        )
    container, where = _find_container(obj, unwrap, path)
    if not isinstance(container, Mapping):
        raise CheckpointError(f"{path}: {where or 'top level'} is a {type(container).__name__}, not a state dict")
    flat: dict[str, Any] = {}
    skipped: list[str] = []
    _flatten(container, "", flat, skipped)
    if not flat:
        keys = ", ".join(map(str, list(obj)[:12]))
        if container is obj and not obj:
            raise CheckpointError(f"{path}: state dict is empty")
        raise CheckpointError(
            f"{path}: no tensors found{' under ' + repr(where) if where else ''} (top-level keys: {keys}); set 'unwrap' to the state dict's key"
        )
    metas: dict[str, TensorMeta] = {}
    locations: dict[str, ByteTensor] = {}
    arrays: dict[str, np.ndarray] = {}
    for k, v in flat.items():
        if isinstance(v, TensorRef):
            loc = tensor_location(v, locs, k, path)
            locations[k] = loc
            metas[k] = TensorMeta(k, loc.shape, loc.dtype)
        elif isinstance(v, TypedArray):
            arrays[k] = v.array
            metas[k] = TensorMeta(k, tuple(v.array.shape), v.dtype)
        else:
            arrays[k] = v
            metas[k] = TensorMeta(k, tuple(v.shape), from_numpy(v.dtype).name)
    extras = {str(k): _describe(v) for k, v in obj.items() if container is not obj and k != where.split("/")[0]}
    files = FileReader()

    def read(k: str) -> np.ndarray:
        if k in arrays:
            return arrays[k]
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
    )
    return _finish_flat(ck, strip_prefix)


def _finish_flat(ck: Checkpoint, strip_prefix: tuple[str, ...] | None) -> Checkpoint:
    """Strip ``module.`` / ``_orig_mod.`` style prefixes; keep readers keyed by original names."""
    if strip_prefix == ():
        return ck
    names = list(ck.metas)
    rename: dict[str, str] = {}
    if strip_prefix is None:
        stripped = ""
        changed = True
        cur = {n: n for n in names}
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
