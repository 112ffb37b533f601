"""Input formats as plugins: one table, each format recognised from its BYTES, not its name.

Every entry of :data:`FORMATS` names a format, how to recognise it from a :class:`Probe` (the
first bytes, the size, and for zip files the entry names), and how to open it. The extension is
used only when no format recognises the bytes (so a damaged file still gets its own format's
error). A file whose bytes are something else entirely (a Git LFS pointer, HTML, gzip, HDF5, GGUF,
a zip of other files) gets one line saying what it looks like.

==================  ==============================================================================
format              recognised by
==================  ==============================================================================
``dcp``             a directory with ``.metadata`` (torch.distributed.checkpoint)
``safetensors``     8-byte little-endian header length N <= size, then ``{``
``torchscript``     zip with ``*/data.pkl`` and ``*/constants.pkl`` or ``*/code/*.py``
``torch-zip``       zip with one ``*/data.pkl`` (torch.save, torch >= 1.6)
``npz``             zip whose entries are all ``*.npy`` (numpy savez)
``torch-legacy``    pickle (0x80, protocol) starting with torch's legacy magic number
``pickle``          any other pickle (Paddle ``.pdparams``, plain pickles of arrays)
``flax-msgpack``    a msgpack map (0x81-0x8f, 0xde, 0xdf)
``index-json``      a JSON object (``*.index.json`` of sharded checkpoints)
==================  ==============================================================================
"""

from __future__ import annotations

import itertools
import json
import operator
import os
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..fsutil import check_regular, read_regular
from ..meta import TensorMeta
from .build import finish_flat, from_object
from .checkpoint import ByteTensor, Checkpoint, FileReader
from .flax_format import pack_msgpack
from .safetensors_format import encode_header
from .unpickle import TensorRef

if TYPE_CHECKING:
    import numpy as np

HEAD = 512
MAX_INDEX = 64 << 20
Unwrap = tuple[str, ...] | None

__all__ = ["FORMATS", "Format", "Probe", "detect", "open_path"]


@dataclass(frozen=True)
class Probe:
    """What format detection looks at: the first bytes, the size, and a zip's entry names."""

    path: Path
    head: bytes
    size: int
    zip_names: tuple[str, ...] | None  # None: not a readable zip


@dataclass(frozen=True)
class Format:
    """One input format: its name, how its bytes look, how to open it."""

    name: str
    description: str
    suffixes: tuple[str, ...]
    sniff: Callable[[Probe], bool]
    open: Callable[[Path, Unwrap, Unwrap], Checkpoint]
    encode: Callable[..., bytes] | None = None  # the writer's encoder, where statemap writes the format itself


def probe(path: Path) -> Probe:
    check_regular(path, "checkpoint")  # reading the magic bytes of a FIFO would block; /dev/zero never ends
    with open(path, "rb") as f:
        head = f.read(HEAD)
    size = path.stat().st_size
    names: tuple[str, ...] | None = None
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = tuple(zf.namelist())
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            names = None
    return Probe(path, head, size, names)


# -- sniffers ---------------------------------------------------------------------------------


def _is_safetensors(p: Probe) -> bool:
    if len(p.head) < 10:
        return False
    (n,) = struct.unpack("<Q", p.head[:8])
    return 2 <= n <= p.size - 8 and p.head[8:9] == b"{"


def _pkl_roots(p: Probe) -> list[str]:
    return [n for n in p.zip_names or () if n == "data.pkl" or n.endswith("/data.pkl")]


def _is_torchscript(p: Probe) -> bool:
    from .torchscript import is_torchscript

    return p.zip_names is not None and len(_pkl_roots(p)) == 1 and is_torchscript(p.zip_names)


def _is_torch_zip(p: Probe) -> bool:
    return p.zip_names is not None and len(_pkl_roots(p)) == 1


def _is_npz(p: Probe) -> bool:
    from .npz_format import is_npz

    return p.zip_names is not None and is_npz([n for n in p.zip_names if not n.endswith("/")])


def _is_pickle(p: Probe) -> bool:
    return len(p.head) >= 2 and p.head[0] == 0x80 and 2 <= p.head[1] <= 5


