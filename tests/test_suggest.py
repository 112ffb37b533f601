"""statemap suggest: unit tests, and an accuracy measurement on real layouts.

Accuracy: for each family, the SOURCE is a real checkpoint written by the real library
(timm, nanoGPT, fairseq, OpenAI CLIP, the DeltaLM example), the TARGET is the state-dict
metadata of the real transformers class built from a tiny config (on the meta device), and
the ground truth is a hand-written table below ("target kind -> source kind + op"),
written from the libraries' module definitions, never from mappings/.

Score: the draft is planned against the source with statemap's own planner; a target key
counts as right when its recipe reads the expected source key(s) with the expected op
(rename / transpose / reshape / split part k of n / merge), or, for a target with no
source (``None`` below), when the draft leaves it unproduced.

    python -m pytest tests/test_suggest.py -q -s      # prints the table
"""

from __future__ import annotations

from pathlib import Path

import pytest

import statemap
from statemap.meta import Node, TensorMeta
from statemap.suggest import SuggestError, Suggestion, fold_kinds, suggest, token_similarity, tokens_of
from statemap.template import parse_pattern, parse_template

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


def T(name: str, *shape: int) -> TensorMeta:
    return TensorMeta(name, tuple(shape), "float32")


def plan_draft(s: Suggestion, source: list[TensorMeta], accept: bool = True) -> dict[str, Node]:
    spec = statemap.load_spec(s.to_yaml(name="draft", accept=accept))
    plan = statemap.make_plan(spec, source)
    return {o.name: o.node for o in plan.outputs}


# -- unit tests ---------------------------------------------------------------------------------


def test_tokens_and_similarity() -> None:
    assert tokens_of("encoder.layers.{i}.self_attn.LayerNorm.weight") == [
        "encoder",
        "layers",
        "self",
        "attn",
        "layer",
        "norm",
        "weight",
    ]
    assert tokens_of("blocks.0.norm1.weight") == ["blocks", "norm", "1", "weight"]
    assert token_similarity("attn", "attention") >= 0.7
    assert token_similarity("q", "query") == 0.9
    assert token_similarity("1", "2") == 0.0
    assert token_similarity("weight", "bias") == 0.0


def test_fold_kinds() -> None:
    kinds = fold_kinds([T("a.0.w", 2), T("a.1.w", 2), T("b", 3)])
    assert [k.pattern for k in kinds] == ["a.{i}.w", "b"]
    assert kinds[0].keys == ("a.0.w", "a.1.w")
    # shapes that differ per layer: keys stay literal
    kinds = fold_kinds([T("a.0.w", 2), T("a.1.w", 3)])
    assert [k.pattern for k in kinds] == ["a.0.w", "a.1.w"]


def test_docstring_example_one_rule_per_kind() -> None:
    src = [T(f"encoder.layers.{i}.fc1.{p}", *s) for i in range(3) for p, s in (("weight", (8, 4)), ("bias", (8,)))]
    tgt = [T("model." + m.name, *m.shape) for m in src]
    s = suggest(src, tgt)
    assert [(r.op, r.sources[0], r.targets[0]) for r in s.rules] == [
        ("rename", "encoder.layers.{i}.fc1.weight", "model.encoder.layers.{i}.fc1.weight"),
        ("rename", "encoder.layers.{i}.fc1.bias", "model.encoder.layers.{i}.fc1.bias"),
    ]
    assert all(0.5 < r.confidence <= 1 for r in s.rules)
    out = plan_draft(s, src)
    assert set(out) == {m.name for m in tgt}


