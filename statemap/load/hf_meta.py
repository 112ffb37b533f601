"""A target layout from a transformers model class, built without weights.

``hf:BartForConditionalGeneration`` with a ``config.json`` builds the model on torch's meta
device (no memory for weights, no download) and reads ``state_dict()`` names, shapes and
dtypes: exactly what ``load_state_dict(strict=True)`` will ask for. ``hf:FlaxBertModel`` builds a
Flax model's parameter shape tree with ``_do_init=False`` (no arrays). transformers (and for
Flax, jax/flax) is needed only for this: ``pip install transformers``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..meta import TensorMeta
from .checkpoint import Checkpoint

PREFIX = "hf:"


def is_hf_target(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_LAYERS = 1024  # layers / experts in one config: each is a module built in memory


def _check_config(path: Path) -> None:
    """Refuse a config that is not a regular file, is huge, or asks for an absurd number of modules."""
    import json

    from ..fsutil import read_regular

    raw = read_regular(path, MAX_CONFIG_BYTES, "config")
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: config is not valid JSON: {str(e)[:200]}") from None
    todo, seen = [cfg], 0
    while todo:
        node = todo.pop()
        seen += 1
        if isinstance(node, dict):
            for k, v in node.items():
                name = str(k).lower()
                if (
                    isinstance(v, int)
                    and not isinstance(v, bool)
                    and any(w in name for w in ("layer", "expert"))
                    and v > MAX_CONFIG_LAYERS
                ):
                    raise CheckpointError(
                        f"{path}: config asks for {k} = {v if v < 10**12 else 'a huge number'} "
                        f"(more than {MAX_CONFIG_LAYERS}); refusing to build it"
                    )
                todo.append(v)
        elif isinstance(node, list):
            todo.extend(node)


def _spinner(build: Callable[[str, Any], Checkpoint]) -> Callable[[str, Any], Checkpoint]:
    """Show a spinner while a transformers model is built (importing and instantiating takes seconds)."""

    @functools.wraps(build)
    def wrapper(ref: str, config: Any) -> Checkpoint:
        from ..progress import task

        with task(f"building {ref} from {config or 'no config'} (transformers)"):
            return build(ref, config)

    return wrapper


@_spinner
def hf_layout(ref: str, config: str | os.PathLike[str] | None) -> Checkpoint:
    """``hf:ClassName`` + config.json -> a Checkpoint with metadata only (reading a tensor raises).

    Example::

        >>> ck = hf_layout("hf:BartForConditionalGeneration", "config.json")
        >>> ck.metas["final_logits_bias"].shape
        (1, 50265)
    """
    name = ref[len(PREFIX) :]
    if config is None:
        raise CheckpointError(f"{ref}: needs the model's config.json (--config PATH)")
    cfg_path = Path(config)
    if cfg_path.is_dir():
        cfg_path = cfg_path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path}: no such config file")
    _check_config(cfg_path)
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            f"{ref}: checking against a transformers class needs transformers (pip install transformers)"
        ) from None
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "config_class"):
        import difflib

        names = [n for n in dir(transformers) if n.endswith(("Model", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration"))]
        close = difflib.get_close_matches(name, names, n=1)
        raise CheckpointError(
            f"{ref}: transformers has no model class {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
        )
    try:
        cfg = cls.config_class.from_json_file(str(cfg_path))
    except Exception as e:
        raise CheckpointError(f"{cfg_path}: not a valid {cls.config_class.__name__} config: {e}") from None
    metas: dict[str, TensorMeta] = {}
    if name.startswith("Flax"):
        from flax.traverse_util import flatten_dict

        model = cls(cfg, _do_init=False)
        for path, leaf in flatten_dict(model.params_shape_tree).items():
            key = ".".join(map(str, path))
            metas[key] = TensorMeta(key, tuple(int(d) for d in leaf.shape), str(leaf.dtype))
    else:
        import torch

        with torch.device("meta"):
            model = cls(cfg)
        for key, t in model.state_dict().items():
            metas[key] = TensorMeta(key, tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."))

    def no_bytes(k: str) -> object:
        raise CheckpointError(f"{ref}: a layout built from a class has no tensor values ({k!r})")

    return Checkpoint(f"{ref} ({cfg_path})", "hf-meta", metas, no_bytes)  # type: ignore[arg-type]
