"""The `flax_encoders` family: Hugging Face PyTorch <-> Flax for BERT, ALBERT, XLM-R and GPT-2.

Both sides are the real transformers 4.57.6 implementations (torch and jax/flax run here), so
nothing is committed: each source is built at test time from a tiny config (hidden 32, 2 layers,
4 heads, intermediate 37, vocab 99, 64 positions), every weight is perturbed (torch:
``p.add_(randn * 0.02)``; Flax: a tree_map adding numpy noise: Flax zero-inits the MLM bias and
LayerNorm to 1/0), and saved in its NATIVE container with the library's own save path:

- PyTorch: ``XxxForMaskedLM.save_pretrained(dir, safe_serialization=True)`` -> model.safetensors
  (the tied decoder / lm_head left out, as save_pretrained does) + config.json;
- Flax: ``FlaxXxxForMaskedLM.save_pretrained(dir)`` -> flax_model.msgpack + config.json.

Per spec: ``statemap.convert(spec, native source file, out/<native target file name>)``; a Flax
target is loaded with the real ``FlaxXxx.from_pretrained(out, _do_init=False)`` (flax.serialization:
proves the file is a valid Flax file) after its key set is checked against a fresh model's param
tree (so no weight is silently re-initialized); a PyTorch target with
``load_state_dict(..., strict=True)`` (and ``from_pretrained``).
Outputs (MLM / LM logits on fixed ids, with padding for the encoders) are compared with the
source model's: max abs diff <= 1e-5 in fp32. PT -> Flax -> PT and Flax -> PT -> Flax are bitwise.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import statemap
from statemap.load import open_checkpoint

TOL = 1e-5
pytestmark = pytest.mark.flax

# fixed inputs: 2 x 12 ids in [3, 99) (clear of pad/bos/eos ids); row 1 is padded for the encoders
IDS = (np.arange(24, dtype=np.int64).reshape(2, 12) * 37 + 5) % 96 + 3
MASK = np.ones((2, 12), dtype=np.int64)
MASK[1, 9:] = 0


@dataclass(frozen=True)
class Family:
    name: str
    pt_cls: str
    flax_cls: str
    config: Callable[[], Any]
    pad_id: int | None  # None: no padding / attention mask (GPT-2)
    # two same-shaped params (a LayerNorm's scale and bias), swapped in the negative check
    swap: tuple[str, str]


def _bert_config():
    from transformers import BertConfig

    return BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        max_position_embeddings=64,
    )


def _albert_config():
    from transformers import AlbertConfig

    # embedding_size != hidden_size (the embedding_hidden_mapping_in projection is not square);
    # two layer groups, so albert_layer_groups.{0,1} both map
    return AlbertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        max_position_embeddings=64,
        embedding_size=16,
        num_hidden_groups=2,
        inner_group_num=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _xlmr_config():
    from transformers import XLMRobertaConfig

    # XLM-R facts: max_position_embeddings = max_positions + 2, type_vocab_size 1, eps 1e-5, pad 1
    return XLMRobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        max_position_embeddings=64 + 2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=37, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=0)


FAMILIES = {
    "bert": Family(
        "bert",
        "BertForMaskedLM",
        "FlaxBertForMaskedLM",
        _bert_config,
        0,
        ("bert.encoder.layer.0.output.LayerNorm.scale", "bert.encoder.layer.0.output.LayerNorm.bias"),
    ),
    "albert": Family(
        "albert",
        "AlbertForMaskedLM",
        "FlaxAlbertForMaskedLM",
        _albert_config,
        0,
        (
            "albert.encoder.albert_layer_groups.0.albert_layers.0.full_layer_layer_norm.scale",
            "albert.encoder.albert_layer_groups.0.albert_layers.0.full_layer_layer_norm.bias",
        ),
    ),
    "xlmr": Family(
        "xlmr",
        "XLMRobertaForMaskedLM",
        "FlaxXLMRobertaForMaskedLM",
        _xlmr_config,
        1,
        ("roberta.encoder.layer.0.output.LayerNorm.scale", "roberta.encoder.layer.0.output.LayerNorm.bias"),
    ),
    "gpt2": Family(
        "gpt2",
        "GPT2LMHeadModel",
        "FlaxGPT2LMHeadModel",
        _gpt2_config,
        None,
        ("transformer.h.0.ln_1.scale", "transformer.h.0.ln_1.bias"),
    ),
}
NAMES = sorted(FAMILIES)


# --------------------------------------------------------------------------------------------
# building the sources with the real libraries


def _cls(name: str):
    import transformers

    return getattr(transformers, name)


def _inputs(fam: Family) -> tuple[np.ndarray, np.ndarray | None]:
    if fam.pad_id is None:
        return IDS, None
    ids = IDS.copy()
    ids[MASK == 0] = fam.pad_id
    return ids, MASK


def pt_logits(model, fam: Family) -> np.ndarray:
    ids, mask = _inputs(fam)
    kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        return model(torch.from_numpy(ids), **kw).logits.numpy()


def flax_logits(model, fam: Family, params: Any = None) -> np.ndarray:
    ids, mask = _inputs(fam)
    kw = {} if mask is None else {"attention_mask": mask}
    if params is not None:
        kw["params"] = params
    return np.asarray(model(ids, **kw).logits)


def make_pt_source(fam: Family, out_dir: Path):
    """A perturbed real PyTorch model saved by save_pretrained (safetensors); returns (model, file)."""
    torch.manual_seed(0)
    model = _cls(fam.pt_cls)(fam.config()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model, out_dir / "model.safetensors"


def make_flax_source(fam: Family, out_dir: Path):
    """A perturbed real Flax model saved by save_pretrained (flax_model.msgpack); returns (model, file)."""
    import jax

    model = _cls(fam.flax_cls)(fam.config(), seed=0)
    rng = np.random.default_rng(2)
    model.params = jax.tree_util.tree_map(lambda p: p + (rng.standard_normal(p.shape) * 0.02).astype(p.dtype), model.params)
    model.save_pretrained(out_dir)
    return model, out_dir / "flax_model.msgpack"


def _streaming_pt(fam: str):
    return lambda tmp: (make_pt_source(FAMILIES[fam], tmp / f"{fam}-pt")[1], {})


def _streaming_flax(fam: str):
    return lambda tmp: (make_flax_source(FAMILIES[fam], tmp / f"{fam}-flax")[1], {})


STREAMING_FIXTURES = {
    **{f"{f}-pt-to-flax": _streaming_pt(f) for f in FAMILIES},
    **{f"{f}-flax-to-pt": _streaming_flax(f) for f in FAMILIES},
}


# module-scoped sources: each real model is built, perturbed, saved and run once


@pytest.fixture(scope="module")
def pt_source(tmp_path_factory):
    cache: dict[str, tuple[Any, Path, np.ndarray]] = {}

    def get(fam: Family):
        if fam.name not in cache:
            model, path = make_pt_source(fam, tmp_path_factory.mktemp(f"{fam.name}-pt"))
            cache[fam.name] = (model, path, pt_logits(model, fam))
        return cache[fam.name]

    return get


@pytest.fixture(scope="module")
def flax_source(tmp_path_factory):
    cache: dict[str, tuple[Any, Path, np.ndarray]] = {}

    def get(fam: Family):
        if fam.name not in cache:
            model, path = make_flax_source(fam, tmp_path_factory.mktemp(f"{fam.name}-flax"))
            cache[fam.name] = (model, path, flax_logits(model, fam))
        return cache[fam.name]

    return get


def _flat(tree: Any) -> dict[str, Any]:
    from flax.traverse_util import flatten_dict

    return flatten_dict(tree, sep=".")


def _fresh_flax_shapes(fam: Family) -> dict[str, tuple[int, ...]]:
    """The param tree a fresh Flax model has (jax.eval_shape: no weights computed)."""
    model = _cls(fam.flax_cls)(fam.config(), _do_init=False)
    return {k: tuple(v.shape) for k, v in _flat(model.params_shape_tree).items()}


def _to_flax(fam: Family, src: Path, out_dir: Path):
    """Convert to out_dir/flax_model.msgpack, check its keys, load it with the real Flax loader."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "flax_model.msgpack"
    statemap.convert(f"{fam.name}-pt-to-flax", src, out)
    shutil.copy(src.parent / "config.json", out_dir / "config.json")
    with open_checkpoint(out) as ck:
        written = {k: tuple(m.shape) for k, m in ck.metas.items()}
        assert {m.dtype for m in ck.metas.values()} == {"float32"}
    fresh = _fresh_flax_shapes(fam)
    assert written == fresh, (sorted(set(written) ^ set(fresh)), [k for k in written if written[k] != fresh.get(k)])
    # the real loader (flax.serialization.from_bytes + transformers' shape checks); _do_init=False
    # returns the params as read instead of filling missing ones with fresh random weights
    # (and skips a slow random init)
    model, params = _cls(fam.flax_cls).from_pretrained(out_dir, _do_init=False)
    assert {k: tuple(v.shape) for k, v in _flat(params).items()} == written
    return model, params


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _bits(t: Any) -> bytes:
    a = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return a.dtype.str.encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes()