def test_qkv_split_transpose_and_unmapped_comments() -> None:
    d = 4
    src = [
        T("blocks.0.attn.qkv.weight", 3 * d, d),
        T("blocks.0.attn.qkv.bias", 3 * d),
        T("blocks.0.proj.weight", d, 2 * d),
        T("extra", 5),
    ]
    tgt = [
        T("layer.0.attention.query.weight", d, d),
        T("layer.0.attention.key.weight", d, d),
        T("layer.0.attention.value.weight", d, d),
        T("layer.0.attention.query.bias", d),
        T("layer.0.attention.key.bias", d),
        T("layer.0.attention.value.bias", d),
        T("layer.0.output.proj.weight", 2 * d, d),
        T("layer.0.missing", 7),
    ]
    s = suggest(src, tgt)
    ops = {r.sources[0]: r for r in s.rules}
    assert ops["blocks.{i}.attn.qkv.weight"].op == "split"
    assert ops["blocks.{i}.attn.qkv.weight"].targets[0] == "layer.{i}.attention.query.weight"
    assert ops["blocks.{i}.proj.weight"].op == "transpose"
    text = s.to_yaml(name="t")
    assert text.startswith("# DRAFT")
    assert "#   extra [5]" in text and "#   layer.{i}.missing [7]" in text
    assert "confidence" in text
    # timm-style `qkv`: names do not say the row order -> marked, commented out, not applied
    assert ops["blocks.{i}.attn.qkv.weight"].verify.startswith("fused q/k/v")
    assert ops["blocks.{i}.attn.qkv.weight"].confidence <= 0.45
    assert "# - split:" in text and "layer.0.attention.query.weight" not in plan_draft(s, src, accept=False)
    assert "layer.0.attention.query.weight" in plan_draft(s, src, accept=["blocks.*.attn.qkv.*"])
    out = plan_draft(s, src)
    q = out["layer.0.attention.query.weight"]
    assert q.kind == "slice" and q.args[:3] == (0, 0, d)
    assert out["layer.0.output.proj.weight"].kind == "permute"


def test_merge_and_copy() -> None:
    d = 4
    src = [T("h.0.q.weight", d, d), T("h.0.k.weight", d, d), T("h.0.v.weight", d, d), T("embed.weight", 10, d)]
    tgt = [T("h.0.qkv.weight", 3 * d, d), T("tok_embed.weight", 10, d), T("lm_head.weight", 10, d)]
    s = suggest(src, tgt)
    out = plan_draft(s, src)
    assert out["h.0.qkv.weight"].kind == "concat"
    assert [n.args[0] for n in out["h.0.qkv.weight"].inputs] == ["h.0.q.weight", "h.0.k.weight", "h.0.v.weight"]
    assert out["tok_embed.weight"].sources() == ["embed.weight"]
    assert out["lm_head.weight"].sources() == ["embed.weight"]


def test_layer_offset_template() -> None:
    src = [T(f"dec.{i}.w", 3) for i in range(2)]
    tgt = [T(f"layers.{i + 6}.w", 3) for i in range(2)]
    s = suggest(src, tgt)
    assert s.rules[0].targets == ("layers.{i+6}.w",)
    assert set(plan_draft(s, src)) == {"layers.6.w", "layers.7.w"}


def test_errors() -> None:
    with pytest.raises(SuggestError, match="no tensors"):
        suggest([], [T("a", 1)])
    with pytest.raises(statemap.StatemapError):
        suggest([T("a", 1)], [])


def test_suggest_files_with_listing(tmp_path: Path) -> None:
    import json

    from statemap.suggest import suggest_files

    listing = tmp_path / "target.json"
    ck = statemap.open_checkpoint(FIX / "gpt2" / "ckpt.pt")
    keys = {
        k: list(m.shape)[::-1] if ("c_attn.weight" in k or "c_fc.weight" in k) else list(m.shape) for k, m in ck.metas.items()
    }
    ck.close()
    listing.write_text(json.dumps(keys))
    s = suggest_files(FIX / "gpt2" / "ckpt.pt", listing)
    assert "target.json" in s.to_yaml()
    assert {r.op for r in s.rules} == {"transpose"}


# -- accuracy on real layouts ---------------------------------------------------------------------

# Ground truth, one row per target kind: target pattern -> (source template, op). Ops:
# "rename", "transpose", "reshape", ("split", part, parts), "merge", None = no source exists.
# Several acceptable sources are given as a tuple of templates (tied weights).
QKV = ("q", "k", "v")

GT_VIT = {  # timm VisionTransformer -> transformers ViTForImageClassification
    "vit.embeddings.cls_token": ("cls_token", "rename"),
    "vit.embeddings.position_embeddings": ("pos_embed", "rename"),
    "vit.embeddings.patch_embeddings.projection.{p}": ("patch_embed.proj.{p}", "rename"),
    **{
        f"vit.encoder.layer.{{i}}.attention.attention.{n}.{{p}}": ("blocks.{i}.attn.qkv.{p}", ("split", j, 3))
        for j, n in enumerate(("query", "key", "value"))
    },
    "vit.encoder.layer.{i}.attention.output.dense.{p}": ("blocks.{i}.attn.proj.{p}", "rename"),
    "vit.encoder.layer.{i}.intermediate.dense.{p}": ("blocks.{i}.mlp.fc1.{p}", "rename"),
    "vit.encoder.layer.{i}.output.dense.{p}": ("blocks.{i}.mlp.fc2.{p}", "rename"),
    "vit.encoder.layer.{i}.layernorm_before.{p}": ("blocks.{i}.norm1.{p}", "rename"),
    "vit.encoder.layer.{i}.layernorm_after.{p}": ("blocks.{i}.norm2.{p}", "rename"),
    "vit.layernorm.{p}": ("norm.{p}", "rename"),
    "classifier.{p}": ("head.{p}", "rename"),
}

