"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` + ``*.distcp``, read metadata first.

``torch.distributed.checkpoint.save`` writes one ``.metadata`` pickle for the whole checkpoint and
one ``__<rank>_<n>.distcp`` file per writer. The metadata (read with the safe unpickler: its
dataclasses come back as inert placeholders) gives, for every flattened name, the tensor's dtype,
full size and its chunks (offsets and sizes in the full tensor), and for every chunk the file,
byte offset and length of its record. With the default serialization a record is a small
``torch.save`` zip of the chunk, whose storage entry is a byte range of the ``.distcp`` file; raw
records (chunk bytes only) are read in place too. ``planner_data`` maps each flattened name back to
its path in the saved dict (``"model.layer.weight"`` -> ``("model", "layer.weight")``), so the
usual container choice applies (the model's state dict, not the optimizer's).

A tensor sharded over ranks is stitched back together when read: its chunks must tile the full
tensor exactly (checked up front from the metadata). Non-tensor entries are listed as extras.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..dtypes import dtype as lookup_dtype
from ..errors import CheckpointError
from .checkpoint import ByteTensor, FileReader, LazyTensor
from .torch_format import stored_data_offset
from .unpickle import Opaque, SafeUnpickler, TensorRef, finish, opaque_type, safe_load

if TYPE_CHECKING:
    import numpy as np

METADATA = ".metadata"
MAX_METADATA = 1 << 30
MAX_RECORD_PICKLE = 64 << 20
MAX_CHUNKS = 1 << 20
MAX_EXTRA = 1 << 20  # non-tensor records larger than this are listed, not decoded

__all__ = ["is_dcp", "load_dcp"]


def is_dcp(d: Path) -> bool:
    return (d / METADATA).is_file()


def _fields(o: Any) -> dict[str, Any]:
    if isinstance(o, Opaque):
        st = o.__dict__["state"]
        if isinstance(st, tuple) and len(st) == 2 and isinstance(st[1], dict):
            st = {**(st[0] or {}), **st[1]} if isinstance(st[0], dict) else st[1]
        return st if isinstance(st, dict) else {}
    return o if isinstance(o, dict) else {}


def _kind(o: Any) -> str:
    return o._name if isinstance(o, Opaque) else type(o).__name__


def _ints(v: Any, what: str, where: str) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        return tuple(v)
    raise CheckpointError(f"{where}: {what} {v!r:.80} is not a tuple of non-negative integers")


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes at ``start`` of a file (one DCP record)."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _record(f: Any, file: str, start: int, length: int, where: str) -> tuple[Any, dict[str, ByteTensor]]:
    """A ``torch.save`` zip record inside a .distcp file: (object, storage key -> absolute location)."""
    win = _Window(f, start, length)
    try:
        zf = zipfile.ZipFile(win)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{where}: record is not a torch.save zip ({e})") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{where}: record has {len(pkl)} data.pkl entries (corrupt file)")
        root = pkl[0][: -len("data.pkl")]
        info = zf.getinfo(pkl[0])
        if info.file_size > MAX_RECORD_PICKLE or info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{where}: record's data.pkl is compressed or over {MAX_RECORD_PICKLE >> 20} MiB; refusing")
        obj, storages = safe_load(zf.read(pkl[0]), where)
        locs: dict[str, ByteTensor] = {}
        for key, st in storages.items():
            entry = f"{root}data/{key}"
            try:
                sinfo = zf.getinfo(entry)
            except KeyError:
                raise CheckpointError(f"{where}: storage {key!r} has no entry in the record (corrupt file)") from None
            need = st.numel * lookup_dtype(st.dtype).itemsize
            if sinfo.compress_type != zipfile.ZIP_STORED or sinfo.file_size < need:
                raise CheckpointError(f"{where}: storage {key!r} is compressed or shorter than {need} bytes (corrupt file)")
            rel = stored_data_offset(win, sinfo, need, length, where, key)
            locs[key] = ByteTensor(file, start + rel, st.dtype, (st.numel,), storage=f"{file}@{start + rel}")
    return obj, locs