def _is_torch_legacy(p: Probe) -> bool:
    from .torch_format import LEGACY_MAGIC

    return _is_pickle(p) and p.head[2:4] == b"\x8a\x0a" and p.head[4:14] == LEGACY_MAGIC.to_bytes(10, "little")


def _is_msgpack(p: Probe) -> bool:
    """A msgpack map whose first key is a string (flax.serialization writes module names)."""
    if len(p.head) < 2:
        return False
    first, key = p.head[0], (p.head[1] if 0x81 <= p.head[0] <= 0x8F else p.head[3:4] or b"\x00")
    if not (0x81 <= first <= 0x8F or first in (0xDE, 0xDF)):
        return False
    k = key if isinstance(key, int) else key[0]
    return 0xA0 <= k <= 0xBF or k in (0xD9, 0xDA, 0xDB)


def _is_json(p: Probe) -> bool:
    return p.head.lstrip()[:1] == b"{"


# -- openers ----------------------------------------------------------------------------------


def _locator(locs: dict[str, ByteTensor | None], path: str) -> Callable[[TensorRef, str], ByteTensor]:
    from .torch_format import tensor_location

    return lambda ref, name: tensor_location(ref, locs, name, path)


def _open_safetensors(p: Path, unwrap: Unwrap, strip_prefix: Unwrap) -> Checkpoint:
    from .safetensors_format import read_header_ids

    metas, st_locs, meta, ids = read_header_ids(str(p))
    files = FileReader()
    ck = Checkpoint(
        str(p),
        "safetensors",
        metas,
        lambda k: files.read(st_locs[k]),
        metadata=meta,
        locations=st_locs,
        storage_ids=ids,
        closer=files.close,
    )
    return finish_flat(ck, strip_prefix)


def _open_torch(p: Path, unwrap: Unwrap, strip_prefix: Unwrap) -> Checkpoint:
    from .torch_format import is_zip, load_pickle_file, load_zip

    if is_zip(str(p)):
        obj, locs = load_zip(str(p))
        fmt = "torch-zip"
    else:
        obj, locs, fmt = load_pickle_file(str(p))
    return from_object(str(p), fmt, obj, _locator(locs, str(p)), unwrap, strip_prefix)


def _open_torchscript(p: Path, unwrap: Unwrap, strip_prefix: Unwrap) -> Checkpoint:
    from .torch_format import load_zip
    from .torchscript import declarations, script_state

    obj, locs = load_zip(str(p))
    with zipfile.ZipFile(p) as zf:
        pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        decls = declarations(zf, pkl[0][: -len("data.pkl")], str(p))
    state = script_state(obj, decls, str(p))
    return from_object(str(p), "torchscript", state, _locator(locs, str(p)), unwrap, strip_prefix)


def _open_npz(p: Path, unwrap: Unwrap, strip_prefix: Unwrap) -> Checkpoint:
    from .npz_format import open_npz

    return finish_flat(open_npz(str(p)), strip_prefix)


def _open_msgpack(p: Path, unwrap: Unwrap, strip_prefix: Unwrap) -> Checkpoint:
    from .flax_format import read_msgpack

    return from_object(str(p), "flax-msgpack", read_msgpack(str(p)), None, unwrap, strip_prefix)


def _open_dcp(p: Path, unwrap: Unwrap, strip_prefix: Unwrap) -> Checkpoint:
    from .dcp import load_dcp

    return from_object(str(p), "dcp", load_dcp(p), None, unwrap, strip_prefix)


def _open_index_json(p: Path, unwrap: Unwrap, strip_prefix: Unwrap) -> Checkpoint:
    return finish_flat(_open_index(p), strip_prefix)