GT_GPT2 = {  # nanoGPT (nn.Linear) -> transformers GPT2LMHeadModel (Conv1D: [in, out])
    "transformer.wte.weight": ("transformer.wte.weight", "rename"),
    "transformer.wpe.weight": ("transformer.wpe.weight", "rename"),
    "transformer.h.{i}.ln_{n}.{p}": ("transformer.h.{i}.ln_{n}.{p}", "rename"),
    "transformer.h.{i}.{m}.{c}.weight": ("transformer.h.{i}.{m}.{c}.weight", "transpose"),
    "transformer.h.{i}.{m}.{c}.bias": ("transformer.h.{i}.{m}.{c}.bias", "rename"),
    "transformer.ln_f.{p}": ("transformer.ln_f.{p}", "rename"),
    "lm_head.weight": (("lm_head.weight", "transformer.wte.weight"), "rename"),
}

_FAIRSEQ_LAYER = {
    "self_attn.{x}_proj.{p}": "self_attn.{x}_proj.{p}",
    "self_attn_layer_norm.{p}": "self_attn_layer_norm.{p}",
    "encoder_attn.{x}_proj.{p}": "encoder_attn.{x}_proj.{p}",
    "encoder_attn_layer_norm.{p}": "encoder_attn_layer_norm.{p}",
    "fc{n}.{p}": "fc{n}.{p}",
    "final_layer_norm.{p}": "final_layer_norm.{p}",
    "ffn_layer_norm.{p}": "ffn_layer_norm.{p}",
}


def _seq2seq_gt(embed_extra: dict) -> dict:
    gt = {
        "model.shared.weight": (("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"), "rename"),
        "lm_head.weight": (
            ("decoder.output_projection.weight", "decoder.embed_tokens.weight", "encoder.embed_tokens.weight"),
            "rename",
        ),
    }
    for stack in ("encoder", "decoder"):
        gt[f"model.{stack}.embed_tokens.weight"] = ((f"{stack}.embed_tokens.weight", "encoder.embed_tokens.weight"), "rename")
        gt[f"model.{stack}.embed_positions.weight"] = (f"{stack}.embed_positions.weight", "rename")
        gt[f"model.{stack}.layernorm_embedding.{{p}}"] = (f"{stack}.layernorm_embedding.{{p}}", "rename")
        for t, s in _FAIRSEQ_LAYER.items():
            gt[f"model.{stack}.layers.{{i}}.{t}"] = (f"{stack}.layers.{{i}}.{s}", "rename")
    gt.update(embed_extra)
    return gt


GT_BART = _seq2seq_gt({"final_logits_bias": (None, None)})  # fairseq BART -> BartForConditionalGeneration
GT_DELTALM = _seq2seq_gt({})  # fairseq DeltaLM -> HF DeltaLM layout (model.-prefixed, fc1..fc4)

