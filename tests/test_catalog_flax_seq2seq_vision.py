"""The `flax_seq2seq_vision` family: Hugging Face PyTorch <-> Flax for T5 / mT5, BART / mBART, CLIP and ViT,
against transformers' own PyTorch <-> Flax converter.

No committed fixtures: both implementations (transformers 4.57.6 PyTorch and Flax classes, jax, flax) run
here. The variants come from one list, VARIANTS (adding one is one line): every task head transformers has
a Flax class for, two sizes, tied and untied word embeddings where the family has that option (T5 original,
T5 v1.1 gated-gelu with an untied lm_head, mT5; BART, mBART with its extra encoder/decoder layer_norm).
For each variant:

- PT -> Flax: the PyTorch model's `state_dict()` (in memory: tied tensors are one object) AND its
  `save_pretrained` model.safetensors (tied copies left out) go through statemap; the result is BITWISE
  equal to `transformers.modeling_flax_pytorch_utils.convert_pytorch_state_dict_to_flax` (the file through
  `load_pytorch_checkpoint_in_flax_state_dict`) on every key of the Flax model's params, and statemap
  writes exactly that key set. The anchor also emits "unexpected" keys for the in-memory tied copies
  (encoder.embed_tokens.weight -> ...kernel, a tied lm_head.weight -> lm_head.kernel), which
  `from_pretrained` ignores with a warning; statemap leaves them out (verified tied), and the test checks
  that every such anchor-only key comes from a PyTorch key that shares storage with a kept one.
- Flax -> PT: a Flax param tree of random values (the model's exact structure), saved by the Flax
  model's `save_pretrained` (flax_model.msgpack) and also passed in memory (flat numpy dict), goes
  through statemap; the result equals, bitwise and key for key, the `state_dict()` of a PyTorch model after `load_flax_weights_in_pytorch_model`, and it
  loads with `strict=True`.
- Outputs: the Flax model on statemap's params vs the PyTorch model, and the PyTorch model on
  statemap's state dict vs the Flax model: max abs diff <= 1e-4 (fp32, matmul precision "highest").
- PT -> Flax -> PT is bitwise against the full PyTorch state_dict (tied copies included).

Every weight is random (PyTorch: init + noise; Flax: fresh noise), so zero biases, unit norms and tied or
swapped tensors cannot hide. The anchor functions read only the Flax model's param *structure*
(`flax_model.params` for key set and shapes, `base_model_prefix`): they get the real class's prefix and
a param tree of the real structure (jax.eval_shape of the model's own init), which avoids one slow eager
init per variant.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flax_variants import ShapeView, anchor_pt_to_flax, bits, bitwise_diff, flat, unflat

import statemap

os.environ.setdefault("JAX_PLATFORMS", "cpu")

TOL = 1e-4

pytestmark = pytest.mark.flax


def _need_flax() -> Any:
    pytest.importorskip("transformers")
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    jax.config.update("jax_default_matmul_precision", "highest")
    return jax


# -- the variant matrix ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One PyTorch class + config; the Flax class is `"Flax" + cls`."""

    cls: str  # PyTorch class name in transformers, e.g. "T5ForConditionalGeneration"
    size: str  # "s" | "m" (see _config)
    over: tuple[tuple[str, Any], ...] = ()  # config overrides
    kwargs: tuple[tuple[str, Any], ...] = ()  # model constructor kwargs (both classes)
    vars: tuple[tuple[str, Any], ...] = ()  # --set for the flax-to-pt spec

    @property
    def arch(self) -> str:
        for a in ("MT5", "T5", "MBart", "Bart", "CLIP", "ViT"):
            if self.cls.startswith(a):
                return a.lower()
        raise AssertionError(self.cls)

    @property
    def family(self) -> str:  # the catalog spec family: mT5 uses the t5 specs, mBART the bart specs
        return {"mt5": "t5", "mbart": "bart"}.get(self.arch, self.arch)

    @property
    def id(self) -> str:
        extra = [f"{k}={v}" for k, v in self.over + self.kwargs]
        return "-".join([self.cls, self.size, *extra]).replace("tie_word_embeddings=False", "untied")


