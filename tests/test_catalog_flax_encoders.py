"""The `flax_encoders` family: Hugging Face PyTorch <-> Flax for BERT, ALBERT, XLM-R, RoBERTa, GPT-2.

A variant MATRIX, generated from the list ``HEADS`` x ``SIZES`` x tie (adding a variant is one
line): every task head transformers 4.57.6 has in both frameworks (bare model, MLM / LM head,
sequence classification, token classification, question answering; GPT-2: bare model and LM head,
plus the PyTorch-only GPT2ForSequenceClassification), two tiny sizes, and for the heads with an
output projection tied to the word embeddings both ``tie_word_embeddings=True`` and ``False``.

Per variant, with the real transformers PyTorch and Flax classes (nothing committed; every weight
perturbed so zero biases / unit LayerNorms / tied copies cannot hide):

- PT -> Flax: statemap's output, from BOTH inputs users have (``save_pretrained`` safetensors, where
  tied copies are left out, and ``state_dict()`` in memory, where tied tensors are one object), is
  BITWISE equal to transformers' ``convert_pytorch_state_dict_to_flax`` on the Flax model's param
  keys, and has exactly those keys (LM heads: also from ``torch.save(state_dict())``, one storage
  per tie); so is the ``*-flax-to-pt`` spec run in reverse (derived by ``statemap invert`` from
  its declared inverses). The anchor's extra keys (it also returns keys the Flax model has no
  parameter for, which ``from_pretrained`` discards with a warning) must be exactly the tied
  decoder names (see tests/flax_variants.py). Flax outputs with statemap's params vs the
  PyTorch outputs: max abs diff <= 1e-4 (measured <= 1.2e-6).
- Flax -> PT: the source is a native Flax file (``FlaxXxx.save_pretrained(params=...)``,
  flax_model.msgpack) holding the anchor's params (one Flax run per variant serves both
  directions: jax's eager forward is the slow part of this module); statemap's
  output (from the file and from the flat params in memory) is BITWISE equal to the state_dict()
  of a PyTorch model ``load_flax_weights_in_pytorch_model`` filled, key set included; it loads with
  ``load_state_dict(strict=True)`` and its outputs match the Flax model's (<= 1e-4). Flax -> PT
  (``tied="dedupe"``) -> Flax is bitwise.
- PT -> Flax -> PT is bitwise on the full ``state_dict()`` (tied names included); for the
  PyTorch-only GPT2ForSequenceClassification also against the converter's full output.

Negative checks: an untied head under a spec that ASSUMES tying fails naming both keys and writes
nothing; swapping a LayerNorm's scale and bias moves the outputs past the tolerance; GPT-2's Conv1D
kernels must be transposed.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flax_variants import (
    anchor_flax_to_pt,
    anchor_pt_to_flax,
    bits,
    bitwise_diff,
    flat,
    flax_model_and_shapes,
    flax_outputs,
    max_diff,
    perturbed_pt_model,
    pt_outputs,
    unflat,
)

import statemap

TOL = 1e-4
pytestmark = pytest.mark.flax


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # load_flax_weights_in_pytorch_model logs per call


# --------------------------------------------------------------------------------------------
# the matrix: one line per head, one line per size

# (spec family, PyTorch class, Flax class or None, the output projection can be tied to the embeddings)
HEADS: list[tuple[str, str, str | None, bool]] = [
    ("bert", "BertModel", "FlaxBertModel", False),
    ("bert", "BertForMaskedLM", "FlaxBertForMaskedLM", True),
    ("bert", "BertForSequenceClassification", "FlaxBertForSequenceClassification", False),
    ("bert", "BertForTokenClassification", "FlaxBertForTokenClassification", False),
    ("bert", "BertForQuestionAnswering", "FlaxBertForQuestionAnswering", False),
    ("albert", "AlbertModel", "FlaxAlbertModel", False),
    ("albert", "AlbertForMaskedLM", "FlaxAlbertForMaskedLM", True),
    ("albert", "AlbertForSequenceClassification", "FlaxAlbertForSequenceClassification", False),
    ("albert", "AlbertForTokenClassification", "FlaxAlbertForTokenClassification", False),
    ("albert", "AlbertForQuestionAnswering", "FlaxAlbertForQuestionAnswering", False),
    ("xlmr", "XLMRobertaModel", "FlaxXLMRobertaModel", False),
    ("xlmr", "XLMRobertaForMaskedLM", "FlaxXLMRobertaForMaskedLM", True),
    ("xlmr", "XLMRobertaForSequenceClassification", "FlaxXLMRobertaForSequenceClassification", False),
    ("xlmr", "XLMRobertaForTokenClassification", "FlaxXLMRobertaForTokenClassification", False),
    ("xlmr", "XLMRobertaForQuestionAnswering", "FlaxXLMRobertaForQuestionAnswering", False),
    ("xlmr", "RobertaModel", "FlaxRobertaModel", False),  # RoBERTa: the xlmr-* specs (same layout)
    ("xlmr", "RobertaForMaskedLM", "FlaxRobertaForMaskedLM", True),
    ("xlmr", "RobertaForSequenceClassification", "FlaxRobertaForSequenceClassification", False),
    ("xlmr", "RobertaForTokenClassification", "FlaxRobertaForTokenClassification", False),
    ("xlmr", "RobertaForQuestionAnswering", "FlaxRobertaForQuestionAnswering", False),
    ("gpt2", "GPT2Model", "FlaxGPT2Model", False),
    ("gpt2", "GPT2LMHeadModel", "FlaxGPT2LMHeadModel", True),
    ("gpt2", "GPT2ForSequenceClassification", None, False),  # no Flax class in transformers 4.57.6
]

# tiny sizes: they differ in layers, hidden, heads, intermediate and vocab
SIZES: dict[str, dict[str, int]] = {
    "s1": dict(hidden=32, layers=2, heads=4, inner=37, vocab=99),
    "s2": dict(hidden=24, layers=1, heads=2, inner=20, vocab=67),
}


@dataclass(frozen=True)
class Variant:
    family: str  # the catalog specs used: {family}-pt-to-flax / {family}-flax-to-pt
    pt_cls: str
    flax_cls: str | None
    size: str
    tied: bool
    lm: bool = field(default=False)  # has an output projection tied (or not) to the embeddings

    @property
    def id(self) -> str:
        tie = ("-tied" if self.tied else "-untied") if self.lm else ""
        return f"{self.pt_cls}-{self.size}{tie}"

    def config(self) -> Any:
        return make_config(self.pt_cls, self.size, self.tied)


VARIANTS = [
    Variant(fam, pt, fx, size, tied, lm)
    for fam, pt, fx, lm in HEADS
    for size in SIZES
    for tied in ((True, False) if lm else (True,))
]
FLAX_VARIANTS = [v for v in VARIANTS if v.flax_cls is not None]


def make_config(pt_cls: str, size: str, tied: bool = True) -> Any:
    import transformers as T

    s = SIZES[size]
    labels = 2 if pt_cls.endswith("QuestionAnswering") else 3  # QA: start/end
    common: dict[str, Any] = dict(vocab_size=s["vocab"], tie_word_embeddings=tied, num_labels=labels)
    if pt_cls.startswith("GPT2"):
        return T.GPT2Config(
            n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_inner=s["inner"], n_positions=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, **common,
        )  # fmt: skip
    enc = dict(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=s["inner"], **common,
    )  # fmt: skip
    if pt_cls.startswith("Albert"):
        # embedding_size != hidden (embedding_hidden_mapping_in is not square); s1: 2 layer groups,
        # s2: 1 group of 2 inner layers, run twice (transformers indexes head_mask by inner layer,
        # so inner_group_num must not exceed num_hidden_layers)
        groups = dict(num_hidden_groups=2, inner_group_num=1) if size == "s1" else dict(num_hidden_groups=1, inner_group_num=2)
        enc["num_hidden_layers"] = max(enc["num_hidden_layers"], groups["inner_group_num"])
        return T.AlbertConfig(
            max_position_embeddings=64, embedding_size=s["hidden"] // 2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **groups, **enc,
        )  # fmt: skip
    if pt_cls.startswith(("XLMRoberta", "Roberta")):
        # XLM-R facts: max_position_embeddings = max_positions + 2, type_vocab_size 1, eps 1e-5, pad 1
        cfg = T.XLMRobertaConfig if pt_cls.startswith("XLM") else T.RobertaConfig
        return cfg(
            max_position_embeddings=64 + 2, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, **enc,
        )  # fmt: skip
    return T.BertConfig(max_position_embeddings=64, **enc)


def model_inputs(v: Variant) -> tuple[np.ndarray, np.ndarray | None]:
    """Fixed ids (2 x 12, clear of special ids); the encoders' second row padded with a mask."""
    vocab = SIZES[v.size]["vocab"]
    ids = (np.arange(24, dtype=np.int64).reshape(2, 12) * 37 + 5) % (vocab - 3) + 3
    if v.family == "gpt2":
        return ids, None
    mask = np.ones((2, 12), dtype=np.int64)
    mask[1, 9:] = 0
    ids[mask == 0] = 1 if v.family == "xlmr" else 0
    return ids, mask