def load_dcp(d: Path) -> dict[str, Any]:
    """Read a DCP folder's metadata: the saved dict, nested again, with tensors as ByteTensor (one
    byte range) or LazyTensor (stitched from shards) and non-tensor entries as plain data.
    Tensor bytes are not read here.

    Example::

        >>> tree = load_dcp(Path("step_100"))     # written by torch.distributed.checkpoint.save
        >>> sorted(tree)
        ['model', 'optimizer', 'step']
    """
    where = str(d / METADATA)
    mpath = d / METADATA
    from ..fsutil import read_regular

    md = _load_metadata(read_regular(mpath, MAX_METADATA, "DCP metadata"), where)
    if _kind(md) != "Metadata":
        raise CheckpointError(f"{where}: not a torch.distributed.checkpoint Metadata pickle (found {_kind(md)})")
    fields = _fields(md)
    sdm = fields.get("state_dict_metadata")
    storage = fields.get("storage_data")
    planner = fields.get("planner_data")
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{where}: metadata has no state_dict_metadata / storage_data")
    index: dict[tuple[str, tuple[int, ...] | None], dict[str, Any]] = {}
    for k, v in storage.items():
        kf, vf = _fields(k), _fields(v)
        off = kf.get("offset")
        index[(str(kf.get("fqn")), tuple(off) if off is not None else None)] = vf
    files: dict[str, Any] = {}
    tree: dict[str, Any] = {}
    nchunks = 0
    try:
        for fqn, entry in sdm.items():
            fqn = str(fqn)
            kind = _kind(entry)
            if kind == "TensorStorageMetadata":
                ef = _fields(entry)
                value: Any = _tensor(d, fqn, ef, index, files, where)
                nchunks += len(ef.get("chunks") or ())
                if nchunks > MAX_CHUNKS:
                    raise CheckpointError(f"{where}: more than {MAX_CHUNKS} chunks; refusing")
            elif kind == "BytesStorageMetadata":
                value = _bytes(d, fqn, index, files, where)
            else:
                raise CheckpointError(f"{where}: entry {fqn!r} has unknown storage metadata {kind!r}")
            path = planner.get(fqn) if isinstance(planner, dict) else None
            parts = [str(p) for p in path] if isinstance(path, (tuple, list)) and path else [fqn]
            _insert(tree, parts, value, where)
    finally:
        for f in files.values():
            f.close()
    return tree


