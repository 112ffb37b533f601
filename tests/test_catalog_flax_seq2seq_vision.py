"""The `flax_seq2seq_vision` family: Hugging Face PyTorch <-> Flax for T5, BART, CLIP and ViT.

No committed fixtures: both implementations (transformers 4.57.6 PyTorch and Flax classes, jax,
flax) run here. Each source is built from a tiny config (d_model 32, 2 layers, 4 heads, vocab 99;
images 32 px, patch 8), EVERY weight is perturbed (so zero biases, unit LayerNorms, tied or
swapped tensors cannot hide), and it is saved in its NATIVE container by the real library:
PyTorch `save_pretrained(safe_serialization=True)` (model.safetensors, tied duplicates left out)
or Flax `save_pretrained` (flax_model.msgpack). statemap.convert writes the other side's native
file; the real loader reads it back:

- Flax targets: `FlaxXxx.from_pretrained(dir)` (flax.serialization reads statemap's msgpack), and
  the file's param tree must equal a fresh model's key set and shapes: nothing is newly
  initialized and nothing is ignored;
- PyTorch targets: `load_state_dict(statemap.load_state_dict(out), strict=True)`.

Outputs on fixed inputs are compared (max abs diff <= 1e-5, fp32), PT -> Flax -> PT is bitwise
against the full PyTorch state_dict (tied copies included), and negative checks show the
comparisons fail on a wrong mapping.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import statemap

os.environ.setdefault("JAX_PLATFORMS", "cpu")

TOL = 1e-5


def _need_flax() -> Any:
    pytest.importorskip("transformers")
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    jax.config.update("jax_default_matmul_precision", "highest")
    return jax


# -- tiny configs and fixed inputs -----------------------------------------------------------------


def _config(family: str, **over: Any) -> Any:
    import transformers as T

    if family == "t5":
        return T.T5Config(**{
            **dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0),
            **over,
        })  # fmt: skip
    if family == "bart":
        return T.BartConfig(
            vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        )  # fmt: skip
    if family == "clip":
        return T.CLIPConfig(
            text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=16),
            vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8),
            projection_dim=16,
        )  # fmt: skip
    if family == "vit":
        return T.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, num_labels=5, layer_norm_eps=1e-6,
        )  # fmt: skip
    raise AssertionError(family)


def _classes(family: str) -> tuple[Any, Any]:
    import transformers as T

    return {
        "t5": (T.T5ForConditionalGeneration, T.FlaxT5ForConditionalGeneration),
        "bart": (T.BartForConditionalGeneration, T.FlaxBartForConditionalGeneration),
        "clip": (T.CLIPModel, T.FlaxCLIPModel),
        "vit": (T.ViTForImageClassification, T.FlaxViTForImageClassification),
    }[family]


def _inputs(family: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    if family in ("t5", "bart"):
        ids = rng.integers(3, 99, size=(2, 7)).astype(np.int64)
        ids[:, -1] = 2  # eos
        dec = rng.integers(3, 99, size=(2, 5)).astype(np.int64)
        dec[:, 0] = 0 if family == "t5" else 2  # decoder_start_token_id
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "decoder_input_ids": dec}
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    if family == "vit":
        return {"pixel_values": pixels}
    ids = rng.integers(3, 90, size=(2, 7)).astype(np.int64)
    ids[0, 4], ids[1, 6] = 98, 98  # the pooled (eos) position: the largest id, once per row
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels}


def _outputs(family: str, out: Any) -> dict[str, np.ndarray]:
    if family in ("t5", "bart"):
        names = {"logits": out.logits}
    elif family == "clip":
        names = {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds, "logits_per_image": out.logits_per_image}
    else:
        names = {"logits": out.logits, "last_encoder_hidden_state": out.hidden_states[-1]}
    return {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v, dtype=np.float32) for k, v in names.items()}


def _run_pt(family: str, model: Any) -> dict[str, np.ndarray]:
    import torch

    kw = {k: torch.from_numpy(v) for k, v in _inputs(family).items()}
    with torch.no_grad():
        return _outputs(family, model(**kw, output_hidden_states=family == "vit"))


_JITTED: dict[str, Any] = {}


def _run_flax(family: str, model: Any, params: Any) -> dict[str, np.ndarray]:
    """The Flax model's own __call__ under jax.jit (one compile per family: ~4x faster than eager)."""
    import jax

    if family not in _JITTED:  # same class and config for every call: the compiled forward is reused
        _JITTED[family] = jax.jit(lambda p, kw: model(**kw, params=p, output_hidden_states=family == "vit"))
    from flax.traverse_util import flatten_dict, unflatten_dict

    params = unflatten_dict({k: jax.numpy.asarray(v) for k, v in flatten_dict(params).items()})  # plain dict: one trace
    kw = {k: (v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in _inputs(family).items()}
    return _outputs(family, _JITTED[family](params, kw))


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# -- building and saving the sources in their native containers -------------------------------------


def _pt_model(family: str) -> Any:
    import torch

    torch.manual_seed(0)
    model = _classes(family)[0](_config(family)).eval()
    g = torch.Generator().manual_seed(1)
    seen = set()
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():  # params AND buffers (final_logits_bias)
            if t.is_floating_point() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                t.add_(torch.randn(t.shape, generator=g) * 0.02)
    return model


def _save_pt(family: str, d: Path) -> tuple[Path, Any]:
    model = _pt_model(family)
    model.save_pretrained(d, safe_serialization=True)
    return d / "model.safetensors", model


def _random_params(family: str, seed: int = 2) -> tuple[Any, Any]:
    """A Flax model (no init run) and a full param tree of random values in its exact structure.

    The tree comes from jax.eval_shape of the model's own init_weights (cheap: no compile); every
    leaf gets fresh random values: LayerNorm scales 1 + noise, kernels ~ 1/sqrt(fan_in), the rest
    (biases, embeddings, cls/class tokens, final_logits_bias, logit_scale) nonzero noise.
    """
    jax = _need_flax()
    from flax.traverse_util import unflatten_dict

    model = _classes(family)[1](_config(family), _do_init=False)
    rng = np.random.default_rng(seed)
    flat = {}
    for k, sd in _fresh_flax_keys(family).items():
        noise = rng.standard_normal(sd).astype(np.float32)
        name = k.rsplit(".", 1)[-1]
        if name == "scale" or k.endswith("layer_norm.weight"):  # LayerNorm / T5LayerNorm
            v = 1 + 0.1 * noise
        elif name == "kernel":
            v = noise / np.sqrt(np.prod(sd[:-1]))
        elif name == "logit_scale":
            v = np.float32(np.log(1 / 0.07)) + 0.1 * noise
        elif name == "embedding":
            v = 0.5 * noise
        else:
            v = 0.1 * noise
        flat[tuple(k.split("."))] = jax.numpy.asarray(v.astype(np.float32))
    return model, unflatten_dict(flat)


def _save_flax(family: str, d: Path) -> tuple[Path, Any, Any]:
    model, params = _random_params(family)
    model.save_pretrained(d, params=params)  # flax_model.msgpack (flax.serialization) + config.json
    return d / "flax_model.msgpack", model, params


def _flat_msgpack(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a msgpack as flax itself reads it."""
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict

    return {k: tuple(np.shape(v)) for k, v in flatten_dict(msgpack_restore(path.read_bytes()), sep=".").items()}


def _fresh_flax_keys(family: str, config: Any = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the params a fresh Flax model initializes (eval_shape: nothing computed)."""
    import jax
    from flax.traverse_util import flatten_dict

    model = _classes(family)[1](config or _config(family), _do_init=False)
    shapes = jax.eval_shape(lambda r: model.init_weights(r, model.input_shape), jax.random.PRNGKey(0))
    return {k: tuple(v.shape) for k, v in flatten_dict(shapes, sep=".").items()}


# -- the per-family cases -----------------------------------------------------------------------------

FAMILIES = ["t5", "bart", "clip", "vit"]


@pytest.fixture(scope="module")
def pt_to_flax(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Lazily: per family, PT source saved -> converted to flax_model.msgpack -> Flax from_pretrained."""
    cache: dict[str, dict[str, Any]] = {}

    def get(family: str) -> dict[str, Any]:
        if family not in cache:
            _need_flax()
            root = tmp_path_factory.mktemp(f"{family}_pt2fx")
            src, pt = _save_pt(family, root / "pt")
            out_dir = root / "flax"
            out_dir.mkdir()
            report = statemap.convert(f"{family}-pt-to-flax", src, out_dir / "flax_model.msgpack")
            shutil.copy(root / "pt" / "config.json", out_dir / "config.json")
            # the real loader (flax.serialization.from_bytes); _do_init=False: no random init to
            # fill gaps, so a missing param shows up in the key-set check below
            fx, params = _classes(family)[1].from_pretrained(out_dir, _do_init=False)
            cache[family] = {
                "root": root, "src": src, "pt": pt, "out": out_dir / "flax_model.msgpack",
                "flax": fx, "params": params, "report": report,
            }  # fmt: skip
        return cache[family]

    return get


@pytest.mark.flax
@pytest.mark.parametrize("family", FAMILIES)
def test_pt_to_flax_outputs_match(family, pt_to_flax):
    from flax.traverse_util import flatten_dict

    case = pt_to_flax(family)
    assert case["report"].passthrough == []
    written = _flat_msgpack(case["out"])
    fresh = _fresh_flax_keys(family)
    assert written == fresh  # same params, same shapes: from_pretrained initialized nothing, ignored nothing
    loaded = flatten_dict(case["params"], sep=".")
    assert {k: tuple(v.shape) for k, v in loaded.items()} == fresh
    diff = _max_diff(_run_flax(family, case["flax"], case["params"]), _run_pt(family, case["pt"]))
    print(f"{family}-pt-to-flax max abs diff {diff:.3g}")
    assert diff <= TOL


@pytest.mark.flax
@pytest.mark.parametrize("family", FAMILIES)
def test_pt_to_flax_to_pt_is_bitwise(family, pt_to_flax, tmp_path):
    """PT file -> Flax msgpack -> PT: every key of the full PyTorch state_dict (tied copies too)."""
    case = pt_to_flax(family)
    back = tmp_path / "model.safetensors"
    report = statemap.convert(f"{family}-flax-to-pt", case["out"], back)
    assert report.passthrough == [] and report.dropped == []
    got = statemap.load_state_dict(back)
    want = case["pt"].state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert np.array_equal(got[k].numpy().reshape(-1).view(np.uint8), v.numpy().reshape(-1).view(np.uint8)), k
    # the saved PT file left the tied copies out; every key it had survives the round trip
    src = statemap.load_state_dict(case["src"])
    assert set(src) <= set(got)


@pytest.mark.flax
@pytest.mark.parametrize("family", FAMILIES)
def test_flax_to_pt_outputs_match(family, tmp_path):
    src, fx, params = _save_flax(family, tmp_path / "flax")
    out = tmp_path / "pt" / "model.safetensors"
    out.parent.mkdir()
    report = statemap.convert(f"{family}-flax-to-pt", src, out)
    assert report.passthrough == [] and report.dropped == []
    pt = _classes(family)[0](_config(family)).eval()
    pt.load_state_dict(statemap.load_state_dict(out), strict=True)
    diff = _max_diff(_run_pt(family, pt), _run_flax(family, fx, params))
    print(f"{family}-flax-to-pt max abs diff {diff:.3g}")
    assert diff <= TOL


# -- details and negative checks ----------------------------------------------------------------------


@pytest.mark.flax
def test_tied_embeddings_and_final_logits_bias(pt_to_flax, tmp_path):
    """BART: Flax keeps final_logits_bias as a top-level param, and no embed_tokens / lm_head;
    flax -> pt writes one tensor for all four tied names (a .pt output shares one storage)."""
    case = pt_to_flax("bart")
    written = _flat_msgpack(case["out"])
    assert written["final_logits_bias"] == (1, 99)
    assert not any("embed_tokens" in k or k.startswith("lm_head") for k in written)
    assert set(case["report"].dropped) == set()  # save_pretrained had already left the tied copies out
    back = tmp_path / "bart.pt"
    report = statemap.convert("bart-flax-to-pt", case["out"], back)
    assert [sorted(g) for g in report.tied] == [
        sorted(
            ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"]
        )
    ]
    import torch

    sd = torch.load(back, weights_only=True)
    ptrs = {
        sd[k].untyped_storage().data_ptr() for k in ("model.shared.weight", "model.encoder.embed_tokens.weight", "lm_head.weight")
    }
    assert len(ptrs) == 1


@pytest.mark.flax
def test_in_memory_state_dict_drops_tied_copies():
    """A full T5 state_dict() (tied copies present) maps too: embed_tokens are dropped; lm_head.weight
    (present in memory even when tied) becomes lm_head.kernel, which a tied Flax model does not use."""
    model = _pt_model("t5")
    new, report = statemap.map_state_dict("t5-pt-to-flax", model.state_dict())
    assert set(report.dropped) == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert set(new) - set(_fresh_flax_keys("t5")) == {"lm_head.kernel"}


@pytest.mark.flax
def test_untied_t5_lm_head_maps_to_kernel(tmp_path):
    """tie_word_embeddings=False (T5 v1.1 / flan-t5, gated-gelu): save_pretrained writes lm_head.weight,
    Flax has lm_head.kernel and DenseReluDense.wi_0 / wi_1; the spec's optional rule covers it."""
    import transformers as T

    cfg = _config("t5", tie_word_embeddings=False, feed_forward_proj="gated-gelu")
    assert not cfg.tie_word_embeddings and cfg.is_gated_act
    T.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "pt", safe_serialization=True)
    _need_flax()
    statemap.convert("t5-pt-to-flax", tmp_path / "pt" / "model.safetensors", tmp_path / "flax_model.msgpack")
    fresh = _fresh_flax_keys("t5", cfg)
    assert "lm_head.kernel" in fresh and "encoder.block.0.layer.1.DenseReluDense.wi_1.kernel" in fresh
    assert _flat_msgpack(tmp_path / "flax_model.msgpack") == fresh
    # and the reverse spec refuses the untied head instead of silently dropping it
    with pytest.raises(statemap.StatemapError, match="lm_head.kernel"):
        statemap.convert("t5-flax-to-pt", tmp_path / "flax_model.msgpack", tmp_path / "back.safetensors")


@pytest.mark.flax
def test_negative_checks(pt_to_flax, tmp_path):
    """The comparisons can fail: H and W swapped in the conv permute (ViT), q kernel not transposed (T5)."""
    import yaml

    mappings = Path(statemap.__file__).resolve().parent.parent / "mappings"
    # ViT flax -> pt with [3, 2, 1, 0]: shapes agree, the patches are read transposed
    src, fx, params = _save_flax("vit", tmp_path / "vit")
    raw = yaml.safe_load((mappings / "vit-flax-to-pt.yaml").read_text())
    for rule in raw["rules"]:
        if "permute" in rule:
            rule["permute"]["dims"] = [3, 2, 1, 0]
    new, _ = statemap.map_state_dict(raw, statemap.load_state_dict(src))
    pt = _classes("vit")[0](_config("vit")).eval()
    pt.load_state_dict(new, strict=True)
    assert _max_diff(_run_pt("vit", pt), _run_flax("vit", fx, params)) > 1e-3
    # T5 pt -> flax with the self-attention q kept as [out, in]: square, so it loads, but it is wrong
    case = pt_to_flax("t5")
    flat = statemap.load_state_dict(case["out"])
    for k in [k for k in flat if k.endswith("SelfAttention.q.kernel")]:
        flat[k] = flat[k].T.contiguous()
    back, _ = statemap.map_state_dict("t5-flax-to-pt", flat)
    pt = _classes("t5")[0](_config("t5")).eval()
    pt.load_state_dict(back, strict=True)
    assert _max_diff(_run_pt("t5", pt), _run_pt("t5", case["pt"])) > 1e-3


def test_vit_model_with_pooler_maps_both_ways():
    """ViTModel (no vit. prefix, pooler.dense) -> FlaxViTModel key set and shapes, and back bitwise."""
    pytest.importorskip("transformers")
    import torch
    import transformers as T

    torch.manual_seed(0)
    pt = T.ViTModel(_config("vit"))
    new, report = statemap.map_state_dict("vit-pt-to-flax", pt.state_dict())
    assert "pooler.dense.kernel" in new and "layernorm.scale" in new and "embeddings.cls_token" in new
    assert tuple(new["embeddings.patch_embeddings.projection.kernel"].shape) == (8, 8, 3, 32)
    back, _ = statemap.map_state_dict("vit-flax-to-pt", new)
    assert set(back) == set(pt.state_dict())
    for k, v in pt.state_dict().items():
        assert torch.equal(back[k], v), k
    try:
        _need_flax()
    except pytest.skip.Exception:
        return
    import jax
    from flax.traverse_util import flatten_dict

    fx = T.FlaxViTModel(_config("vit"), _do_init=False)
    shapes = jax.eval_shape(lambda r: fx.init_weights(r, fx.input_shape), jax.random.PRNGKey(0))
    assert {k: tuple(v.shape) for k, v in flatten_dict(shapes, sep=".").items()} == {k: tuple(v.shape) for k, v in new.items()}


# -- streaming fixtures: the native source file of every spec ------------------------------------------


def _streaming_pt(family: str):
    def fn(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
        pytest.importorskip("transformers")
        path, _ = _save_pt(family, tmp_path / f"{family}_pt")
        return path, {}

    return fn


def _streaming_flax(family: str):
    def fn(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
        path, _, _ = _save_flax(family, tmp_path / f"{family}_flax")
        return path, {}

    return fn


STREAMING_FIXTURES = {
    **{f"{f}-pt-to-flax": _streaming_pt(f) for f in FAMILIES},
    **{f"{f}-flax-to-pt": _streaming_flax(f) for f in FAMILIES},
}