FORMATS: tuple[Format, ...] = (
    Format("safetensors", "safetensors (single file)", (".safetensors",), _is_safetensors, _open_safetensors, encode_header),
    Format(
        "torchscript",
        "TorchScript archive (torch.jit.save)",
        (".jit", ".torchscript"),  # by name only as a fallback: a damaged .pt goes to the torch.save reader
        _is_torchscript,
        _open_torchscript,
    ),
    Format("torch-zip", "torch.save (zip, torch >= 1.6)", (".pt", ".pth", ".bin", ".ckpt", ".tar"), _is_torch_zip, _open_torch),
    Format("npz", "numpy .npz (savez / savez_compressed)", (".npz",), _is_npz, _open_npz),
    Format("torch-legacy", "torch.save (legacy, torch < 1.6)", (".pt", ".pth", ".bin", ".ckpt"), _is_torch_legacy, _open_torch),
    Format("pickle", "plain pickle of arrays (Paddle .pdparams)", (".pdparams", ".pkl", ".pickle"), _is_pickle, _open_torch),
    Format("flax-msgpack", "Flax msgpack (flax.serialization)", (".msgpack",), _is_msgpack, _open_msgpack, pack_msgpack),
    Format("index-json", "sharded checkpoint index (*.index.json)", (".json",), _is_json, _open_index_json),
)
DCP = Format("dcp", "torch.distributed.checkpoint folder", (), lambda p: False, _open_dcp)


def detect(path: str | os.PathLike[str]) -> Format | None:
    """The format of a file or folder, from its bytes; None if nothing recognises them.

    Example::

        >>> detect("hf.pt").name          # a safetensors file misnamed .pt
        'safetensors'
    """
    p = Path(path)
    if p.is_dir():
        return DCP if (p / ".metadata").is_file() else None
    pr = probe(p)
    if looks_like(pr) is not None:
        return None
    return next((f for f in FORMATS if f.sniff(pr)), None)


def looks_like(p: Probe) -> str | None:
    """What a file that is no checkpoint format seems to be, for the error message (checked
    before the formats: these magic numbers are unambiguous)."""
    h = p.head
    if h.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (run `git lfs pull`)"
    if h[:2] == b"\x1f\x8b":
        return "gzip-compressed data (decompress it first)"
    if len(h) > 262 and h[257:262] == b"ustar":
        return "a tar archive (extract it first)"
    if h[:8] == b"\x89HDF\r\n\x1a\n":
        return "an HDF5 file (Keras .h5), which statemap does not read"
    if h[:4] == b"GGUF":
        return "a GGUF file (llama.cpp), which statemap does not read"
    if h[:6] == b"\x93NUMPY":
        return "a single numpy .npy array (save it with np.savez as an .npz)"
    if h.lstrip()[:1] == b"<":
        return "an HTML or XML page (a download that returned an error page?)"
    return None


def _other_zip(p: Probe) -> str | None:
    if p.head[:4] != b"PK\x03\x04" or p.zip_names is None:
        return None  # not a zip, or a damaged one: let its format's reader say how
    if any(n == "model.json" or n.endswith("/model.json") for n in p.zip_names):
        return "a TorchScript archive from torch < 1.4 (model.json), which statemap does not read; re-save it with a newer torch"
    listed = ", ".join(p.zip_names[:5]) + (", ..." if len(p.zip_names) > 5 else "")
    return f"a zip archive of other files ({listed})"


def _text_head(p: Probe) -> str | None:
    """The first bytes as text, if they are text (UTF-8, printable or whitespace); else None."""
    head = p.head[: HEAD - 4]  # a multi-byte character may be cut at the end
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.strip() or any(not (c.isprintable() or c in "\n\r\t") for c in text):
        return None
    return text


def _looks_like_spec(text: str) -> bool:
    return any(line.split(":")[0].strip() in ("rules", "version") for line in text.splitlines())