# --------------------------------------------------------------------------------------------
# PyTorch -> Flax


@pytest.mark.parametrize("name", NAMES)
def test_pt_to_flax_logits_match(tmp_path, pt_source, name):
    fam = FAMILIES[name]
    _, src, ref = pt_source(fam)
    model, params = _to_flax(fam, src, tmp_path / "out")
    got = flax_logits(model, fam, params)
    diff = _max_diff(got, ref)
    print(f"{name}-pt-to-flax: max abs diff {diff:.3g}")
    assert diff <= TOL, diff


@pytest.mark.parametrize("name", NAMES)
def test_pt_flax_pt_round_trip_is_bitwise(tmp_path, pt_source, name):
    fam = FAMILIES[name]
    model, src, _ = pt_source(fam)
    statemap.convert(f"{name}-pt-to-flax", src, tmp_path / "flax_model.msgpack")
    statemap.convert(f"{name}-flax-to-pt", tmp_path / "flax_model.msgpack", tmp_path / "back.safetensors")
    back = statemap.load_state_dict(tmp_path / "back.safetensors")
    sd = model.state_dict()
    # every state_dict() key survives: the tied decoder / lm_head come back from the embedding
    # (and bias) they are tied to; no buffer is persistent in 4.57.6
    assert list(back) == list(sd) or sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert _bits(back[k]) == _bits(v), k
    fresh = _cls(fam.pt_cls)(fam.config())
    fresh.load_state_dict(back, strict=True)