class _MetadataUnpickler(SafeUnpickler):
    """The safe unpickler, plus inert paths: ``storage_meta.checkpoint_id`` is a ``pathlib`` path."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            return opaque_type(module, name)
        return super().find_class(module, name)


def _load_metadata(data: bytes, where: str) -> Any:
    up = _MetadataUnpickler(io.BytesIO(data), where)
    try:
        return finish(up.load())
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError) as e:
        raise CheckpointError(f"{where}: corrupt or unsupported pickle: {type(e).__name__}: {e}") from None


def _insert(tree: dict[str, Any], parts: list[str], value: Any, where: str) -> None:
    cur = tree
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise CheckpointError(f"{where}: {'/'.join(parts)!r} nests under a value")
        cur = nxt
    cur[parts[-1]] = value


def _file(d: Path, rel: Any, files: dict[str, Any], where: str) -> tuple[str, Any]:
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{where}: a record names no file")
    pp = PurePosixPath(rel)
    if pp.is_absolute() or ".." in pp.parts or "\\" in rel or os.path.isabs(rel) or len(pp.parts) != 1:
        raise CheckpointError(f"{where}: record file {rel!r} points outside the checkpoint folder; refusing")
    full = str(d / rel)
    if full not in files:
        try:
            files[full] = open(full, "rb")  # noqa: SIM115 - closed by load_dcp
        except OSError as e:
            raise CheckpointError(f"{where}: record file {rel!r} cannot be read: {e.strerror or e}") from None
    return full, files[full]


def _span(info: dict[str, Any], full: str, where: str) -> tuple[int, int]:
    if info.get("transform_descriptors"):
        raise CheckpointError(f"{where}: records written with extensions {info['transform_descriptors']!r} are not supported")
    start, length = info.get("offset"), info.get("length")
    if not (isinstance(start, int) and isinstance(length, int) and start >= 0 and length >= 0):
        raise CheckpointError(f"{where}: record has a bad offset/length")
    if start + length > os.path.getsize(full):
        raise CheckpointError(f"{where}: record runs past the end of {os.path.basename(full)!r} (truncated?)")
    return start, length


def _tensor(
    d: Path, fqn: str, ef: dict[str, Any], index: dict[Any, dict[str, Any]], files: dict[str, Any], where: str
) -> ByteTensor | LazyTensor:
    here = f"{where}: tensor {fqn!r}"
    props = ef.get("properties")
    pf = props.__dict__["state"] if isinstance(props, Opaque) else props
    dt_name = pf[0] if isinstance(pf, tuple) and pf else _fields(props).get("dtype")
    try:
        dt = lookup_dtype(str(dt_name))
    except Exception:
        raise CheckpointError(f"{here}: unknown dtype {dt_name!r}") from None
    size = _ints(ef.get("size"), "size", here)
    chunks = ef.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        raise CheckpointError(f"{here}: has no chunks")
    parts: list[tuple[tuple[int, ...], tuple[int, ...], ByteTensor]] = []
    for c in chunks:
        cf = _fields(c)
        off, sz = _ints(cf.get("offsets"), "chunk offsets", here), _ints(cf.get("sizes"), "chunk sizes", here)
        if len(off) != len(size) or len(sz) != len(size) or any(o + s > n for o, s, n in zip(off, sz, size)):
            raise CheckpointError(f"{here}: chunk at {list(off)} of size {list(sz)} lies outside the tensor's {list(size)}")
        info = index.get((fqn, off))
        if info is None:
            raise CheckpointError(f"{here}: chunk at {list(off)} has no storage record")
        full, f = _file(d, info.get("relative_path"), files, where)
        start, length = _span(info, full, here)
        need = math.prod(sz) * dt.itemsize
        f.seek(start)
        if f.read(4) == b"PK\x03\x04":
            obj, locs = _record(f, full, start, length, here)
            if not isinstance(obj, TensorRef):
                raise CheckpointError(f"{here}: record holds {type(obj).__name__}, not a tensor")
            if obj.shape != sz or lookup_dtype(obj.element_dtype).name != dt.name:
                raise CheckpointError(
                    f"{here}: record holds {obj.element_dtype} {list(obj.shape)}, metadata says {dt.name} {list(sz)}"
                )
            base = locs[obj.storage.key]
            itemsize = lookup_dtype(obj.element_dtype).itemsize
            loc = ByteTensor(full, base.offset + obj.offset * itemsize, dt.name, sz, obj.stride, storage=base.storage)
        elif length == need:  # raw chunk bytes
            loc = ByteTensor(full, start, dt.name, sz, storage=f"{full}@{start}")
        else:
            raise CheckpointError(f"{here}: record of {length} bytes is neither a torch.save zip nor {need} raw bytes")
        parts.append((off, sz, loc))
    covered = sum(math.prod(sz) for _, sz, _ in parts)
    if covered != math.prod(size) or (len(parts) <= 4096 and _overlap(parts)):
        raise CheckpointError(f"{here}: its {len(parts)} chunks do not tile the {list(size)} tensor exactly (corrupt metadata?)")
    if len(parts) == 1 and parts[0][1] == size:
        return parts[0][2]
    return LazyTensor(size, dt.name, lambda: _stitch(size, dt.name, parts))


def _overlap(parts: list[tuple[tuple[int, ...], tuple[int, ...], Any]]) -> bool:
    for i, (o1, s1, _) in enumerate(parts):
        for o2, s2, _ in parts[i + 1 :]:
            if all(a < b + m and b < a + n for a, n, b, m in zip(o1, s1, o2, s2)):
                return True
    return False


def _stitch(size: tuple[int, ...], dtype: str, parts: list[tuple[tuple[int, ...], tuple[int, ...], ByteTensor]]) -> np.ndarray:
    import numpy as np

    out = np.empty(size, dtype=lookup_dtype(dtype).np)
    reader = FileReader()
    try:
        for off, sz, loc in parts:
            out[tuple(slice(o, o + s) for o, s in zip(off, sz))] = reader.read(loc)
    finally:
        reader.close()
    out.flags.writeable = False
    return out


def _bytes(d: Path, fqn: str, index: dict[Any, dict[str, Any]], files: dict[str, Any], where: str) -> Any:
    here = f"{where}: entry {fqn!r}"
    info = index.get((fqn, None))
    if info is None:
        return f"<{fqn}: no record>"
    full, f = _file(d, info.get("relative_path"), files, where)
    start, length = _span(info, full, here)
    if length > MAX_EXTRA:
        return f"<{length} bytes>"
    f.seek(start)
    if f.read(4) != b"PK\x03\x04":
        return f"<{length} bytes>"
    obj, _ = _record(f, full, start, length, here)
    return _detensor(obj)


def _detensor(v: Any, depth: int = 0) -> Any:
    """Tensors inside a non-tensor record are described, never turned into weights."""
    if isinstance(v, TensorRef):
        return f"<tensor {list(v.shape)} {v.element_dtype}>"
    if depth > 32:
        return "..."
    if isinstance(v, dict):
        return {k: _detensor(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_detensor(x, depth + 1) for x in v)
    return v