def open_path(path: Path, unwrap: Unwrap, strip_prefix: Unwrap) -> Checkpoint:
    """Open a file or folder with the format its bytes show (the extension only as a fallback)."""
    if path.is_dir():
        path = _megatron_latest(path)
        if (path / ".metadata").is_file():
            return _open_dcp(path, unwrap, strip_prefix)
        if path.is_dir():
            path = _pick_in_dir(path)
    pr = probe(path)
    seems = looks_like(pr)
    if seems is not None:
        raise CheckpointError(f"{path}: not a checkpoint: looks like {seems}")
    fmt = next((f for f in FORMATS if f.sniff(pr)), None)
    if fmt is None:
        seems = _other_zip(pr)
        if seems is not None:
            raise CheckpointError(f"{path}: not a checkpoint: looks like {seems}")
        # nothing recognises the bytes: a damaged zip goes to the torch.save reader whatever its name,
        # anything else to the extension's reader, which says what is wrong with them
        if pr.head[:4] == b"PK\x03\x04":
            return _open_torch(path, unwrap, strip_prefix)
        by_name = next((f for f in FORMATS if path.suffix.lower() in f.suffixes), None)
        if pr.size == 0 and (by_name is None or by_name.name != "safetensors"):
            raise CheckpointError(f"{path}: file is empty")
        text = _text_head(pr) if by_name is None or by_name.name != "index-json" else None  # JSON's reader says more
        if text is not None:  # no reader's error about "header length" for what is plainly text
            spec = " (a statemap spec? usage: statemap apply SPEC INPUT [OUTPUT])" if _looks_like_spec(text) else ""
            text_error = CheckpointError(f"{path}: not a checkpoint: looks like a text file{spec}, starting {text[:60]!r}")
            if by_name is None or by_name.open is not _open_torch:
                raise text_error
            try:  # a protocol-0 pickle is text too: let the pickle reader try it first
                return by_name.open(path, unwrap, strip_prefix)
            except CheckpointError as e:
                if "corrupt or unsupported pickle" in str(e):
                    raise text_error from None
                raise
        if by_name is None:
            names = ", ".join(f.name for f in FORMATS)
            raise CheckpointError(f"{path}: not a checkpoint format statemap recognises ({names})")
        fmt = by_name
    return fmt.open(path, unwrap, strip_prefix)


# -- folders and sharded indexes ---------------------------------------------------------------


MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"


def megatron_iteration(d: Path) -> Path:
    """A Megatron-LM save folder: the ``iter_NNNNNNN`` (or ``release``) folder that
    ``latest_checkpointed_iteration.txt`` names. Other folders are returned as they are."""
    tracker = d / MEGATRON_TRACKER
    if not tracker.is_file():
        return d
    with open(tracker, "rb") as f:
        text = f.read(64).decode("ascii", errors="replace").strip()
    if text == "release":
        it = d / "release"
    elif text.isdigit():
        it = d / f"iter_{int(text):07d}"
    else:
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
    if not it.is_dir():
        raise CheckpointError(f"{tracker}: names iteration {text}, but {it.name}/ is missing")
    return it


def _megatron_latest(d: Path) -> Path:
    """A Megatron-LM save folder: follow ``latest_checkpointed_iteration.txt`` to ``iter_NNNNNNN``
    (or ``release``), then its single ``mp_rank_00*/model_optim_rng.pt`` (``--ckpt-format torch``) or
    the folder itself (``torch_dist``: a DCP folder). Other folders are returned as they are."""
    if not (d / MEGATRON_TRACKER).is_file():
        return d
    it = megatron_iteration(d)
    if (it / ".metadata").is_file():
        return it
    ranks = sorted(r for r in it.iterdir() if r.is_dir() and r.name.startswith("mp_rank_"))
    if len(ranks) != 1 or not (ranks[0] / "model_optim_rng.pt").is_file():
        found = ", ".join(r.name for r in ranks) or "none"
        raise CheckpointError(
            f"{it}: expected one mp_rank_00/model_optim_rng.pt (found ranks: {found}); to read every rank, "
            "add 'inputs: \"mp_rank_{tp:int}/model_optim_rng.pt\"' to the spec (or name one file)"
        )
    return ranks[0] / "model_optim_rng.pt"


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
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pdparams", ".msgpack", ".npz")
    ]
    indexes = [f for f in sorted(d.iterdir()) if f.name.endswith(".index.json")]
    if len(indexes) == 1:
        return indexes[0]
    if len(files) == 1:
        return files[0]
    listing = ", ".join(f.name for f in sorted(d.iterdir())[:10]) or "nothing"
    if len(files) > 1:
        hint = _pattern_hint([f.name for f in files])
        raise CheckpointError(
            f"{d}: holds {len(files)} checkpoints and no index ({', '.join(f.name for f in files[:10])}"
            f"{', ...' if len(files) > 10 else ''}); name one file, or read them all with "
            f"'inputs: \"{hint}\"' in the spec"
        )
    raise CheckpointError(f"{d}: directory holds no single checkpoint to read (found: {listing}); name the file")