# --------------------------------------------------------------------------------------------
# Flax -> PyTorch


@pytest.mark.parametrize("name", NAMES)
def test_flax_to_pt_logits_match(tmp_path, flax_source, name):
    fam = FAMILIES[name]
    _, src, ref = flax_source(fam)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "model.safetensors"
    statemap.convert(f"{name}-flax-to-pt", src, out)
    config = _cls(fam.pt_cls).config_class.from_pretrained(src.parent)
    model = _cls(fam.pt_cls)(config).eval()
    model.load_state_dict(statemap.load_state_dict(out), strict=True)
    diff = _max_diff(pt_logits(model, fam), ref)
    print(f"{name}-flax-to-pt: max abs diff {diff:.3g}")
    assert diff <= TOL, diff
    # transformers' own loader takes the file too (config.json copied next to it)
    shutil.copy(src.parent / "config.json", out.parent / "config.json")
    again = _cls(fam.pt_cls).from_pretrained(out.parent).eval()
    assert _max_diff(pt_logits(again, fam), ref) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_flax_pt_flax_round_trip_is_bitwise(tmp_path, flax_source, name):
    from flax.serialization import msgpack_restore

    fam = FAMILIES[name]
    model, src, _ = flax_source(fam)
    statemap.convert(f"{name}-flax-to-pt", src, tmp_path / "model.safetensors")
    statemap.convert(f"{name}-pt-to-flax", tmp_path / "model.safetensors", tmp_path / "flax_model.msgpack")
    back = _flat(msgpack_restore((tmp_path / "flax_model.msgpack").read_bytes()))  # flax's own reader
    orig = _flat(model.params)
    assert sorted(back) == sorted(orig)  # every Flax param survives
    for k, v in orig.items():
        assert _bits(back[k]) == _bits(v), k


# --------------------------------------------------------------------------------------------
# the comparison can fail