# --------------------------------------------------------------------------------------------
# one build per variant, shared by the tests (module scope)


@dataclass
class Built:
    v: Variant
    pt: Any  # the perturbed PyTorch model
    st_file: Path  # its save_pretrained model.safetensors
    pt_out: dict[str, np.ndarray]
    flax: Any = None  # Flax model built with _do_init=False (None: no Flax class)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    anchor: dict[str, np.ndarray] = field(default_factory=dict)  # transformers PT -> Flax on the Flax keys
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # keys the anchor adds beyond them
    _flax_out: dict[str, np.ndarray] | None = None

    def flax_out(self) -> dict[str, np.ndarray]:
        """The Flax model's outputs with the anchor's params (one eager jax run per variant)."""
        if self._flax_out is None:
            self._flax_out = flax_outputs(self.flax, self.anchor, *model_inputs(self.v))
        return self._flax_out


DIFFS: dict[str, float] = {}  # "variant direction" -> max abs output diff (printed at the end)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[Variant, Built] = {}

    def get(v: Variant) -> Built:
        if v not in cache:
            pt = perturbed_pt_model(v.pt_cls, v.config())
            d = tmp_path_factory.mktemp(v.id)
            pt.save_pretrained(d, safe_serialization=True)
            b = Built(v, pt, d / "model.safetensors", pt_outputs(pt, *model_inputs(v)))
            if v.flax_cls is not None:
                b.flax, b.shapes = flax_model_and_shapes(v.flax_cls, v.config())
                b.anchor, b.extra = anchor_pt_to_flax(pt.state_dict(), b.flax)
            cache[v] = b
        return cache[v]

    return get