_X = "encoder.sentence_encoder"
GT_XLMR = {  # fairseq XLM-R (RobertaModel) -> XLMRobertaForMaskedLM
    "roberta.embeddings.word_embeddings.weight": (f"{_X}.embed_tokens.weight", "rename"),
    "roberta.embeddings.position_embeddings.weight": (f"{_X}.embed_positions.weight", "rename"),
    "roberta.embeddings.token_type_embeddings.weight": (None, None),
    "roberta.embeddings.LayerNorm.{p}": (f"{_X}.layernorm_embedding.{{p}}", "rename"),
    **{
        f"roberta.encoder.layer.{{i}}.attention.self.{n}.{{p}}": (f"{_X}.layers.{{i}}.self_attn.{x}_proj.{{p}}", "rename")
        for n, x in zip(("query", "key", "value"), QKV)
    },
    "roberta.encoder.layer.{i}.attention.output.dense.{p}": (f"{_X}.layers.{{i}}.self_attn.out_proj.{{p}}", "rename"),
    "roberta.encoder.layer.{i}.attention.output.LayerNorm.{p}": (f"{_X}.layers.{{i}}.self_attn_layer_norm.{{p}}", "rename"),
    "roberta.encoder.layer.{i}.intermediate.dense.{p}": (f"{_X}.layers.{{i}}.fc1.{{p}}", "rename"),
    "roberta.encoder.layer.{i}.output.dense.{p}": (f"{_X}.layers.{{i}}.fc2.{{p}}", "rename"),
    "roberta.encoder.layer.{i}.output.LayerNorm.{p}": (f"{_X}.layers.{{i}}.final_layer_norm.{{p}}", "rename"),
    "lm_head.dense.{p}": ("encoder.lm_head.dense.{p}", "rename"),
    "lm_head.layer_norm.{p}": ("encoder.lm_head.layer_norm.{p}", "rename"),
    "lm_head.decoder.weight": (("encoder.lm_head.weight", f"{_X}.embed_tokens.weight"), "rename"),
    "lm_head.decoder.bias": ("encoder.lm_head.bias", "rename"),
    "lm_head.bias": ("encoder.lm_head.bias", "rename"),
}

GT_CLIP = {  # OpenAI CLIP (clip.model.CLIP) -> transformers CLIPModel
    "logit_scale": ("logit_scale", "rename"),
    "text_model.embeddings.token_embedding.weight": ("token_embedding.weight", "rename"),
    "text_model.embeddings.position_embedding.weight": ("positional_embedding", "rename"),
    "text_model.final_layer_norm.{p}": ("ln_final.{p}", "rename"),
    "text_projection.weight": ("text_projection", "transpose"),
    "visual_projection.weight": ("visual.proj", "transpose"),
    "vision_model.embeddings.class_embedding": ("visual.class_embedding", "rename"),
    "vision_model.embeddings.patch_embedding.weight": ("visual.conv1.weight", "rename"),
    "vision_model.embeddings.position_embedding.weight": ("visual.positional_embedding", "rename"),
    "vision_model.pre_layrnorm.{p}": ("visual.ln_pre.{p}", "rename"),
    "vision_model.post_layernorm.{p}": ("visual.ln_post.{p}", "rename"),
}
for _hf, _oa in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
    _L, _R = f"{_hf}.encoder.layers.{{i}}", f"{_oa}.resblocks.{{i}}"
    for _j, _x in enumerate(QKV):
        GT_CLIP[f"{_L}.self_attn.{_x}_proj.weight"] = (f"{_R}.attn.in_proj_weight", ("split", _j, 3))
        GT_CLIP[f"{_L}.self_attn.{_x}_proj.bias"] = (f"{_R}.attn.in_proj_bias", ("split", _j, 3))
    GT_CLIP[f"{_L}.self_attn.out_proj.{{p}}"] = (f"{_R}.attn.out_proj.{{p}}", "rename")
    GT_CLIP[f"{_L}.layer_norm{{n}}.{{p}}"] = (f"{_R}.ln_{{n}}.{{p}}", "rename")
    GT_CLIP[f"{_L}.mlp.fc1.{{p}}"] = (f"{_R}.mlp.c_fc.{{p}}", "rename")
    GT_CLIP[f"{_L}.mlp.fc2.{{p}}"] = (f"{_R}.mlp.c_proj.{{p}}", "rename")


