"""A target layout from a transformers model class, built without weights.

``hf:BartForConditionalGeneration`` with a ``config.json`` builds the model on torch's meta
device (no memory for weights, no download) and reads ``state_dict()`` names, shapes and
dtypes. Under transformers 4 that is exactly what ``save_pretrained`` writes and what
``load_state_dict(strict=True)`` asks for. transformers 5 renames some models' weights in memory
and converts them when loading and saving (ViT: ``encoder.layer.0.attention.attention.query`` on
disk, ``layers.0.attention.q_proj`` in memory); there the layout is the one ``save_pretrained``
writes, obtained with transformers' own reverse conversion, and the in-memory names are the
alternative ``from_pretrained`` accepts too: a comparison uses whichever of the two the other
side is closer to. ``hf:FlaxBertModel`` builds a Flax model's parameter shape tree with
``_do_init=False`` (no arrays); Flax classes exist in transformers 4 only. transformers (and for
Flax, jax/flax) is needed only for this: ``pip install transformers``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Collection, Iterator
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


def _spinner(build: Callable[..., Checkpoint]) -> Callable[..., Checkpoint]:
    """Show a spinner while a transformers model is built (importing and instantiating takes seconds)."""

    @functools.wraps(build)
    def wrapper(ref: str, config: Any, *args: Any, **kwargs: Any) -> Checkpoint:
        from ..progress import task

        with task(f"building {ref} from {config or 'no config'} (transformers)"):
            return build(ref, config, *args, **kwargs)

    return wrapper


def transformers_major() -> int | None:
    """The installed transformers' major version (read from its metadata, nothing imported), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return None


def _quiet_transformers() -> Any:
    """Silence transformers' config warnings while a class is built (restored afterwards)."""
    import contextlib

    from transformers.utils import logging

    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        before = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            yield
        finally:
            logging.set_verbosity(before)

    return quiet()


def _torch_layouts(ref: str, cls: Any, cfg: Any) -> list[tuple[str, dict[str, TensorMeta]]]:
    """The layouts ``from_pretrained`` loads for a torch class, as (what they are, metas), the
    default first. transformers 4: one, ``state_dict()``. transformers 5, when its checkpoint
    conversion mapping renames this model: the checkpoint names (every transform reverted as
    ``save_pretrained`` does for a model loaded from such a checkpoint, the model's own prefix
    changes included: CLIPVisionModel's ``vision_model.``), the in-memory names, and what
    ``save_pretrained`` writes for a model built from its config (no prefix change), where they differ."""
    import torch

    def metas(sd: Any) -> dict[str, TensorMeta]:
        return {k: TensorMeta(k, tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch.")) for k, t in sd.items()}

    with torch.device("meta"):
        model = cls(cfg)
    in_memory = model.state_dict()
    try:  # transformers 5: the checkpoint conversion mapping, reversed as save_pretrained does
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, revert_weight_conversion
    except ImportError:  # transformers 4: what is in memory is what is saved
        return [("", metas(in_memory))]
    try:
        transforms = get_model_conversion_mapping(model, add_legacy=False)
        # a sub-model's prefix change applies only to checkpoints of that sub-model on its own
        model._weight_conversions = [t for t in transforms if not (isinstance(t, PrefixChange) and t.scope_prefix)]
        layouts = [("checkpoint names", metas(revert_weight_conversion(model, dict(in_memory))))]
        layouts.append(("in-memory names, as load_state_dict asks", metas(in_memory)))
        del model._weight_conversions  # as save_pretrained does for a new model: prefix changes dropped
        layouts.append(("names save_pretrained writes for a new model", metas(revert_weight_conversion(model, dict(in_memory)))))
    except Exception as e:
        import transformers

        raise CheckpointError(
            f"{ref}: transformers {transformers.__version__} could not compute the checkpoint layout of this class "
            f"({type(e).__name__}: {str(e)[:200]}); compare with a file save_pretrained wrote instead (--expect FILE)"
        ) from None
    distinct: list[tuple[str, dict[str, TensorMeta]]] = []
    for kind, layout in layouts:
        if all(set(layout) != set(seen) for _, seen in distinct):
            distinct.append((kind, layout))
    return distinct if len(distinct) > 1 else [("", distinct[0][1])]


@_spinner
def hf_layout(ref: str, config: str | os.PathLike[str] | None, closest_to: Collection[str] | None = None) -> Checkpoint:
    """``hf:ClassName`` + config.json -> a Checkpoint with metadata only (reading a tensor raises).

    The layout is the one ``save_pretrained`` writes. Under transformers 5, for a model whose
    in-memory names differ from its checkpoint names (``from_pretrained`` loads either),
    ``closest_to`` (the keys being compared) picks the layout those keys are closest to; the label
    says which.

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
    major = transformers_major()
    if name.startswith("Flax") and major is not None and major >= 5:
        raise CheckpointError(
            f"{ref}: transformers {transformers.__version__} has no Flax classes (they were removed in transformers 5); "
            "install transformers<5 with flax (pip install 'transformers<5' flax), "
            "or compare with a reference file the Flax model wrote (its flax_model.msgpack)"
        )
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "config_class"):
        import difflib

        names = [n for n in dir(transformers) if n.endswith(("Model", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration"))]
        close = difflib.get_close_matches(name, names, n=1)
        raise CheckpointError(
            f"{ref}: transformers has no model class {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
        )
    label = f"{ref} ({cfg_path})"
    with _quiet_transformers():
        try:
            cfg = cls.config_class.from_json_file(str(cfg_path))
        except Exception as e:
            raise CheckpointError(f"{cfg_path}: not a valid {cls.config_class.__name__} config: {e}") from None
        if name.startswith("Flax"):
            from flax.traverse_util import flatten_dict

            model = cls(cfg, _do_init=False)
            metas = {}
            for path, leaf in flatten_dict(model.params_shape_tree).items():
                key = ".".join(map(str, path))
                metas[key] = TensorMeta(key, tuple(int(d) for d in leaf.shape), str(leaf.dtype))
        else:
            layouts = _torch_layouts(ref, cls, cfg)
            kind, metas = layouts[0]
            if closest_to is not None:  # the layout the compared keys are closest to (fewest differing names)
                keys = set(closest_to)
                kind, metas = min(layouts, key=lambda kl: len(keys ^ set(kl[1])))
            if kind:
                label = f"{ref} ({cfg_path}; transformers {transformers.__version__}: {kind})"

    def no_bytes(k: str) -> object:
        raise CheckpointError(f"{ref}: a layout built from a class has no tensor values ({k!r})")

    return Checkpoint(label, "hf-meta", metas, no_bytes)  # type: ignore[arg-type]