@pytest.fixture(scope="module", autouse=True)
def _print_diffs():
    t0 = time.perf_counter()
    yield
    for k in sorted(DIFFS):
        print(f"{k}: max abs diff {DIFFS[k]:.2g}")
    if DIFFS:
        print(f"max over {len(DIFFS)}: {max(DIFFS.values()):.2g}; module {time.perf_counter() - t0:.1f} s")


def _tied_names(sd: dict[str, Any]) -> set[str]:
    """Names in a state_dict() that are the same storage as an earlier name (tied copies)."""
    seen: set[int] = set()
    out = set()
    for k, t in sd.items():
        p = t.untyped_storage().data_ptr()
        if p in seen:
            out.add(k)
        seen.add(p)
    return out


def _read_flax(path: Path) -> dict[str, np.ndarray]:
    from flax.serialization import msgpack_restore

    return flat(msgpack_restore(path.read_bytes()))  # flax's own reader


# --------------------------------------------------------------------------------------------
# PyTorch -> Flax


@pytest.mark.parametrize("v", FLAX_VARIANTS, ids=lambda v: v.id)
def test_pt_to_flax_equals_transformers(tmp_path, built, v):
    b = built(v)
    spec = f"{v.family}-pt-to-flax"
    # the anchor's extra keys are exactly the tied copies (decoder / lm_head), renamed
    sd = b.pt.state_dict()
    tied = _tied_names(sd)
    assert {k.rsplit(".", 1)[0] for k in b.extra} == {k.rsplit(".", 1)[0] for k in tied}, (sorted(b.extra), sorted(tied))
    assert set(b.anchor) == set(b.shapes)

    # 1. the save_pretrained file
    out = tmp_path / "flax_model.msgpack"
    statemap.convert(spec, b.st_file, out)
    got = _read_flax(out)
    assert bitwise_diff(got, b.anchor) == []
    # 2. state_dict() in memory (tied tensors are one object there)
    mem, _ = statemap.map_state_dict(spec, sd)
    assert bitwise_diff(mem, b.anchor) == []
    if v.lm:
        # 3. torch.save(model.state_dict()): the file records the tie as one storage
        torch.save(sd, tmp_path / "model.pt")
        statemap.convert(spec, tmp_path / "model.pt", tmp_path / "from_pt.msgpack")
        assert bitwise_diff(_read_flax(tmp_path / "from_pt.msgpack"), b.anchor) == []
    # 4. the flax-to-pt spec run in reverse (derived by statemap invert from its declared inverses)
    statemap.convert(f"{v.family}-flax-to-pt", b.st_file, tmp_path / "reverse.msgpack", reverse=True)
    assert bitwise_diff(_read_flax(tmp_path / "reverse.msgpack"), b.anchor) == []

    if v.size == "s1":  # (once per class: each load traces the model again)
        # the real Flax loader takes the file, nothing newly initialized
        shutil.copy(b.st_file.parent / "config.json", tmp_path / "config.json")
        _, params = _flax_cls(v).from_pretrained(tmp_path, _do_init=False)
        assert bitwise_diff(flat(params), b.anchor) == []

    fo = b.flax_out()  # = the outputs with statemap's params: they are bitwise the anchor's (above)
    assert sorted(fo) == sorted(b.pt_out)
    diff = max(max_diff(fo[k], b.pt_out[k]) for k in fo)
    DIFFS[f"{v.id} pt->flax"] = diff
    assert diff <= TOL, diff