def _pattern_hint(names: list[str]) -> str:
    """``consolidated.00.pth``, ``consolidated.01.pth`` -> ``consolidated.{n:int}.pth`` (names that differ
    in one run of digits), else ``{name}.pth``-style with the common suffix."""
    import re

    shapes = {re.sub(r"\d+", "#", n) for n in names}
    if len(shapes) == 1:
        shape = shapes.pop()
        runs = [set(m) for m in zip(*(re.findall(r"\d+", n) for n in names))]
        varying = [i for i, r in enumerate(runs) if len(r) > 1]
        if len(varying) == 1:
            parts = shape.split("#")
            out = parts[0]
            for i, p in enumerate(parts[1:]):
                out += ("{n:int}" if i == varying[0] else next(iter(runs[i]))) + p
            return out
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    return "{name}" + suffix if suffix.startswith(".") else "{name}"


def _open_index(p: Path) -> Checkpoint:
    """Sharded checkpoint: validate the whole index and every shard header before any read."""
    from ..gcpause import paused

    with paused():  # hundreds of thousands of keys: many small objects, no cycles
        return _open_index_columns(p) or _open_index_fast(p) or _open_index_checked(p)


def _index_map(p: Path, raw: bytes | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, None]] | None:
    """The index, its weight_map and its shard names (in order of first mention), when every
    shard name is a plain relative file name of an existing file; None otherwise."""
    if raw is None:
        raw = read_regular(p, MAX_INDEX, "index file")
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        return None
    try:
        order = dict.fromkeys(wm.values())  # shard names in order of first mention
    except TypeError:
        return None
    return (index, wm, order) if _plain_shards(p, order) else None


def _plain_shards(p: Path, order: dict[Any, None]) -> bool:
    """Every shard name a plain relative file name of an existing file."""
    for shard in order:
        if not isinstance(shard, str) or not shard or shard.endswith(".index.json"):
            return False
        pp = PurePosixPath(shard)
        if pp.is_absolute() or ".." in pp.parts or "\\" in shard or os.path.isabs(shard):
            return False
        if not (p.parent / shard).is_file():
            return False
    return True


_WS = r"[ \t\n\r]*"  # JSON whitespace
_STR = r'"[^"\\\x00-\x1f]*"'  # a JSON string without escapes (its text is its value)
_WM_OPEN = re.compile(rf'"weight_map"{_WS}:{_WS}(\{{){_WS}')
_PAIR = re.compile(rf'{_STR}{_WS}:{_WS}"([^"\\\x00-\x1f]*)"')  # one weight_map member: its shard
_AFTER = re.compile(rf"{_WS}([,}}]){_WS}")
_FIRST_SEPS = re.compile(rf'{_STR}({_WS}:{_WS}){_STR}(?:({_WS},{_WS})")?')  # the first member's separators


def _shard_columns(path: Path, read: dict[str, Any]) -> Any:
    """A shard's header as columns (:func:`read_columns`), read once per path (``read`` keeps
    them); None when it is not a plain safetensors file or its header is unusual."""
    from .safetensors_format import read_columns

    if str(path) in read:
        return read[str(path)]
    try:
        pr = probe(path)
    except (OSError, CheckpointError):
        return None
    if looks_like(pr) is not None or not _is_safetensors(pr):
        return None
    cols = read[str(path)] = read_columns(str(path))
    return cols


