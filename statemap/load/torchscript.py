"""TorchScript archives (``torch.jit.save`` of scripted or traced modules), read as data.

An archive is a zip: ``<root>/data.pkl`` pickles the module tree as ``__torch__.*`` objects whose
state maps attribute names to values (tensors, submodules, plain values); ``<root>/code/**.py``
holds each class's TorchScript source, whose class body declares which attributes are parameters
and buffers::

    class Linear(Module):
      __parameters__ = ["weight", "bias", ]
      __buffers__ = []

Those two lines are read as text (a regular expression over the class headers); the code is never
compiled, imported or run, and ``torch.jit.load`` is not called. The state dict is then built as
``torch.jit.load(f).state_dict()`` would: for each module, its parameters and buffers in attribute
order, then each submodule under ``<name>.``. OpenAI's released CLIP ``.pt`` files are such archives.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from typing import Any

from ..errors import CheckpointError
from .unpickle import Opaque

MAX_CODE = 64 << 20  # one code file
MAX_CODE_TOTAL = 512 << 20
MAX_DEPTH = 64
MAX_VISITS = 1_000_000
_CLASS = re.compile(r"^class ([A-Za-z_][A-Za-z0-9_]*)\(([A-Za-z_][A-Za-z0-9_.]*)\):\s*$")
_DECL = re.compile(r"^  (__parameters__|__buffers__) = \[(.*)\]\s*$")
_NAME = re.compile(r'"((?:[^"\\]|\\.)*)"|\'((?:[^\'\\]|\\.)*)\'')

__all__ = ["is_torchscript", "declarations", "script_state"]

Decls = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]  # class qualname -> (parameters, buffers)


def is_torchscript(names: Sequence[str]) -> bool:
    """A torch zip whose entries say TorchScript: ``*/constants.pkl`` or ``*/code/*.py``."""
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" or ("/code/" in n and n.endswith(".py")) for n in names)


def declarations(zf: zipfile.ZipFile, root: str, path: str) -> Decls:
    """Parameter and buffer names declared by each ``Module`` class of the archive's code."""
    out: Decls = {}
    total = 0
    code = root + "code/"
    for info in zf.infolist():
        name = info.filename
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        if info.file_size > MAX_CODE:
            raise CheckpointError(f"{path}: code entry {name!r} is {info.file_size} bytes; refusing (limit {MAX_CODE >> 20} MiB)")
        if info.compress_size and info.file_size / info.compress_size > 200:
            raise CheckpointError(f"{path}: code entry {name!r} expands more than 200x; refusing a likely zip bomb")
        total += info.file_size
        if total > MAX_CODE_TOTAL:
            raise CheckpointError(f"{path}: TorchScript code is larger than {MAX_CODE_TOTAL >> 20} MiB; refusing")
        module = name[len(code) : -len(".py")].replace("/", ".")
        text = zf.read(info).decode("utf-8", errors="replace")
        _parse(text, module, out)
    return out


def _parse(text: str, module: str, out: Decls) -> None:
    cls: str | None = None
    params: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    for line in text.splitlines():
        m = _CLASS.match(line)
        if m:
            if cls is not None:
                out[cls] = (params, buffers)
            cls = f"{module}.{m.group(1)}" if m.group(2) == "Module" else None
            params, buffers = (), ()
            continue
        if cls is None or not line.startswith("  "):
            continue
        d = _DECL.match(line)
        if d:
            names = tuple(a or b for a, b in _NAME.findall(d.group(2)))
            if d.group(1) == "__parameters__":
                params = names
            else:
                buffers = names
    if cls is not None:
        out[cls] = (params, buffers)


def _attrs(obj: Opaque) -> dict[Any, Any]:
    state = obj.__dict__["state"]
    return state if isinstance(state, dict) else {}


def script_state(obj: Any, decls: Decls, path: str) -> dict[str, Any]:
    """The archive's ``state_dict()``: name -> tensor placeholder, in TorchScript's order.

    Example::

        >>> from statemap.load.torch_format import load_zip
        >>> obj, locs = load_zip("ViT-B-32.pt")     # torch.jit.save of OpenAI CLIP (tiny here)
        >>> zf = zipfile.ZipFile("ViT-B-32.pt")
        >>> root = zf.namelist()[0].split("/")[0] + "/"
        >>> sd = script_state(obj, declarations(zf, root, "ViT-B-32.pt"), "ViT-B-32.pt")
        >>> "visual.conv1.weight" in sd
        True
    """
    if not (isinstance(obj, Opaque) and obj.qualname in decls):
        what = obj.qualname if isinstance(obj, Opaque) else type(obj).__name__
        raise CheckpointError(f"{path}: TorchScript archive's top object {what!r} is not a module declared in its code")
    out: dict[str, Any] = {}
    budget = [MAX_VISITS]

    def walk(m: Opaque, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{path}: modules nest deeper than {MAX_DEPTH} levels at {prefix!r}")
        budget[0] -= 1
        if budget[0] < 0:  # shared submodules appear under every name; a hostile DAG must not explode
            raise CheckpointError(f"{path}: more than {MAX_VISITS} module paths; refusing")
        params, buffers = decls[m.qualname]
        attrs = _attrs(m)
        for group in (params, buffers):
            for name in attrs:
                if name in group and attrs[name] is not None:
                    out[prefix + str(name)] = attrs[name]
        for name, v in attrs.items():
            if isinstance(v, Opaque) and v.qualname in decls:
                walk(v, f"{prefix}{name}.", depth + 1)

    walk(obj, "", 0)
    return out