def _flax_cls(v: Variant) -> Any:
    import transformers

    return getattr(transformers, v.flax_cls)


# --------------------------------------------------------------------------------------------
# Flax -> PyTorch


@pytest.mark.parametrize("v", FLAX_VARIANTS, ids=lambda v: v.id)
def test_flax_to_pt_equals_transformers(tmp_path, built, v):
    b = built(v)
    spec = f"{v.family}-flax-to-pt"
    src = b.anchor
    # a native Flax file, written by Flax's save_pretrained
    b.flax.save_pretrained(tmp_path / "src", params=unflat(src))
    want = anchor_flax_to_pt(v.pt_cls, v.config(), unflat(src))

    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    statemap.convert(spec, tmp_path / "src" / "flax_model.msgpack", out)
    got = statemap.load_state_dict(out)
    assert bitwise_diff(got, want) == []
    mem, _ = statemap.map_state_dict(spec, src)  # flat numpy params in memory
    assert bitwise_diff(mem, want) == []

    model = _pt_cls(v)(v.config()).eval()
    model.load_state_dict(got, strict=True)
    po = pt_outputs(model, *model_inputs(v))
    fo = b.flax_out()
    diff = max(max_diff(po[k], fo[k]) for k in fo)
    DIFFS[f"{v.id} flax->pt"] = diff
    assert diff <= TOL, diff

    # Flax -> PT -> Flax is bitwise when the PyTorch file leaves tied copies out as save_pretrained
    # does (tied="dedupe"); with the default tied: clone a tied decoder reads back as untied
    statemap.convert(spec, tmp_path / "src" / "flax_model.msgpack", tmp_path / "dedupe.safetensors", tied="dedupe")
    statemap.convert(f"{v.family}-pt-to-flax", tmp_path / "dedupe.safetensors", tmp_path / "back.msgpack")
    assert bitwise_diff(_read_flax(tmp_path / "back.msgpack"), src) == []


def _pt_cls(v: Variant) -> Any:
    import transformers

    return getattr(transformers, v.pt_cls)


# --------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.id)
def test_pt_flax_pt_round_trip_is_bitwise(tmp_path, built, v):
    b = built(v)
    statemap.convert(f"{v.family}-pt-to-flax", b.st_file, tmp_path / "flax_model.msgpack")
    statemap.convert(f"{v.family}-flax-to-pt", tmp_path / "flax_model.msgpack", tmp_path / "back.safetensors")
    back = statemap.load_state_dict(tmp_path / "back.safetensors")
    sd = b.pt.state_dict()
    # every state_dict() key survives: tied copies come back from the tensor they are tied to
    assert bitwise_diff(back, sd) == []
    _pt_cls(v)(v.config()).load_state_dict(back, strict=True)
    if v.flax_cls is None:
        # no Flax class to load it: transformers' converter, given FlaxGPT2LMHeadModel's param tree,
        # still names and transposes every key (the backbone on the model's keys, score.weight ->
        # score.kernel transposed among its extra keys); statemap agrees bitwise on all of them
        fm, _ = flax_model_and_shapes("Flax" + v.pt_cls.replace("ForSequenceClassification", "LMHeadModel"), v.config())
        params, extra = anchor_pt_to_flax(sd, fm)
        assert sorted(extra) == ["score.kernel"]
        want = {**params, **extra}
        assert bitwise_diff(_read_flax(tmp_path / "flax_model.msgpack"), want) == []
        assert bitwise_diff(statemap.map_state_dict(f"{v.family}-pt-to-flax", sd)[0], want) == []
        statemap.convert(f"{v.family}-flax-to-pt", b.st_file, tmp_path / "reverse.msgpack", reverse=True)
        assert bitwise_diff(_read_flax(tmp_path / "reverse.msgpack"), want) == []