def _grouped_index(p: Path, raw: bytes, read: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, Any]]] | None:
    """An index whose weight_map lists each shard's keys together, in the shard header's order,
    with one spacing throughout (as statemap and ``json.dumps`` write it), read without a string
    per key: the index without its weight_map, and each shard's path and header columns, in
    order. The weight_map's text is checked to be exactly each shard's keys mapped to it (one
    ``join`` of the header's names per shard, compared with the text), so ``json.loads`` of the
    whole would give that weight_map. None for anything else (an escape, another order or
    spacing, a shard named twice, an unusual header): the caller then parses the index, and
    ``read`` (shard path -> the header columns read here) saves it reading a header twice."""
    if b"\\" in raw or raw.count(b'"weight_map"') != 1:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    m = _WM_OPEN.search(text)
    first = None if m is None else _FIRST_SEPS.match(text, m.end())
    if m is None or first is None:
        return None
    kv = first.group(1)
    item = first.group(2) or ","  # (the separator between two members; unused for a single one)
    pos = m.end()
    shards: list[tuple[str, Any]] = []
    seen: set[str] = set()
    while True:
        pair = _PAIR.match(text, pos)
        if pair is None:
            return None
        shard = pair.group(1)
        if shard in seen or not _plain_shards(p, {shard: None}):
            return None
        seen.add(shard)
        path = p.parent / shard
        cols = _shard_columns(path, read)
        if cols is None:
            return None
        joiner = f'"{kv}"{shard}"{item}"'
        run = f'"{joiner.join(cols.names)}"{kv}"{shard}"'  # this shard's members, as the text must hold them
        if not text.startswith(run, pos):
            return None
        shards.append((str(path), cols))
        after = _AFTER.match(text, pos + len(run))
        assert after is not None  # (it matches the empty string)
        if after.group(1) == "}":
            break
        if text[pos + len(run) : after.end()] != item:
            return None
        pos = after.end()
    try:  # the rest of the index, with an empty weight_map in place of this one
        index = json.loads(text[: m.start(1) + 1] + text[after.start(1) :])
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(index, dict) or index.get("weight_map") != {}:
        return None  # ("weight_map" occurs once in the text: this is the top-level one, or none is)
    return index, shards


def _open_index_columns(p: Path) -> Checkpoint | None:
    """A valid index of safetensors shards with common headers, held as :class:`Columns` (no
    object per key until one is asked for); None when anything is unusual or fails, and the
    per-key paths then read it and name any problem."""
    from .checkpoint import Columns, LocationView, MetaView, StorageView

    raw = read_regular(p, MAX_INDEX, "index file")
    headers: dict[str, Any] = {}  # shard path -> its header's columns, once read
    grouped = _grouped_index(p, raw, headers)
    wm: dict[str, Any] | None = None
    if grouped is not None:
        index, shards = grouped
    else:
        got = _index_map(p, raw)
        if got is None:
            return None
        index, wm, order = got
        shards = []
        for shard in order:
            path = p.parent / shard
            cols = _shard_columns(path, headers)
            if cols is None:
                return None
            shards.append((str(path), cols))
    names = list(itertools.chain.from_iterable(c.names for _, c in shards))
    at: dict[str, int] | None = None
    if wm is None:  # the weight_map is each shard's keys, in order
        wm = dict.fromkeys(names)
        if len(wm) != len(names):
            return None  # a key in two shards
        in_order = True
    else:
        in_order = names == list(wm) and list(wm.values()) == list(
            itertools.chain.from_iterable(itertools.repeat(s, len(c.names)) for s, (_, c) in zip(order, shards))
        )
    if not in_order:  # each shard's keys map to it in the index, and no key is in two shards
        for shard, (_, c) in zip(order, shards):
            if not all(map(operator.eq, map(wm.get, c.names), itertools.repeat(shard))):
                return None
        at = dict(zip(names, range(len(names))))
        if len(at) != len(names) or len(names) != len(wm):  # a key in two shards, or one the shards lack
            return None
    kinds: dict[Any, tuple[str, tuple[int, ...], int]] = {}
    for _, c in shards:
        kinds.update(c.kinds)
    kind_of = list(itertools.chain.from_iterable(c.pairs for _, c in shards))
    file_of = list(itertools.chain.from_iterable(itertools.repeat(i, len(c.names)) for i, (_, c) in enumerate(shards)))
    begins = list(itertools.chain.from_iterable(c.begins for _, c in shards))
    if at is not None:  # index order
        perm = list(map(at.__getitem__, wm))
        names = list(wm)
        kind_of = list(map(kind_of.__getitem__, perm))
        file_of = list(map(file_of.__getitem__, perm))
        begins = list(map(begins.__getitem__, perm))
    cols_all = Columns(names, wm, kinds, kind_of, [(f, c.data_start) for f, c in shards], file_of, begins)
    locations = LocationView(cols_all)
    files = FileReader()

    def read(k: str) -> np.ndarray:
        return files.read(locations[k])

    meta: Any = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return Checkpoint(
        str(p),
        "safetensors-sharded",
        MetaView(cols_all),
        read,
        metadata={str(k): str(v) for k, v in meta.items()},
        locations=locations,
        storage_ids=StorageView(cols_all),
        closer=files.close,
    )


