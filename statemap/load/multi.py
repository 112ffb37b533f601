"""Several checkpoint files read as one: Meta ``consolidated.NN.pth``, Megatron ``mp_rank_NN/``.

:func:`find_inputs` lists the files an ``inputs:`` pattern names (a capture never crosses
``/``; at most :data:`~statemap.inputs.MAX_INPUT_FILES`), ordered by their captures.
:func:`open_inputs` opens each one for its metadata only, and :func:`combine` joins them into
one :class:`Checkpoint` whose keys carry the file's captures (``00/layers.0.attention.wq.weight``).
Bytes are read per tensor from the tensor's own file; at most :data:`MAX_OPEN_FILES` files
hold an open descriptor at once.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError, StatemapError
from ..inputs import MAX_INPUT_FILES, Inputs
from ..meta import TensorMeta
from .checkpoint import ByteTensor, Checkpoint

if TYPE_CHECKING:
    import numpy as np

MAX_OPEN_FILES = 64  # files holding an open descriptor at once while reading tensors
MAX_SCANNED_ENTRIES = 1 << 20  # folder entries looked at while matching a pattern

__all__ = ["InputFile", "find_inputs", "open_inputs", "combine", "split_pattern", "MAX_OPEN_FILES"]


@dataclass(frozen=True)
class InputFile:
    """One file of a multi-file input: where it is, what its name captured, its key prefix."""

    path: str  # as opened
    name: str  # relative to the input folder, with '/'
    captures: tuple[tuple[str, str], ...]
    format: str = ""
    container: str = ""
    stripped_prefix: str = ""
    n_tensors: int = 0


def split_pattern(text: str) -> tuple[str, str]:
    """``ckpt/run1/consolidated.{rank:int}.pth`` -> (``ckpt/run1``, ``consolidated.{rank:int}.pth``):
    the folder part (no braces) and the pattern relative to it."""
    parts = text.replace(os.sep, "/").split("/")
    k = next(i for i, p in enumerate(parts) if "{" in p or "}" in p)
    folder = "/".join(parts[:k]) or "."
    if text.startswith("/") and k == 1:
        folder = "/"
    return folder, "/".join(parts[k:])


def find_inputs(folder: str | os.PathLike[str], inputs: Inputs) -> list[tuple[Path, str, dict[str, str]]]:
    """Files under ``folder`` that ``inputs.files`` names, sorted by their captures.

    Returns ``(path, relative name, captures)`` triples. Raises :class:`CheckpointError` when
    the folder is missing, nothing matches (naming the pattern and what the folder holds), or
    more than :data:`MAX_INPUT_FILES` files match.

    Example::

        >>> from statemap.inputs import parse_inputs
        >>> [name for _, name, _ in find_inputs("llama-2-13b", parse_inputs("consolidated.{rank:int}.pth"))]
        ['consolidated.00.pth', 'consolidated.01.pth']
    """
    root = Path(folder)
    if not root.is_dir():
        what = "no such folder" if not root.exists() else "not a folder"
        raise CheckpointError(f"{root}: {what}; a spec with 'inputs: {inputs.files}' reads a folder of checkpoint files")
    level: list[tuple[Path, str, dict[str, str]]] = [(root, "", {})]
    scanned = 0
    last = len(inputs.components) - 1
    for depth, comp in enumerate(inputs.components):
        nxt: list[tuple[Path, str, dict[str, str]]] = []
        for base, rel, caps in level:
            if comp.is_literal:
                cand = base / comp.text
                if cand.is_file() if depth == last else cand.is_dir():
                    nxt.append((cand, f"{rel}/{comp.text}" if rel else comp.text, caps))
                continue
            try:
                entries = sorted(os.scandir(base), key=lambda e: e.name)
            except OSError as e:
                raise CheckpointError(f"{base}: cannot list folder: {e.strerror or e}") from None
            for entry in entries:
                scanned += 1
                if scanned > MAX_SCANNED_ENTRIES:
                    raise CheckpointError(f"{root}: more than {MAX_SCANNED_ENTRIES:,} entries to look at for {inputs.files!r}")
                got = comp.match(entry.name)
                if got is None:
                    continue
                if any(caps.get(k, v) != v for k, v in got.items()):
                    continue  # a repeated capture must agree across folders
                try:
                    ok = entry.is_file() if depth == last else entry.is_dir()
                except OSError:
                    ok = False
                if ok:
                    nxt.append((Path(entry.path), f"{rel}/{entry.name}" if rel else entry.name, {**caps, **got}))
                    if len(nxt) > MAX_INPUT_FILES:
                        raise CheckpointError(
                            f"{root}: {inputs.files!r} matches more than {MAX_INPUT_FILES} files; refusing to open them all"
                        )
        level = nxt
    if not level:
        try:
            listing = sorted(os.listdir(root))
        except OSError:
            listing = []
        shown = ", ".join(listing[:10]) + (", ..." if len(listing) > 10 else "") if listing else "nothing"
        raise CheckpointError(f"{root}: no file matches 'inputs: {inputs.files}' (the folder holds: {shown})")
    level.sort(key=lambda t: (inputs.order(t[2]), t[1]))
    return level


def open_inputs(
    folder: str | os.PathLike[str],
    inputs: Inputs,
    opener: Callable[[Path], Checkpoint],
) -> Checkpoint:
    """Open every file ``inputs`` names under ``folder`` (metadata only) and :func:`combine` them."""
    found = find_inputs(folder, inputs)
    opened: list[tuple[InputFile, Checkpoint]] = []
    try:
        for path, name, caps in found:
            ck = opener(path)
            if ck.closer is not None:
                ck.closer()  # no descriptor stays open between metadata and reading (lazily reopened)
            opened.append((InputFile(str(path), name, tuple(caps.items())), ck))
        return combine(opened, inputs, str(folder))
    except BaseException:
        for _, ck in opened:
            ck.close()
        raise


def combine(parts: Sequence[tuple[InputFile, Checkpoint]], inputs: Inputs, label: str) -> Checkpoint:
    """One :class:`Checkpoint` over several: keys per ``inputs.key``; each key read from its file.

    Storage identities are made per file (two files' ``data/0`` are different tensors), so only
    keys of one file can be tied. The result's ``inputs`` lists each file with its captures
    and tensor count; ``files`` maps each key to its file's index in that list.
    """
    metas: dict[str, TensorMeta] = {}
    origin: dict[str, tuple[int, str]] = {}
    locations: dict[str, ByteTensor] = {}
    storage_ids: dict[str, str] = {}
    files: list[InputFile] = []
    skipped: list[str] = []
    for i, (f, ck) in enumerate(parts):
        caps = dict(f.captures)
        for k, m in ck.metas.items():
            try:
                name = inputs.key_for(caps, k)
            except StatemapError as e:
                raise CheckpointError(f"{f.path}: 'inputs' key {inputs.key!r}: {e}") from None
            if name in metas:
                other = files[origin[name][0]].name if origin[name][0] < len(files) else f.name
                raise CheckpointError(
                    f"{label}: key {name!r} comes from two files ({other} and {f.name}); "
                    f"give 'inputs' a key template that tells them apart, e.g. key: '{{{inputs.captures[0] if inputs.captures else 'n'}}}/{{key}}'"
                )
            metas[name] = TensorMeta(name, m.shape, m.dtype)
            origin[name] = (i, k)
            if k in ck.locations:
                locations[name] = ck.locations[k]
            if k in ck.storage_ids:
                storage_ids[name] = f"{i}:{ck.storage_ids[k]}"
        skipped += [f"{f.name}: {s}" for s in ck.skipped]
        files.append(InputFile(f.path, f.name, f.captures, ck.format, ck.container, ck.stripped_prefix, len(ck.metas)))
    cks = [ck for _, ck in parts]
    hot: OrderedDict[int, None] = OrderedDict()  # files with descriptors open, least recently used first

    def read(name: str) -> np.ndarray:
        i, k = origin[name]
        hot[i] = None
        hot.move_to_end(i)
        while len(hot) > MAX_OPEN_FILES:
            j, _ = hot.popitem(last=False)
            closer = cks[j].closer
            if closer is not None:
                closer()  # descriptors only: the file reopens when read again
        return cks[i].read(k)

    def close() -> None:
        for ck in cks:
            ck.close()

    formats = sorted({ck.format for ck in cks})
    first = cks[0]
    out = Checkpoint(
        label,
        f"{'/'.join(formats)} x{len(cks)} files",
        metas,
        read,
        container=first.container,
        stripped_prefix=first.stripped_prefix,
        metadata=dict(first.metadata),
        extras=dict(first.extras),
        skipped=skipped,
        storage_ids=storage_ids,
        locations=locations,
        closer=close,
    )
    out.inputs = files
    out.files = {name: i for name, (i, _) in origin.items()}
    return out


def memory_parts(state_dicts: Mapping[str, Mapping[str, object]], inputs: Inputs) -> list[tuple[InputFile, dict[str, str]]]:
    """The files of an in-memory multi input ``{"00": sd0, "01": sd1}``: each mapping key holds the
    capture values joined by ``/`` (as in the default key), in the pattern's capture order."""
    out: list[tuple[InputFile, dict[str, str]]] = []
    if len(state_dicts) > MAX_INPUT_FILES:
        raise CheckpointError(f"<state_dicts>: more than {MAX_INPUT_FILES} state dicts")
    for prefix in state_dicts:
        if not isinstance(prefix, str):
            raise CheckpointError(
                f"<state_dicts>: key {prefix!r} must be text holding the capture values of {inputs.files!r} (e.g. '00')"
            )
        values = prefix.split("/") if inputs.captures else ([] if prefix == "" else [prefix])
        if len(values) != len(inputs.captures):
            want = "/".join(f"<{c}>" for c in inputs.captures) or "''"
            raise CheckpointError(f"<state_dicts>: key {prefix!r} must be {want} (the captures of {inputs.files!r})")
        caps = dict(zip(inputs.captures, values))
        for c, v in caps.items():
            if dict(inputs.kinds)[c] == "int" and not v.isdigit():
                raise CheckpointError(f"<state_dicts>: key {prefix!r}: capture {c!r} of {inputs.files!r} is an integer")
        out.append((InputFile(prefix, prefix, tuple(caps.items())), caps))
    out.sort(key=lambda t: inputs.order(t[1]))
    return out