# --------------------------------------------------------------------------------------------
# the comparisons can fail


SWAP = {
    "bert": ("bert.encoder.layer.0.output.LayerNorm.scale", "bert.encoder.layer.0.output.LayerNorm.bias"),
    "albert": (
        "albert.encoder.albert_layer_groups.0.albert_layers.0.full_layer_layer_norm.scale",
        "albert.encoder.albert_layer_groups.0.albert_layers.0.full_layer_layer_norm.bias",
    ),
    "xlmr": ("roberta.encoder.layer.0.output.LayerNorm.scale", "roberta.encoder.layer.0.output.LayerNorm.bias"),
    "gpt2": ("transformer.h.0.ln_1.scale", "transformer.h.0.ln_1.bias"),
}
MLM = {
    "bert": "BertForMaskedLM",
    "albert": "AlbertForMaskedLM",
    "xlmr": "XLMRobertaForMaskedLM",
    "gpt2": "GPT2LMHeadModel",
}


def _mlm(family: str, tied: bool = True) -> Variant:
    return next(v for v in FLAX_VARIANTS if v.pt_cls == MLM[family] and v.size == "s1" and v.tied == tied)


@pytest.mark.parametrize("family", sorted(MLM))
def test_swapped_layernorm_scale_and_bias_change_the_outputs(built, family):
    v = _mlm(family)
    b = built(v)
    p = dict(b.anchor)
    a, c = SWAP[family]
    p[a], p[c] = p[c], p[a]
    diff = max_diff(flax_outputs(b.flax, p, *model_inputs(v))["logits"], b.pt_out["logits"])
    print(f"{family}: swapped scale/bias: max abs diff {diff:.3g}")
    assert diff > 1e-3, diff


@pytest.mark.parametrize("family", sorted(MLM))
def test_untied_head_dropped_as_tied_changes_the_outputs(built, family):
    """What the old optional tied drop did to an untied head: Flax then uses the embedding (or a
    random kernel); the logits move far past the tolerance, so the matrix would catch it."""
    v = _mlm(family, tied=False)
    b = built(v)
    head = next(k for k in b.anchor if k.endswith(("decoder.kernel", "lm_head.kernel")))
    p = dict(b.anchor)
    p[head] = np.random.default_rng(0).standard_normal(p[head].shape).astype(np.float32) * 0.02
    diff = max_diff(flax_outputs(b.flax, p, *model_inputs(v))["logits"], b.pt_out["logits"])
    print(f"{family}: untied head replaced: max abs diff {diff:.3g}")
    assert diff > 1e-3, diff


def test_gpt2_flax_conv1d_kernels_are_out_in(tmp_path, built):
    """HF's FlaxConv1D kernel is [out, in] (the transpose of PyTorch Conv1D's [in, out]): leaving the
    square c_proj kernels untransposed changes the logits, and the anchor transposes them too."""
    v = _mlm("gpt2")
    b = built(v)
    p = dict(b.anchor)
    for i in range(SIZES[v.size]["layers"]):
        k = f"transformer.h.{i}.attn.c_proj.kernel"
        assert bits(p[k]) == bits(b.pt.state_dict()[k.replace("kernel", "weight")].numpy().T)
        p[k] = p[k].T
    diff = max_diff(flax_outputs(b.flax, p, *model_inputs(v))["logits"], b.pt_out["logits"])
    print(f"gpt2: c_proj kernels left untransposed: max abs diff {diff:.3g}")
    assert diff > 1e-3, diff


# ASSUMED tying: an untied head fails loudly, nothing written

# family -> (the tied output projection, the embedding it is tied to)
TIED_PAIR = {
    "bert": ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    "albert": ("predictions.decoder.weight", "albert.embeddings.word_embeddings.weight"),
    "xlmr": ("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight"),
    "gpt2": ("lm_head.weight", "transformer.wte.weight"),
}


