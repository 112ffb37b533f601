"""Model configs for spec vars: a JSON / YAML file beside the input, or a dict in the checkpoint.

Read as plain data, bounded before reading (:data:`MAX_CONFIG_BYTES`); YAML with safe tags only.
A dict stored in the checkpoint (fairseq ``args`` Namespace / ``cfg`` dict, Megatron ``args``)
comes from the safe unpickler's plain-data view of it (:attr:`Checkpoint.extras`): nothing in
the checkpoint runs.

Example::

    >>> read_config("llama-2-7b/params.json")["n_heads"]      # Meta's params.json (a tiny one here)
    4
    >>> checkpoint_config(open_checkpoint("checkpoint_best.pt"), "cfg.model")["encoder_layers"]
    12
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, StatemapError
from ..fsutil import read_regular
from .checkpoint import Checkpoint

MAX_CONFIG_BYTES = 4 << 20

__all__ = ["read_config", "checkpoint_config", "MAX_CONFIG_BYTES"]


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON or YAML mapping (``.json`` is JSON; anything else is read as YAML, which also reads JSON)."""
    p = Path(path)
    raw = read_regular(p, MAX_CONFIG_BYTES, "config")
    try:
        text = raw.decode("utf-8")
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except RecursionError:
        raise CheckpointError(f"{p}: config nested too deeply") from None
    except StatemapError:
        raise
    except Exception as e:  # noqa: BLE001 - bad JSON / YAML / UTF-8: one line naming the file
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{p}: cannot read config: {detail}") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{p}: config must be a mapping of name: value, got {type(data).__name__}")
    return dict(data)


def checkpoint_config(ck: Checkpoint, path: str) -> dict[str, Any]:
    """The dict at dotted ``path`` among the checkpoint's non-tensor entries (``args``, ``cfg.model``)."""
    cur: Any = ck.extras
    seen: list[str] = []
    name = ck.inputs[0].path if ck.inputs else ck.path  # several files: the first one's
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur or cur[part] is None:
            where = ".".join(seen) or "top level"
            have = ", ".join(sorted(map(str, cur))[:12]) if isinstance(cur, Mapping) else type(cur).__name__
            raise CheckpointError(
                f"{name}: no {part!r} at {where} of the checkpoint for 'config: {{checkpoint: {path}}}' (found: {have or 'nothing'})"
            )
        cur = cur[part]
        seen.append(part)
    if not isinstance(cur, Mapping):
        raise CheckpointError(f"{name}: {path!r} in the checkpoint is {type(cur).__name__}, not a mapping of settings")
    return dict(cur)