def V(cls: str, size: str, *, kwargs: dict[str, Any] | None = None, vars: dict[str, Any] | None = None, **over: Any) -> Variant:
    return Variant(cls, size, tuple(over.items()), tuple((kwargs or {}).items()), tuple((vars or {}).items()))


UNTIED = {"tie_word_embeddings": False}
V11 = {"tie_word_embeddings": False, "feed_forward_proj": "gated-gelu"}  # T5 v1.1 / flan-t5
BARE = {"lm_head": 0}  # t5-flax-to-pt: the PyTorch target has no lm_head (T5Model / T5EncoderModel)

VARIANTS = [
    V("T5ForConditionalGeneration", "s"),
    V("T5ForConditionalGeneration", "m"),
    V("T5ForConditionalGeneration", "s", **V11),
    V("T5ForConditionalGeneration", "m", **V11),
    V("T5ForConditionalGeneration", "s", **UNTIED),
    V("T5Model", "s", vars=BARE),
    V("T5Model", "m", vars=BARE, **V11),
    V("T5EncoderModel", "s"),
    V("T5EncoderModel", "m"),
    V("MT5ForConditionalGeneration", "s"),  # MT5Config: untied lm_head and gated-gelu by default
    V("MT5ForConditionalGeneration", "m"),
    V("MT5Model", "s", vars=BARE),
    V("MT5EncoderModel", "m"),
    V("BartForConditionalGeneration", "s"),
    V("BartForConditionalGeneration", "m"),
    V("BartForConditionalGeneration", "s", **UNTIED),
    V("BartForConditionalGeneration", "m", **UNTIED),
    V("BartForSequenceClassification", "s"),
    V("BartForSequenceClassification", "m"),
    V("BartForQuestionAnswering", "s"),
    V("BartForQuestionAnswering", "m"),
    V("BartModel", "s"),
    V("BartModel", "m"),
    V("MBartForConditionalGeneration", "s"),
    V("MBartForConditionalGeneration", "m", **UNTIED),
    V("MBartForSequenceClassification", "s"),
    V("MBartForSequenceClassification", "m"),
    V("MBartForQuestionAnswering", "s"),
    V("MBartForQuestionAnswering", "m"),
    V("MBartModel", "s"),
    V("MBartModel", "m"),
    V("CLIPModel", "s"),
    V("CLIPModel", "m"),
    V("CLIPTextModel", "s"),
    V("CLIPTextModel", "m"),
    V("CLIPVisionModel", "s"),
    V("CLIPVisionModel", "m"),
    V("CLIPTextModelWithProjection", "s"),
    V("CLIPTextModelWithProjection", "m"),
    V("ViTForImageClassification", "s"),
    V("ViTForImageClassification", "m"),
    V("ViTModel", "s"),
    V("ViTModel", "m", kwargs={"add_pooling_layer": False}),
]
IDS = [v.id for v in VARIANTS]
assert len(set(IDS)) == len(IDS), "two variants with one id"

# d_model, layers, heads, ffn, vocab, image size (patch 8)
SIZES = {"s": (16, 1, 2, 20, 67, 16), "m": (32, 2, 4, 37, 99, 32)}