def _assume_tied_spec(family: str) -> dict[str, Any]:
    """The catalog spec with its conditional drop (when: tied_to) replaced by a drop that ASSUMES
    the tie: the form a spec takes when its target has no parameter for an untied head."""
    import yaml

    from statemap.catalog import find

    head, emb = TIED_PAIR[family]
    spec = yaml.safe_load(find(f"{family}-pt-to-flax").read_text(encoding="utf-8"))
    rules = [r for r in spec["rules"] if not ("drop" in r and isinstance(r["drop"], dict) and r["drop"].get("from") == head)]
    assert len(rules) == len(spec["rules"]) - 1
    rules.insert(1, {"drop": {"from": head, "optional": True, "assume": {"equal": emb}}})
    return {**spec, "name": f"{family}-assume-tied", "rules": rules}


@pytest.mark.parametrize("family", sorted(MLM))
def test_untied_head_under_a_spec_that_assumes_tying_fails(tmp_path, built, family):
    import re

    head, emb = TIED_PAIR[family]
    spec = _assume_tied_spec(family)
    b = built(_mlm(family, tied=False))
    out = tmp_path / "out" / "flax_model.msgpack"
    out.parent.mkdir()
    for run in (lambda: statemap.convert(spec, b.st_file, out), lambda: statemap.map_state_dict(spec, b.pt.state_dict())):
        with pytest.raises(statemap.StatemapError) as err:
            run()
        msg = str(err.value)
        assert re.search(re.escape(head), msg) and re.search(re.escape(emb), msg), msg
        assert "\n" not in msg.strip(), msg
    assert list(out.parent.iterdir()) == []  # nothing written, no temporary left
    # the same spec on the tied model: the assumption holds (one storage / left out) and the
    # output is the anchor's
    t = built(_mlm(family))
    mem, _ = statemap.map_state_dict(spec, t.pt.state_dict())
    assert bitwise_diff(mem, t.anchor) == []
    statemap.convert(spec, t.st_file, out)
    assert bitwise_diff(_read_flax(out), t.anchor) == []


@pytest.mark.parametrize("name", [f"{f}-{d}" for f in sorted(MLM) for d in ("pt-to-flax", "flax-to-pt")])
def test_no_weight_is_dropped_on_an_unchecked_assumption(name):
    """Every drop is either verified (when: tied_to / assume: equal) or a non-persistent buffer of
    older transformers versions (position_ids, token_type_ids, attn.bias, attn.masked_bias)."""
    import yaml

    from statemap.catalog import find

    drops = [r["drop"] for r in yaml.safe_load(find(name).read_text(encoding="utf-8"))["rules"] if "drop" in r]
    for d in drops:
        assert isinstance(d, dict) and (
            "when" in d or "assume" in d or d["from"].endswith(("_ids", ".attn.bias", ".attn.masked_bias"))
        ), d


# --------------------------------------------------------------------------------------------
# older transformers' buffers / layouts in a PyTorch state dict


@pytest.mark.parametrize("family", sorted(MLM))
def test_legacy_buffers_are_dropped(built, family):
    v = _mlm(family)
    b = built(v)
    sd = dict(b.pt.state_dict())
    if family == "gpt2":
        # the causal-mask buffers that older transformers versions saved
        for i in range(SIZES[v.size]["layers"]):
            sd[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    else:
        prefix = {"bert": "bert", "albert": "albert", "xlmr": "roberta"}[family]
        n_pos = v.config().max_position_embeddings
        sd[f"{prefix}.embeddings.position_ids"] = torch.arange(n_pos)[None]
        sd[f"{prefix}.embeddings.token_type_ids"] = torch.zeros(1, n_pos, dtype=torch.long)
    out, report = statemap.map_state_dict(f"{family}-pt-to-flax", sd)
    assert bitwise_diff(out, b.anchor) == []


# --------------------------------------------------------------------------------------------
# streaming fixtures (tests/test_streaming.py): the tied MLM / LM variants' native files


def _streaming_pt(fam: str):
    def make(tmp: Path):
        v = _mlm(fam)
        perturbed_pt_model(v.pt_cls, v.config()).save_pretrained(tmp / f"{fam}-pt", safe_serialization=True)
        return tmp / f"{fam}-pt" / "model.safetensors", {}

    return make


def _streaming_flax(fam: str):
    def make(tmp: Path):
        v = _mlm(fam)
        model = _flax_cls(v)(v.config(), seed=0)
        model.save_pretrained(tmp / f"{fam}-flax")
        return tmp / f"{fam}-flax" / "flax_model.msgpack", {}

    return make


STREAMING_FIXTURES = {
    **{f"{f}-pt-to-flax": _streaming_pt(f) for f in MLM},
    **{f"{f}-flax-to-pt": _streaming_flax(f) for f in MLM},
}