def _metas(model) -> list[TensorMeta]:
    """The model's checkpoint layout (under transformers 5 not its in-memory names)."""
    from hf_compat import saved_layout

    return [TensorMeta(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in saved_layout(model).items()]


def _open(path: Path) -> list[TensorMeta]:
    with statemap.open_checkpoint(path) as ck:
        return list(ck.metas.values())


def _layouts() -> dict[str, tuple[list[TensorMeta], list[TensorMeta], dict]]:
    torch = pytest.importorskip("torch")
    T_ = pytest.importorskip("transformers")
    with torch.device("meta"):
        vit = T_.ViTForImageClassification(
            T_.ViTConfig(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                image_size=32,
                patch_size=8,
                num_labels=10,
            )
        )
        gpt2 = T_.GPT2LMHeadModel(T_.GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=32, n_positions=12))
        bart = T_.BartForConditionalGeneration(
            T_.BartConfig(
                d_model=16,
                encoder_layers=2,
                decoder_layers=2,
                encoder_ffn_dim=24,
                decoder_ffn_dim=24,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                vocab_size=39,
                max_position_embeddings=16,
            )
        )
        xlmr = T_.XLMRobertaForMaskedLM(
            T_.XLMRobertaConfig(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=24,
                vocab_size=40,
                max_position_embeddings=18,
                type_vocab_size=1,
            )
        )
        clip = T_.CLIPModel(
            T_.CLIPConfig(
                text_config=dict(
                    vocab_size=100,
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    max_position_embeddings=16,
                ),
                vision_config=dict(
                    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
                ),
                projection_dim=8,
            )
        )
    deltalm_src = _open(ROOT / "examples" / "deltalm-tiny.pt")
    # the HF DeltaLM layout (no transformers class): BART-style names with fc1..fc4 and ffn_layer_norm
    by = {m.name: m for m in deltalm_src}
    deltalm_tgt = [TensorMeta("model.shared.weight", by["encoder.embed_tokens.weight"].shape, "float32")]
    deltalm_tgt += [
        TensorMeta("model." + m.name, m.shape, m.dtype)
        for m in deltalm_src
        if not m.name.endswith("version") and "output_projection" not in m.name
    ]
    deltalm_tgt.append(TensorMeta("lm_head.weight", by["decoder.embed_tokens.weight"].shape, "float32"))
    out = {
        "ViT: timm -> HF": (_open(FIX / "vit" / "timm" / "model.safetensors"), _metas(vit), GT_VIT),
        "GPT-2: nanoGPT -> HF": (_open(FIX / "gpt2" / "ckpt.pt"), _metas(gpt2), GT_GPT2),
        "BART: fairseq -> HF": (_open(FIX / "fairseq" / "bart.pt"), _metas(bart), GT_BART),
        "XLM-R: fairseq -> HF": (_open(FIX / "fairseq" / "xlmr.pt"), _metas(xlmr), GT_XLMR),
        "CLIP: OpenAI -> HF": (_open(FIX / "clip" / "openai_state_dict.pt"), _metas(clip), GT_CLIP),
        "DeltaLM: fairseq -> HF": (deltalm_src, deltalm_tgt, GT_DELTALM),
    }
    # the reverse directions (HF -> timm needs merges, HF -> OpenAI merges and transposes)
    for fwd, rev in (
        ("ViT: timm -> HF", "ViT: HF -> timm"),
        ("GPT-2: nanoGPT -> HF", "GPT-2: HF -> nanoGPT"),
        ("CLIP: OpenAI -> HF", "CLIP: HF -> OpenAI"),
    ):
        src, tgt, gt = out[fwd]
        out[rev] = (tgt, src, _reverse(gt, src, tgt))
    return out


def _expected(gt: dict, key: str) -> tuple[tuple[str, ...] | None, object]:
    for tpat, (src, op) in gt.items():
        caps = parse_pattern(tpat).match(key)
        if caps is None:
            continue
        if src is None:
            return None, None
        srcs = src if isinstance(src, tuple) else (src,)
        return tuple(parse_template(s).fill(caps) for s in srcs), op
    raise AssertionError(f"no ground-truth row for target key {key!r}")