class _Declined(Exception):
    """The index fast path met something unusual: the checked path takes over."""


def _open_index_fast(p: Path) -> Checkpoint | None:
    """The common, valid index with whole-dict operations (each shard name checked once, each
    shard's keys looked up in the index in C); None when anything is unusual, and
    :func:`_open_index_checked` then decides and names the problem in the same order as always."""
    got = _index_map(p)
    if got is None:
        return None
    index, wm, order = got
    readers: dict[str, Checkpoint] = {}
    every: dict[str, TensorMeta] = {}
    fmt = "safetensors-sharded"
    try:
        for shard in order:
            ck = readers[shard] = open_path(p.parent / shard, None, ())
            fmt = "safetensors-sharded" if ck.format == "safetensors" else "torch-sharded"
            if not all(map(operator.eq, map(wm.get, ck.metas), itertools.repeat(shard))):
                raise _Declined  # the shard holds a key the index maps elsewhere (or to no shard)
            every.update(ck.metas)
        # each shard's keys map to it in the index, so no key is in two shards; as many keys as the
        # index names: each of them is in the shard it names
        if len(every) != len(wm):
            raise _Declined
    except BaseException as e:  # the checked path decides (and names the problem); nothing left open
        for r in readers.values():
            r.close()
        if isinstance(e, _Declined):
            return None
        raise
    owner = wm
    metas = every if list(every) == list(wm) else {k: every[k] for k in wm}  # index order
    locations: dict[str, ByteTensor] = {}
    storage_ids: dict[str, str] = {}
    for r in readers.values():
        locations.update(r.locations)
        storage_ids.update(r.storage_ids)
    return _index_checkpoint(p, index, fmt, metas, readers, owner, locations, storage_ids)


def _index_checkpoint(
    p: Path,
    index: dict[str, Any],
    fmt: str,
    metas: dict[str, TensorMeta],
    readers: dict[str, Checkpoint],
    owner: dict[str, str],
    locations: dict[str, ByteTensor],
    storage_ids: dict[str, str],
) -> Checkpoint:
    def read(k: str) -> np.ndarray:
        return readers[owner[k]].read(k)

    def close() -> None:
        for r in readers.values():
            r.close()

    meta: Any = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
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


def _open_index_checked(p: Path) -> Checkpoint:
    """Every check of the index, key by key, with the error that names the problem."""
    raw = read_regular(p, MAX_INDEX, "index file")
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{p}: index is not valid JSON: {str(e)[:200]}") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{p}: index has no 'weight_map' mapping tensor names to shard files")
    shards: dict[str, list[str]] = {}
    for tensor, shard in wm.items():
        if type(shard) is str and shard in shards:  # checked when first seen (an index names each shard many times)
            shards[shard].append(tensor)
            continue
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
        ck = open_path(p.parent / shard, None, ())
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
    locations = {k: v for r in readers.values() for k, v in r.locations.items()}
    storage_ids = {k: v for r in readers.values() for k, v in r.storage_ids.items()}
    return _index_checkpoint(p, index, fmt, metas, readers, owner, locations, storage_ids)