@pytest.mark.parametrize("name", NAMES)
def test_swapped_layernorm_scale_and_bias_change_the_logits(tmp_path, pt_source, name):
    """Swapping a LayerNorm's scale and bias (a plausible weight/bias mix-up) in the converted
    params moves the logits far past TOL."""
    from flax.traverse_util import unflatten_dict

    fam = FAMILIES[name]
    _, src, ref = pt_source(fam)
    model, params = _to_flax(fam, src, tmp_path / "out")
    flat = _flat(params)
    a, b = fam.swap
    flat[a], flat[b] = flat[b], flat[a]
    diff = _max_diff(flax_logits(model, fam, unflatten_dict(flat, sep=".")), ref)
    print(f"{name}: swapped {a.rsplit('.', 2)[-2]} scale/bias: max abs diff {diff:.3g}")
    assert diff > 1e-3, diff


def test_gpt2_flax_conv1d_kernels_are_out_in(tmp_path, pt_source):
    """HF's FlaxConv1D kernel is [out, in] (the transpose of PyTorch Conv1D's [in, out]): a spec
    that only renamed weight -> kernel writes a file the real loader refuses (c_attn, c_fc), and
    leaving the square c_proj kernels untransposed changes the logits."""
    fam = FAMILIES["gpt2"]
    _, src, ref = pt_source(fam)
    raw = _raw_rules("gpt2-pt-to-flax")
    rules = [{"rename": {"from": r["transpose"]["from"], "to": r["transpose"]["to"]}} if "transpose" in r else r for r in raw]
    assert rules != raw
    out_dir = tmp_path / "no-transpose"
    out_dir.mkdir()
    statemap.convert(
        {"name": "gpt2-no-transpose", "version": 1, "strict": True, "rules": rules}, src, out_dir / "flax_model.msgpack"
    )
    shutil.copy(src.parent / "config.json", out_dir / "config.json")
    with pytest.raises(ValueError, match="incompatible with the model shape"):
        _cls(fam.flax_cls).from_pretrained(out_dir, _do_init=False)

    model, params = _to_flax(fam, src, tmp_path / "ok")
    from flax.traverse_util import unflatten_dict

    flat = _flat(params)
    for i in range(2):
        k = f"transformer.h.{i}.attn.c_proj.kernel"
        flat[k] = flat[k].T
    diff = _max_diff(flax_logits(model, fam, unflatten_dict(flat, sep=".")), ref)
    print(f"gpt2: c_proj kernels left untransposed: max abs diff {diff:.3g}")
    assert diff > 1e-3, diff


def _raw_rules(name: str) -> list[dict[str, Any]]:
    import yaml

    from statemap.catalog import find

    return yaml.safe_load(find(name).read_text(encoding="utf-8"))["rules"]


# --------------------------------------------------------------------------------------------
# other PyTorch inputs: state_dict() in memory (tied names present) and older transformers'
# buffers / layouts


@pytest.mark.parametrize("name", NAMES)
def test_pt_state_dict_with_tied_names_and_legacy_buffers_maps(pt_source, name):
    fam = FAMILIES[name]
    model, _, _ = pt_source(fam)
    sd = dict(model.state_dict())  # has the tied decoder / lm_head, unlike model.safetensors
    if name == "gpt2":
        # the causal-mask buffers that older transformers versions saved
        for i in range(2):
            sd[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        n_tied = 1
    else:
        prefix = {"bert": "bert", "albert": "albert", "xlmr": "roberta"}[name]
        n_pos = fam.config().max_position_embeddings
        sd[f"{prefix}.embeddings.position_ids"] = torch.arange(n_pos)[None]
        sd[f"{prefix}.embeddings.token_type_ids"] = torch.zeros(1, n_pos, dtype=torch.long)
        n_tied = 2
    out, report = statemap.map_state_dict(f"{name}-pt-to-flax", sd)
    assert {k: tuple(v.shape) for k, v in out.items()} == _fresh_flax_shapes(fam)
    assert len(report.dropped) == 2 + n_tied + (2 if name == "gpt2" else 0), report.dropped  # buffers + tied
    if name == "gpt2":
        # the GPT2Model layout of the hub's original pytorch_model.bin: no `transformer.` prefix
        # and no lm_head
        legacy = {k[len("transformer.") :]: v for k, v in sd.items() if k.startswith("transformer.")}
        out2, _ = statemap.map_state_dict("gpt2-pt-to-flax", legacy)
        assert sorted(out2) == sorted(out)
        assert all(_bits(out2[k]) == _bits(out[k]) for k in out)