def _got_op(node: Node) -> object:
    """The op a recipe performs, in the ground truth's terms."""
    if node.kind == "source":
        return "rename"
    if node.kind == "permute" and node.inputs[0].kind == "source":
        return "transpose"
    if node.kind == "reshape" and node.inputs[0].kind == "source":
        return "reshape"
    if node.kind == "concat":
        return "merge"
    inner = node.inputs[0] if node.inputs else None
    if node.kind == "slice" and inner is not None and inner.kind in ("source", "permute"):
        dim, start, stop, _ = node.args
        length = inner.shape[dim]
        n = length // (stop - start)
        return ("split", start // (stop - start), n)
    return node.describe()


def _reverse(gt: dict, source: list[TensorMeta], target: list[TensorMeta]) -> dict:
    """The ground truth of the reverse direction, key by key: rename/transpose invert to
    themselves, the parts of a split merge back in part order; a key nothing came from has
    no source."""
    rev: dict[str, tuple] = {}
    parts: dict[str, dict[int, str]] = {}
    for m in target:
        srcs, op = _expected(gt, m.name)
        if srcs is None:
            continue
        if isinstance(op, tuple):
            parts.setdefault(srcs[0], {})[op[1]] = m.name
        elif srcs[0] not in rev:
            rev[srcs[0]] = ((m.name,), op)
        else:
            rev[srcs[0]] = (rev[srcs[0]][0] + (m.name,), op)
    for key, by_part in parts.items():
        rev[key] = (("|".join(by_part[j] for j in sorted(by_part)),), "merge")
    return {m.name: rev.get(m.name, (None, None)) for m in source}


def score(gt: dict, source: list[TensorMeta], target: list[TensorMeta]) -> tuple[int, int, list[str], Suggestion, int, int]:
    """(right, target keys, wrong, draft, marked, wrong-but-confident): right counts every rule,
    accepted or not; marked keys come from a rule marked for verification."""
    s = suggest(source, target)
    out = plan_draft(s, source)
    active = plan_draft(s, source, accept=False)
    right, wrong, marked, confident_wrong = 0, [], 0, 0
    for m in target:
        want_src, want_op = gt[m.name] if m.name in gt else _expected(gt, m.name)
        node = out.get(m.name)
        if want_src is None:
            ok = node is None
        elif want_op == "merge":
            ok = node is not None and _got_op(node) == "merge" and "|".join(node.sources()) in want_src
        else:
            ok = node is not None and len(node.sources()) == 1 and node.sources()[0] in want_src and _got_op(node) == want_op
        is_marked = node is not None and (m.name not in active or active[m.name].describe() != node.describe())
        marked += is_marked
        if ok:
            right += 1
        else:
            wrong.append(f"{m.name}: want {want_src} {want_op}, got {node.describe() if node else None}")
            confident_wrong += node is not None and not is_marked
    return right, len(target), wrong, s, marked, confident_wrong


# measured: see docs/suggest.md; a floor per family so that a regression fails
FLOORS = {
    "ViT: timm -> HF": 1.0,
    "GPT-2: nanoGPT -> HF": 1.0,
    "BART: fairseq -> HF": 1.0,
    "XLM-R: fairseq -> HF": 1.0,
    "CLIP: OpenAI -> HF": 1.0,
    "DeltaLM: fairseq -> HF": 1.0,
    "ViT: HF -> timm": 1.0,
    "GPT-2: HF -> nanoGPT": 1.0,
    "CLIP: HF -> OpenAI": 1.0,
}


def test_accuracy_on_real_layouts() -> None:
    rows = []
    failures = []
    total_right = total = total_marked = 0
    for family, (source, target, gt) in _layouts().items():
        right, n, wrong, s, marked, confident_wrong = score(gt, source, target)
        total_right += right
        total += n
        total_marked += marked
        acc = right / n
        rows.append(f"| {family} | {n} | {right} | {acc:.1%} | {marked / n:.0%} | {confident_wrong} | {len(s.rules)} |")
        if acc < FLOORS[family]:
            failures.append(f"{family}: {acc:.1%} < floor {FLOORS[family]:.0%}:\n  " + "\n  ".join(wrong[:20]))
        if confident_wrong:
            failures.append(f"{family}: {confident_wrong} key(s) wrong from rules not marked for verification")
    table = "\n".join(
        [
            "| family | target keys | right | accuracy | marked for verification | wrong but confident | rules |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        + rows
        + [f"| all | {total} | {total_right} | {total_right / total:.1%} | {total_marked / total:.0%} | | |"]
    )
    print("\n" + table)
    assert not failures, "\n".join(failures)


def test_cli_suggest_writes_a_loadable_draft(tmp_path, capsys):
    from statemap.cli import main

    out = tmp_path / "draft.yaml"
    fix = "tests/fixtures/vit/timm/model.safetensors"
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listing = tmp_path / "target.json"
    import json

    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig.from_json_file(str(root / "tests/fixtures/vit/hf_vit/config.json"))
    import torch

    with torch.device("meta"):
        model = ViTForImageClassification(cfg)
    listing.write_text(json.dumps({m.name: list(m.shape) for m in _metas(model)}))
    assert main(["suggest", str(root / fix), str(listing), "-o", str(out)]) == 0
    assert "rules drafted" in capsys.readouterr().err
    spec = statemap.load_spec(out)
    assert spec.name == "draft" and len(spec.rules) > 5
    assert main(["suggest", str(root / fix), str(listing), "-o", str(out)]) == 2  # exists