def _config(v: Variant) -> Any:
    import transformers as T

    d, n, h, ffn, vocab, img = SIZES[v.size]
    over = dict(v.over)
    if v.arch in ("t5", "mt5"):
        cls = T.MT5Config if v.arch == "mt5" else T.T5Config
        base = dict(vocab_size=vocab, d_model=d, d_kv=d // h, d_ff=ffn, num_layers=n, num_decoder_layers=n, num_heads=h,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)  # fmt: skip
        return cls(**{**base, **over})
    if v.arch in ("bart", "mbart"):
        cls = T.MBartConfig if v.arch == "mbart" else T.BartConfig
        base = dict(vocab_size=vocab, d_model=d, encoder_layers=n, decoder_layers=n, encoder_attention_heads=h,
                    decoder_attention_heads=h, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=32,
                    num_labels=3)  # fmt: skip
        return cls(**{**base, **over})
    text = dict(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=n, num_attention_heads=h,
                max_position_embeddings=16)  # fmt: skip
    vision = dict(hidden_size=d, intermediate_size=ffn, num_hidden_layers=n, num_attention_heads=h, image_size=img, patch_size=8)
    if v.cls == "CLIPModel":
        return T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=d // 2, **over)
    if v.cls.startswith("CLIPText"):
        return T.CLIPTextConfig(**text, projection_dim=d // 2, **over)
    if v.cls.startswith("CLIPVision"):
        return T.CLIPVisionConfig(**vision, projection_dim=d // 2, **over)
    return T.ViTConfig(**vision, num_labels=5, layer_norm_eps=1e-6, **over)


def _classes(v: Variant) -> tuple[Any, Any]:
    import transformers as T

    return getattr(T, v.cls), getattr(T, "Flax" + v.cls)


def _inputs(v: Variant) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    vocab, img = SIZES[v.size][4], SIZES[v.size][5]
    if v.family in ("t5", "bart"):
        ids = rng.integers(3, vocab, size=(2, 7)).astype(np.int64)
        ids[:, -1] = 2  # eos (BART's classification head pools the last eos)
        kw = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if v.cls.endswith(("ForConditionalGeneration", "Model")) and "Encoder" not in v.cls:
            dec = rng.integers(3, vocab, size=(2, 5)).astype(np.int64)
            dec[:, 0] = 0 if v.family == "t5" else 2  # decoder_start_token_id
            kw["decoder_input_ids"] = dec
        return kw
    pixels = rng.standard_normal((2, 3, img, img)).astype(np.float32)
    if v.family == "vit" or "Vision" in v.cls:
        return {"pixel_values": pixels}
    ids = rng.integers(3, vocab - 1, size=(2, 7)).astype(np.int64)
    ids[0, 4], ids[1, 6] = vocab - 1, vocab - 1  # CLIP pools at the largest id (eos), once per row
    kw = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return {**kw, "pixel_values": pixels} if v.cls == "CLIPModel" else kw


def _arrays(out: Any) -> dict[str, np.ndarray]:
    """The array fields of a ModelOutput (PyTorch or Flax), as float32 numpy."""
    got = {}
    for k in out.keys():
        x = out[k]
        if hasattr(x, "detach"):
            x = x.detach().numpy()
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            got[k] = np.asarray(x, dtype=np.float32)
    return got


def _run_pt(v: Variant, model: Any) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        return _arrays(model(**{k: torch.from_numpy(x) for k, x in _inputs(v).items()}))


def _run_flax(v: Variant, model: Any, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The Flax model's own __call__, eagerly: jax caches each primitive's compile by shape, so variants
    of one family and size reuse them (one jax.jit per variant costs more here)."""
    kw = {k: (x.astype(np.int32) if x.dtype == np.int64 else x) for k, x in _inputs(v).items()}
    return _arrays(model(**kw, params=unflat(params)))


_HEAD_OUTPUT = {"ForConditionalGeneration": "logits", "ForSequenceClassification": "logits", "ForQuestionAnswering": "start_logits",
                "ForImageClassification": "logits", "CLIPModel": "logits_per_image", "WithProjection": "text_embeds"}  # fmt: skip


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Max abs diff over every array output both frameworks return (the head's own output among them)."""
    common = a.keys() & b.keys()
    assert common & ({"last_hidden_state", *_HEAD_OUTPUT.values()}), (a.keys(), b.keys())
    for k in common:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
    return max(float(np.abs(a[k] - b[k]).max()) for k in common)


def _assert_bitwise(got: Mapping[str, Any], want: Mapping[str, Any], what: str) -> None:
    bad = bitwise_diff(got, want)
    assert not bad, f"{what}: {bad[:6]}"


# -- building the sources -------------------------------------------------------------------------------


def _pt_model(v: Variant) -> Any:
    import torch

    torch.manual_seed(0)
    model = _classes(v)[0](_config(v), **dict(v.kwargs)).eval()
    g = torch.Generator().manual_seed(1)
    seen = set()
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():  # params AND buffers (final_logits_bias)
            if t.is_floating_point() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                t.add_(torch.randn(t.shape, generator=g) * 0.02)
    return model


def _random_params(shapes: Mapping[str, tuple[int, ...]], seed: int = 2) -> dict[str, np.ndarray]:
    """Fresh random values in the Flax model's exact structure: norm scales 1 + noise, kernels ~ 1/sqrt(fan_in),
    embeddings and everything else (biases, tokens, final_logits_bias, logit_scale) nonzero noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in shapes.items():
        noise = rng.standard_normal(shape).astype(np.float32)
        parent, name = (["", *k.split(".")])[-2:]
        if name == "scale" or (name == "weight" and "norm" in parent):  # LayerNorm / T5LayerNorm
            x = 1 + 0.1 * noise
        elif name == "kernel":
            x = noise / np.sqrt(np.prod(shape[:-1]))
        elif name == "logit_scale":
            x = np.float32(np.log(1 / 0.07)) + 0.1 * noise
        elif name == "embedding":
            x = 0.5 * noise
        else:
            x = 0.1 * noise
        out[k] = np.asarray(x, dtype=np.float32)  # 0-d (logit_scale) stays an array, not a numpy scalar
    return out


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
    """A flax_model.msgpack as flax itself reads it, flattened."""
    from flax.serialization import msgpack_restore

    return flat(msgpack_restore(path.read_bytes()))


def _tied_duplicates(sd: Mapping[str, Any]) -> set[str]:
    """Keys of a PyTorch state_dict that share storage with an earlier key (tied copies)."""
    first: dict[tuple[int, int], str] = {}
    dups = set()
    for k, t in sd.items():
        sig = (t.untyped_storage().data_ptr(), t.storage_offset())
        if sig in first:
            dups.add(k)
        else:
            first[sig] = k
    return dups


@dataclass
class Case:
    """One variant's sources, built once per module and shared by its tests."""

    v: Variant
    root: Path
    pt: Any  # the PyTorch source model (perturbed)
    src: Path  # its save_pretrained model.safetensors
    fx: Any  # the Flax model (_do_init=False: params are passed in)
    shapes: dict[str, tuple[int, ...]]  # the Flax model's param keys and shapes
    fx_params: dict[str, np.ndarray]  # random Flax params ...
    fx_src: Path  # ... saved by the Flax model's save_pretrained (flax_model.msgpack)
    pt2fx: Path | None = None  # statemap's PT -> Flax output from src


_CASES: dict[str, Case] = {}


@pytest.fixture
def case(request, tmp_path_factory) -> Case:
    v: Variant = request.param
    if v.id not in _CASES:
        _need_flax()
        root = tmp_path_factory.mktemp(v.id[:60])
        pt = _pt_model(v)
        pt.save_pretrained(root / "pt", safe_serialization=True)
        fx = _classes(v)[1](_config(v), _do_init=False, **dict(v.kwargs))
        shapes = {k: tuple(x.shape) for k, x in flat(fx.params_shape_tree).items()}
        params = _random_params(shapes)
        fx.save_pretrained(root / "flax", params=unflat(params))  # flax.serialization msgpack + config.json
        _CASES[v.id] = Case(
            v, root, pt, root / "pt" / "model.safetensors", fx, shapes, params, root / "flax" / "flax_model.msgpack"
        )
    return _CASES[v.id]


by_variant = pytest.mark.parametrize("case", VARIANTS, ids=IDS, indirect=True)


def _pt2fx(case: Case) -> Path:
    if case.pt2fx is None:
        out = case.root / "pt2fx" / "flax_model.msgpack"
        out.parent.mkdir()
        report = statemap.convert(f"{case.v.family}-pt-to-flax", case.src, out)
        assert report.passthrough == []
        case.pt2fx = out
    return case.pt2fx


# -- the matrix -----------------------------------------------------------------------------------------


@by_variant
def test_pt_to_flax_equals_transformers(case):
    """statemap PT -> Flax == convert_pytorch_state_dict_to_flax, bitwise, from the file and from memory."""
    from transformers.modeling_flax_pytorch_utils import load_pytorch_checkpoint_in_flax_state_dict

    v, view = case.v, ShapeView(case.fx.params_shape_tree, case.fx.base_model_prefix)
    # 1. the save_pretrained file (tied copies left out), read by each side's own file reader
    got = _read_msgpack(_pt2fx(case))
    want = flat(load_pytorch_checkpoint_in_flax_state_dict(view, str(case.src), is_sharded=False))
    assert set(want) == set(case.shapes), "from the file the anchor writes exactly the Flax model's keys"
    _assert_bitwise(got, want, f"{v.family}-pt-to-flax on model.safetensors")

    # 2. the in-memory state_dict() (tied tensors are one object)
    sd = case.pt.state_dict()
    new, report = statemap.map_state_dict(f"{v.family}-pt-to-flax", sd)
    want, extra = anchor_pt_to_flax(sd, case.fx)
    tied = _tied_duplicates(sd)
    # the anchor's "unexpected" keys (ignored by from_pretrained) come from tied copies only; statemap drops those
    assert {k.rsplit(".", 1)[0] for k in extra} == {k.rsplit(".", 1)[0] for k in tied}, (sorted(extra), sorted(tied))
    assert set(report.dropped) == tied
    _assert_bitwise(new, want, f"{v.family}-pt-to-flax on state_dict()")


@by_variant
def test_flax_to_pt_equals_transformers(case, tmp_path):
    """statemap Flax -> PT == what load_flax_weights_in_pytorch_model puts into the PyTorch model, bitwise;
    the PyTorch model on it (strict load) gives the Flax model's outputs."""
    import torch
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    v = case.v
    out = tmp_path / "model.safetensors"
    report = statemap.convert(f"{v.family}-flax-to-pt", case.fx_src, out, vars=dict(v.vars))
    assert report.passthrough == [] and report.dropped == []
    got = statemap.load_state_dict(out)

    torch.manual_seed(12345)  # a key the anchor does not fill keeps this init and shows up as a mismatch
    anchor = _classes(v)[0](_config(v), **dict(v.kwargs)).eval()
    load_flax_weights_in_pytorch_model(anchor, unflat(case.fx_params))
    _assert_bitwise(got, anchor.state_dict(), f"{v.family}-flax-to-pt")
    in_memory, _ = statemap.map_state_dict(f"{v.family}-flax-to-pt", case.fx_params, vars=dict(v.vars))  # flat numpy params
    _assert_bitwise(in_memory, anchor.state_dict(), f"{v.family}-flax-to-pt in memory")

    pt = _classes(v)[0](_config(v), **dict(v.kwargs)).eval()
    pt.load_state_dict(got, strict=True)
    want = next((o for suffix, o in _HEAD_OUTPUT.items() if v.cls.endswith(suffix)), "last_hidden_state")
    pt_out = _run_pt(v, pt)
    assert want in pt_out, (v.cls, sorted(pt_out))
    diff = _max_diff(pt_out, _run_flax(v, case.fx, case.fx_params))
    print(f"{v.id} flax-to-pt outputs max abs diff {diff:.3g}")
    assert diff <= TOL


@by_variant
def test_pt_to_flax_outputs_and_round_trip(case, tmp_path):
    """The Flax model on statemap's params gives the PyTorch outputs; PT -> Flax -> PT is bitwise."""
    v = case.v
    params = _read_msgpack(_pt2fx(case))
    assert {k: tuple(x.shape) for k, x in params.items()} == case.shapes
    diff = _max_diff(_run_flax(v, case.fx, params), _run_pt(v, case.pt))
    print(f"{v.id} pt-to-flax outputs max abs diff {diff:.3g}")
    assert diff <= TOL

    back = tmp_path / "back.safetensors"
    report = statemap.convert(f"{v.family}-flax-to-pt", _pt2fx(case), back, vars=dict(v.vars))
    assert report.passthrough == [] and report.dropped == []
    _assert_bitwise(statemap.load_state_dict(back), case.pt.state_dict(), "PT -> Flax -> PT")


# -- tied heads: verified, never assumed -----------------------------------------------------------------


def _variant(cls: str, **over: Any) -> Variant:
    """The first variant in VARIANTS of this class with exactly these config overrides."""
    return next(v for v in VARIANTS if v.cls == cls and dict(v.over) == over)


def _untie(sd: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A state_dict in which `key` is its own tensor, with other values than its former tie partner."""
    out = dict(sd)
    out[key] = sd[key].clone() + 0.5
    return out


@pytest.mark.parametrize(
    "cls, shared", [("T5ForConditionalGeneration", "shared.weight"), ("MBartForConditionalGeneration", "model.shared.weight")]
)
def test_in_memory_tied_lm_head_is_dropped_and_untied_one_kept(cls, shared):
    """tied_to reads the tie off the state_dict: a tied lm_head is dropped, the same model with its head
    untied (other values) gets lm_head.kernel, bitwise the anchor's; the untied Flax model uses it."""
    pytest.importorskip("transformers")
    v = _variant(cls)
    sd = _pt_model(v).state_dict()
    new, report = statemap.map_state_dict(f"{v.family}-pt-to-flax", sd)
    assert "lm_head.weight" in report.dropped and "lm_head.kernel" not in new
    untied = _untie(sd, "lm_head.weight")
    new, report = statemap.map_state_dict(f"{v.family}-pt-to-flax", untied)
    assert "lm_head.weight" not in report.dropped
    assert bits(new["lm_head.kernel"]) == bits(untied["lm_head.weight"].T.contiguous())
    assert bits(new[shared.replace("weight", "embedding")]) == bits(sd[shared])


@pytest.mark.parametrize(
    "cls, embed, shared",
    [
        ("T5ForConditionalGeneration", "encoder.embed_tokens.weight", "shared.weight"),
        ("BartForConditionalGeneration", "model.decoder.embed_tokens.weight", "model.shared.weight"),
        ("MBartForConditionalGeneration", "model.encoder.embed_tokens.weight", "model.shared.weight"),
    ],
)
def test_untied_embed_tokens_fail_the_catalog_spec_and_write_nothing(cls, embed, shared, tmp_path):
    """The catalog pt-to-flax specs drop embed_tokens ASSUMING they equal shared.weight (Flax has one
    embedding): a checkpoint where they differ fails with one line naming both keys; no file appears."""
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    v = _variant(cls)
    sd = _untie(_pt_model(v).state_dict(), embed)
    src = tmp_path / "untied.safetensors"
    save_file({k: t.contiguous() for k, t in _dedupe(sd).items()}, src)
    out = tmp_path / "flax_model.msgpack"
    with pytest.raises(statemap.StatemapError) as e:
        statemap.convert(f"{v.family}-pt-to-flax", src, out)
    msg = str(e.value)
    assert embed in msg and shared in msg and "\n" not in msg, msg
    assert not out.exists() and list(tmp_path.iterdir()) == [src]
    with pytest.raises(statemap.StatemapError, match=embed.replace(".", r"\.")):
        statemap.map_state_dict(f"{v.family}-pt-to-flax", sd)


@pytest.mark.parametrize("cls", ["T5ForConditionalGeneration", "BartForConditionalGeneration", "MBartForConditionalGeneration"])
def test_untied_lm_head_under_a_spec_assuming_tying_fails_and_writes_nothing(cls, tmp_path):
    """A spec that can only hold a tied head (Flax without lm_head) says so with `assume: {equal: ...}`:
    an untied checkpoint (T5 v1.1 / BART with tie_word_embeddings=False, saved by save_pretrained)
    fails naming lm_head.weight and the embedding, instead of converting with the head lost."""
    import yaml

    v = _variant(cls, **(V11 if cls.startswith("T5") else UNTIED))
    shared = "shared.weight" if v.family == "t5" else "model.shared.weight"
    raw = yaml.safe_load((MAPPINGS / f"{v.family}-pt-to-flax.yaml").read_text())
    rules = [r for r in raw["rules"] if "lm_head.weight" not in str(r)]
    raw["rules"] = [{"drop": {"from": "lm_head.weight", "assume": {"equal": shared}}}, *rules]
    pt = _pt_model(v)
    pt.save_pretrained(tmp_path / "pt", safe_serialization=True)
    out = tmp_path / "flax_model.msgpack"
    with pytest.raises(statemap.StatemapError) as e:
        statemap.convert(raw, tmp_path / "pt" / "model.safetensors", out)
    msg = str(e.value)
    assert "lm_head.weight" in msg and shared in msg and "\n" not in msg, msg
    assert not out.exists()
    # the catalog spec maps the same file, head included
    statemap.convert(f"{v.family}-pt-to-flax", tmp_path / "pt" / "model.safetensors", out)
    assert bits(_read_msgpack(out)["lm_head.kernel"]) == bits(pt.lm_head.weight.detach().T.contiguous())


def _dedupe(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Tied tensors as separate equal copies (what a saver that writes every key produces)."""
    return {k: t.clone() for k, t in sd.items()}


# -- details and negative checks ----------------------------------------------------------------------

SPECS = [f"{f}-{d}" for f in ("t5", "bart", "clip", "vit") for d in ("pt-to-flax", "flax-to-pt")]


@pytest.mark.parametrize("name", SPECS)
def test_no_unverified_optional_drop(name):
    """A drop in these specs is either verified (assume: / when:) or of a constant buffer (position_ids)."""
    for rule in statemap.load_spec(name).rules:
        if rule.op == "drop" and rule.optional:
            assert rule.assume or rule.when or str(rule.sources[0]).endswith("position_ids"), rule.label


MAPPINGS = Path(statemap.__file__).resolve().parent.parent / "mappings"


def test_separate_equal_copies_of_tied_weights_map_like_the_file(tmp_path):
    """A checkpoint with every tied name as its own (equal) tensor: embed_tokens are dropped after a
    byte comparison; the untie-able lm_head becomes lm_head.kernel (an extra key a tied Flax model ignores)."""
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    v = _variant("T5ForConditionalGeneration")
    sd = _pt_model(v).state_dict()
    save_file({k: t.contiguous() for k, t in _dedupe(sd).items()}, tmp_path / "all.safetensors")
    new, report = statemap.map_state_dict("t5-pt-to-flax", statemap.load_state_dict(tmp_path / "all.safetensors"))
    assert set(report.dropped) == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert bits(new["lm_head.kernel"]) == bits(sd["lm_head.weight"].T.contiguous())


def test_flax_to_pt_ties_one_storage_in_a_pt_file(tmp_path):
    """bart-flax-to-pt into a .pt file: the four tied names are one storage, as in the PyTorch model."""
    import torch

    v = _variant("BartForConditionalGeneration")
    _need_flax()
    model = _classes(v)[1](_config(v), _do_init=False)
    shapes = {k: tuple(x.shape) for k, x in flat(model.params_shape_tree).items()}
    src = tmp_path / "flax" / "flax_model.msgpack"
    model.save_pretrained(src.parent, params=unflat(_random_params(shapes)))
    report = statemap.convert("bart-flax-to-pt", src, tmp_path / "bart.pt")
    tied = ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"]
    assert [sorted(g) for g in report.tied] == [sorted(tied)]
    sd = torch.load(tmp_path / "bart.pt", weights_only=True)
    assert len({sd[k].untyped_storage().data_ptr() for k in tied}) == 1


def test_t5_lm_head_var_wrong_setting_is_loud(tmp_path):
    """FlaxT5Model and a tied FlaxT5ForConditionalGeneration hold the same params; var lm_head picks the
    target. The wrong setting fails a strict load naming lm_head.weight, both ways (never silent)."""
    import torch

    _need_flax()
    v = _variant("T5Model")
    model = _classes(v)[1](_config(v), _do_init=False)
    params = _random_params({k: tuple(x.shape) for k, x in flat(model.params_shape_tree).items()})
    with_head, _ = statemap.map_state_dict("t5-flax-to-pt", params)  # default lm_head=1
    with pytest.raises(RuntimeError, match="Unexpected key.*lm_head.weight"):
        _classes(v)[0](_config(v)).load_state_dict({k: np_to_torch(x) for k, x in with_head.items()}, strict=True)
    without, _ = statemap.map_state_dict("t5-flax-to-pt", params, vars={"lm_head": 0})
    cg = _variant("T5ForConditionalGeneration")
    with pytest.raises(RuntimeError, match="Missing key.*lm_head.weight"):
        _classes(cg)[0](_config(cg)).load_state_dict({k: np_to_torch(x) for k, x in without.items()}, strict=True)
    assert set(with_head) - set(without) == {"lm_head.weight"}
    assert torch.equal(np_to_torch(with_head["lm_head.weight"]), np_to_torch(with_head["shared.weight"]))


def test_negative_checks(tmp_path):
    """The comparisons can fail: H and W swapped in the conv permute (ViT), a square q kernel left
    untransposed (T5): the anchor comparison names the key, and the outputs move by > 1e-3."""
    import yaml
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    _need_flax()
    v = _variant("ViTForImageClassification")
    model = _classes(v)[1](_config(v), _do_init=False)
    params = _random_params({k: tuple(x.shape) for k, x in flat(model.params_shape_tree).items()})
    raw = yaml.safe_load((MAPPINGS / "vit-flax-to-pt.yaml").read_text())
    for rule in raw["rules"]:
        if "permute" in rule:
            rule["permute"]["dims"] = [3, 2, 1, 0]
    wrong, _ = statemap.map_state_dict(raw, params)
    anchor = _classes(v)[0](_config(v)).eval()
    load_flax_weights_in_pytorch_model(anchor, unflat(params))
    assert bitwise_diff(wrong, anchor.state_dict()) == ["differs vit.embeddings.patch_embeddings.projection.weight"]
    pt = _classes(v)[0](_config(v)).eval()
    pt.load_state_dict({k: np_to_torch(x) for k, x in wrong.items()}, strict=True)
    assert _max_diff(_run_pt(v, pt), _run_flax(v, model, params)) > 1e-3

    v = _variant("T5ForConditionalGeneration")
    pt = _pt_model(v)
    new, _ = statemap.map_state_dict("t5-pt-to-flax", pt.state_dict())
    want, _ = anchor_pt_to_flax(pt.state_dict(), _classes(v)[1](_config(v), _do_init=False))
    q = "encoder.block.0.layer.0.SelfAttention.q.kernel"
    new[q] = new[q].T.contiguous()
    assert bitwise_diff(new, want) == [f"differs {q}"]
    back, _ = statemap.map_state_dict("t5-flax-to-pt", new)
    wrong = _classes(v)[0](_config(v)).eval()
    wrong.load_state_dict(back, strict=True)
    assert _max_diff(_run_pt(v, wrong), _run_pt(v, pt)) > 1e-3


def np_to_torch(x: Any) -> Any:
    import torch

    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


# -- streaming fixtures: the native source file of every spec ------------------------------------------
# untied heads and mBART's layer_norm, so the streamed path runs the conditional rules too
STREAMING_VARIANTS = {
    "t5": V("T5ForConditionalGeneration", "s", **V11),
    "bart": V("MBartForConditionalGeneration", "m", **UNTIED),
    "clip": V("CLIPModel", "s"),
    "vit": V("ViTForImageClassification", "s"),
}


def _streaming_pt(family: str):
    def fn(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
        pytest.importorskip("transformers")
        _pt_model(STREAMING_VARIANTS[family]).save_pretrained(tmp_path / "pt", safe_serialization=True)
        return tmp_path / "pt" / "model.safetensors", {}

    return fn


def _streaming_flax(family: str):
    def fn(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
        _need_flax()
        v = STREAMING_VARIANTS[family]
        model = _classes(v)[1](_config(v), _do_init=False)
        params = _random_params({k: tuple(x.shape) for k, x in flat(model.params_shape_tree).items()})
        model.save_pretrained(tmp_path / "flax", params=unflat(params))
        return tmp_path / "flax" / "flax_model.msgpack", {}

    return fn


STREAMING_FIXTURES = {
    **{f"{f}-pt-to-flax": _streaming_pt(f) for f in STREAMING_VARIANTS},
    **{f"{f}-flax-to-pt": _streaming_flax(f) for f in STREAMING_VARIANTS},
}
