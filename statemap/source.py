"""The input of a conversion: one checkpoint, or several files (``inputs:``), and the spec's vars
bound to its config (``config:`` / ``--vars-from``). Metadata only.

Example::

    >>> from statemap import load_spec
    >>> ck, spec = open_source(load_spec("llama.yaml"), "llama-2-13b/")   # consolidated.00.pth, .01.pth
    >>> ck.inputs[1].name, spec.var_dict["n_heads"]                      # n_heads from params.json
    ('consolidated.01.pth', 4)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError, SpecError
from .inputs import Inputs, parse_inputs
from .load import Checkpoint, open_checkpoint
from .spec import Spec

__all__ = ["open_input", "open_source", "bind_vars", "is_pattern", "config_base"]


def is_pattern(src: str | os.PathLike[str]) -> bool:
    """A command-line input such as ``ckpt/consolidated.{rank:int}.pth`` (and not an existing path)."""
    text = os.fspath(src)
    return "{" in text and not Path(text).exists()


def _folder_and_inputs(src: str | os.PathLike[str], inputs: Inputs | None) -> tuple[Path, Inputs | None]:
    from .load.multi import split_pattern

    if not is_pattern(src):
        return Path(src), inputs
    folder, pattern = split_pattern(os.fspath(src))
    try:
        got = inputs.with_files(pattern) if inputs is not None else parse_inputs(pattern)
    except SpecError as e:
        raise SpecError(f"{os.fspath(src)}: {e}") from None
    return Path(folder), got


def open_input(
    src: str | os.PathLike[str],
    inputs: Inputs | None = None,
    unwrap: tuple[str, ...] | None = None,
    strip_prefix: tuple[str, ...] | None = None,
) -> Checkpoint:
    """Open one checkpoint, or every file ``inputs`` (or a pattern given as ``src``) names."""
    from .load.formats import megatron_iteration
    from .load.multi import open_inputs

    folder, inputs = _folder_and_inputs(src, inputs)
    if inputs is None:
        return open_checkpoint(src, unwrap, strip_prefix)
    if folder.is_file():
        raise CheckpointError(
            f"{folder}: is one file, but the spec reads several ('inputs: {inputs.files}'); give the folder holding them"
        )
    if folder.is_dir():
        folder = megatron_iteration(folder)
    return open_inputs(folder, inputs, lambda p: open_checkpoint(p, unwrap, strip_prefix))


def config_base(src: str | os.PathLike[str]) -> Path:
    if is_pattern(src):
        from .load.multi import split_pattern

        return Path(split_pattern(os.fspath(src))[0])
    p = Path(src)
    return p if p.is_dir() else p.parent


def bind_vars(spec: Spec, ck: Checkpoint | None, base: Path | None, vars_from: Any = None) -> Spec:
    """Bind the spec's vars to its config: ``vars_from`` (a file or a mapping) over the spec's
    ``config:`` (a file relative to ``base``, or a dict in ``ck``). A spec whose vars name no
    config key and that declares no ``config:`` is returned as it is."""
    from .load.config import checkpoint_config, read_config

    from_config = [d.name for d in spec.var_defs if d.config]
    if vars_from is None and from_config and set(from_config) <= set(dict(spec.overrides)):
        return spec.bind_config(None, "")  # every var the config would give is set (--set / vars=): not read
    data: Any = None
    label = ""
    if isinstance(vars_from, Mapping):
        data, label = dict(vars_from), "vars_from"
    elif vars_from is not None:
        data, label = read_config(vars_from), os.fspath(vars_from)
    elif spec.config is not None:
        kind, where = spec.config
        if kind == "checkpoint":
            if ck is None:
                raise CheckpointError(
                    f"{spec.path}: 'config: {{checkpoint: {where}}}' reads the checkpoint file; pass vars_from= for in-memory state dicts"
                )
            data, label = checkpoint_config(ck, where), f"{ck.inputs[0].path if ck.inputs else ck.path} [{where}]"
        else:
            p = Path(where)
            if not p.is_absolute():
                if base is None:
                    raise CheckpointError(
                        f"{spec.path}: 'config: {where}' is relative to the input's folder; pass vars_from= instead"
                    )
                p = base / p
            if not p.exists():
                raise CheckpointError(
                    f"{p}: no such config ('config: {where}' in {spec.path} is read from the input's folder); "
                    "give --vars-from FILE, or --set the vars"
                )
            data, label = read_config(p), str(p)
    if data is None and not any(d.config for d in spec.var_defs):
        return spec
    return spec.bind_config(data, label)


def open_source(spec: Spec, src: str | os.PathLike[str], vars_from: Any = None) -> tuple[Checkpoint, Spec]:
    """Open ``src`` as ``spec`` reads it (metadata only) and bind the spec's vars to its config."""
    ck = open_input(src, spec.inputs, spec.unwrap, spec.strip_prefix)
    try:
        return ck, bind_vars(spec, ck, config_base(src), vars_from)
    except BaseException:
        ck.close()
        raise
