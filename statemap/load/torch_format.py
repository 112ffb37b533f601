"""torch.save files (zip and legacy formats) and plain pickles (.pdparams), read without torch.

zip format (torch >= 1.6): ``<root>/data.pkl`` names storages by persistent id; each storage
is an uncompressed entry ``<root>/data/<key>``, so a tensor is a byte range of the file.

legacy format: pickles for magic number, protocol, sys info, the object, and the storage
keys; then each storage as an 8-byte element count followed by its bytes.
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import Any

from ..dtypes import dtype as lookup_dtype
from ..errors import CheckpointError
from .checkpoint import ByteTensor
from .unpickle import StorageRef, TensorRef, safe_load

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_PICKLE = 2 << 30  # the object pickle itself, stored (not tensor data)
MAX_DECOMPRESSED = 256 << 20  # a deflate-compressed entry we read (torch writes them stored; other zip tools may not)
MAX_RATIO = 200  # compressed zip entries: refuse ratios above this (zip bombs)
MAX_ZIP_ENTRIES = 1_000_000  # entries of the central directory, checked before it is parsed
MAX_BYTEORDER = 16  # the `byteorder` entry ("little")
READ_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # bzip2 / lzma entries are refused


def is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_zip(path: str) -> tuple[Any, dict[str, ByteTensor | None]]:
    """Return (object with TensorRefs, storage key -> byte location)."""
    _check_entry_count(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable torch zip file: {str(e)[:200]}") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: zip file has {len(pkl)} data.pkl entries; not a torch checkpoint")
        root = pkl[0][: -len("data.pkl")]
        byteorder = root + "byteorder"
        if byteorder in names:
            order = _read_entry(path, zf, byteorder, MAX_BYTEORDER).strip()
            if order == b"big":
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
            if order not in (b"little", b""):
                raise CheckpointError(f"{path}: byteorder entry says {order[:16]!r}; expected 'little'")
        data = _read_entry(path, zf, pkl[0], MAX_PICKLE)
        obj, storages = safe_load(data, path)
        size = os.path.getsize(path)
        locs: dict[str, ByteTensor | None] = {}
        with open(path, "rb") as f:
            for key, st in storages.items():
                entry = f"{root}data/{key}"
                try:
                    info = zf.getinfo(entry)
                except KeyError:
                    raise CheckpointError(f"{path}: storage {key!r} has no entry {entry!r} (truncated or corrupt file)") from None
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(
                        f"{path}: storage entry {entry!r} is compressed; torch writes them stored (tampered file?)"
                    )
                need = st.numel * lookup_dtype(st.dtype).itemsize
                if info.file_size < need:
                    raise CheckpointError(f"{path}: storage {key!r} holds {info.file_size} bytes, needs {need}")
                start = stored_data_offset(f, info, need, size, path, key)
                locs[key] = ByteTensor(path, start, st.dtype, (st.numel,), storage=f"{path}:{key}")
    return obj, locs


def _check_entry_count(path: str) -> None:
    """The central directory's entry count, from its end record, before zipfile parses it all."""
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # stdlib: handles zip64
    except (OSError, struct.error, ValueError, EOFError):
        return  # zipfile reports the damage
    if end and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ZIP_ENTRIES:  # type: ignore[attr-defined]
        raise CheckpointError(
            f"{path}: zip file lists {end[zipfile._ECD_ENTRIES_TOTAL]} entries (limit {MAX_ZIP_ENTRIES}); refusing"  # type: ignore[attr-defined]
        )


def _check_entry(path: str, info: zipfile.ZipInfo, limit: int = MAX_PICKLE) -> None:
    """An entry we will decompress: method stored or deflate, size and ratio bounded before reading."""
    name = info.filename[:80]
    if info.compress_type not in READ_METHODS:
        raise CheckpointError(
            f"{path}: entry {name!r} uses zip compression method {info.compress_type}; torch writes stored entries "
            "(only stored and deflate are read)"
        )
    if info.compress_type == zipfile.ZIP_DEFLATED:
        limit = min(limit, MAX_DECOMPRESSED)
        if info.compress_size and info.file_size / info.compress_size > MAX_RATIO:
            raise CheckpointError(
                f"{path}: entry {name!r} expands {info.compress_size} -> {info.file_size} bytes "
                f"(ratio > {MAX_RATIO}); refusing a likely zip bomb"
            )
    if info.file_size > limit:
        raise CheckpointError(f"{path}: entry {name!r} is {info.file_size} bytes; refusing (limit {limit})")


def _read_entry(path: str, zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    info = zf.getinfo(name)
    _check_entry(path, info, limit)
    try:
        return zf.read(info)  # zipfile stops at the declared (checked) size and verifies the CRC
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: cannot read {name[:80]!r}: {str(e)[:200]} (truncated or corrupt?)") from None


def load_pickle_file(path: str) -> tuple[Any, dict[str, ByteTensor | None], str]:
    """Legacy torch format, or a plain pickle (e.g. Paddle .pdparams). Returns (obj, locs, format)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        first, _ = safe_load(f, path)
        if not (isinstance(first, int) and first == LEGACY_MAGIC):
            return first, {}, "pickle"
        protocol, _ = safe_load(f, path)
        if protocol != 1001:
            raise CheckpointError(f"{path}: legacy torch protocol {protocol!r} is not supported")
        sys_info, _ = safe_load(f, path)
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        obj, storages = safe_load(f, path)
        keys, _ = safe_load(f, path)
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: legacy storage key list is malformed")
        locs: dict[str, ByteTensor | None] = {}
        for key in keys:
            key = str(key)
            if key not in storages:
                raise CheckpointError(f"{path}: storage {key!r} is listed but never used (corrupt file)")
            st: StorageRef = storages[key]
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file ends inside storage {key!r} (truncated?)")
            (numel,) = struct.unpack("<q", head)
            itemsize = lookup_dtype(st.dtype).itemsize
            if numel != st.numel:
                raise CheckpointError(f"{path}: storage {key!r} says {numel} elements, pickle says {st.numel}")
            start = f.tell()
            if start + numel * itemsize > size:
                raise CheckpointError(f"{path}: storage {key!r} runs past the end of the file (truncated?)")
            locs[key] = ByteTensor(path, start, st.dtype, (numel,), storage=f"{path}:{key}")
            f.seek(numel * itemsize, os.SEEK_CUR)
        missing = set(storages) - set(locs)
        if missing:
            raise CheckpointError(f"{path}: storages {sorted(missing)[:5]} have no data (truncated?)")
    return obj, locs, "torch-legacy"


def stored_data_offset(f: Any, info: zipfile.ZipInfo, need: int, limit: int, where: str, key: str) -> int:
    """Offset (in ``f``) of a stored zip entry's data, read from its local header; ``need`` bytes must
    fit before ``limit``. Shared by torch.save files and the torch.save records inside DCP files."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{where}: bad local header for storage {key!r} (corrupt file)")
    n_name, n_extra = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + n_name + n_extra
    if start + need > limit:
        raise CheckpointError(f"{where}: storage {key!r} runs past the end of its file (truncated?)")
    return start


def tensor_location(ref: TensorRef, locs: dict[str, ByteTensor | None], name: str, path: str) -> ByteTensor:
    base = locs.get(ref.storage.key)
    if base is None:
        raise CheckpointError(f"{path}: tensor {name!r} has no storage data")
    itemsize = lookup_dtype(ref.element_dtype).itemsize
    return ByteTensor(
        base.file,
        base.offset + ref.offset * itemsize,
        ref.element_dtype,
        ref.shape,
        ref.stride,
        storage=base.storage,
    )
