"""`statemap diff --values` explains every B key by A's content, and `--spec` names the rule behind
each mismatch. Conversions are made with `statemap apply` on the shipped fixtures; broken ones are
made from a correct output by hand (swapped, permuted, cast, untransposed tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from statemap.cli import main
from statemap.correspond import describe_permutation, fold_correspondences
from statemap.plan import make_plan
from statemap.spec import load_spec

GPT2_HF = "tests/fixtures/gpt2/hf/model.safetensors"
LEGACY = "tests/fixtures/fairseq/legacy_bart.pt"


def _diff(capsys, *argv: str) -> tuple[int, dict[str, dict], list[dict]]:
    code = main(["diff", *argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    ex = out["explain"]
    return code, {e["b"]: e for e in ex["b"]}, ex["a_left"]


def _apply(spec: str, src: Path, dst: Path) -> Path:
    assert main(["apply", spec, str(src), str(dst), "-q", "--tied", "clone"]) == 0  # every name, to explain each
    return dst


def _rule_lines(spec: str, source: str) -> dict[str, str]:
    """key -> str(rule.loc) of the rule that produced it, from the planner itself."""
    from statemap.load import open_checkpoint

    with open_checkpoint(source) as ck:
        plan = make_plan(load_spec(spec), ck.metas.values(), ck.tied_groups())
    return {o.name: str(o.rule.loc) for o in plan.outputs if o.rule is not None}


def test_deltalm_every_b_key_explained(root, tmp_path, capsys):
    src = root / "examples" / "deltalm-tiny.pt"
    hf = _apply("deltalm-fairseq-to-hf", src, tmp_path / "hf.safetensors")
    code, b, a_left = _diff(capsys, str(src), str(hf), "--values")
    assert code == 1  # the names differ
    assert len(b) == 395
    kinds = {e["kind"] for e in b.values()}
    assert kinds == {"renamed", "tied", "constant"}, kinds
    assert b["model.encoder.layers.3.fc1.weight"]["a"] == ["encoder.layers.3.fc1.weight"]
    assert b["model.decoder.layers.5.fc4.bias"]["a"] == ["decoder.layers.5.fc4.bias"]
    emb = [k for k, e in b.items() if e["a"] == ["encoder.embed_tokens.weight"]]
    assert sorted(emb) == ["model.encoder.embed_tokens.weight", "model.shared.weight"]
    assert sorted(b[k]["kind"] for k in emb) == ["renamed", "tied"]
    assert b["lm_head.weight"]["a"] == ["decoder.output_projection.weight"]
    assert b["final_logits_bias"]["kind"] == "constant" and "0" in b["final_logits_bias"]["detail"]
    assert {(d["a"], d["kind"]) for d in a_left} == {("encoder.version", "dropped"), ("decoder.version", "dropped")}
    # the text output folds by layer index
    assert main(["diff", str(src), str(hf), "--values"]) == 1
    text = capsys.readouterr().out
    assert "content: 393 renamed, 1 tied, 1 constant" in text
    # with the spec, A planned in memory is B: exit 0
    code, b, _ = _diff(capsys, str(src), str(hf), "--spec", "deltalm-fairseq-to-hf")
    assert code == 0 and {e["kind"] for e in b.values()} == {"same"}


def test_legacy_in_proj_rows(root, tmp_path, capsys):
    hf = _apply("fairseq-legacy-to-hf", root / LEGACY, tmp_path / "hf.safetensors")
    code, b, _ = _diff(capsys, str(root / LEGACY), str(hf), "--values")
    assert code == 1
    d = 16
    n = 0
    for stack, attns in (("encoder", ["self_attn"]), ("decoder", ["self_attn", "encoder_attn"])):
        for i in (0, 1):
            for attn in attns:
                for j, x in enumerate("qkv"):
                    for kind in ("weight", "bias"):
                        e = b[f"model.{stack}.layers.{i}.{attn}.{x}_proj.{kind}"]
                        assert e["kind"] == "split", e
                        (p,) = e["pieces"]
                        assert p["a"] == f"{stack}.layers.{i}.{attn}.in_proj_{kind}"
                        assert p["a_range"] == [j * d, (j + 1) * d] and p["a_axis"] == "rows"
                        assert f"rows [{j * d}:{(j + 1) * d}]" in e["detail"]
                        n += 1
    assert n == 36
    assert not [k for k, e in b.items() if e["kind"] in ("unmatched", "differs")]


def test_gpt2_transposes(root, tmp_path, capsys):
    nano = _apply("gpt2-hf-to-nanogpt", root / GPT2_HF, tmp_path / "nano.safetensors")
    code, b, a_left = _diff(capsys, str(root / GPT2_HF), str(nano), "--values")
    assert code == 1
    transposed = sorted(k for k, e in b.items() if e["kind"] == "transposed")
    assert transposed == sorted(
        f"transformer.h.{i}.{p}.weight" for i in (0, 1) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert all(b[k]["a"] == [k] for k in transposed)
    assert b["lm_head.weight"]["kind"] == "tied" and b["lm_head.weight"]["a"] == ["transformer.wte.weight"]
    assert {e["kind"] for k, e in b.items() if k not in transposed and k != "lm_head.weight"} == {"same"}
    assert a_left == []


def _broken_nano(good: Path, out: Path) -> None:
    sd = load_file(str(good))
    w = sd["transformer.h.0.attn.c_attn.weight"]  # [96, 32]: q rows 0:32, k 32:64, v 64:96
    sd["transformer.h.0.attn.c_attn.weight"] = torch.cat([w[32:64], w[0:32], w[64:]]).contiguous()  # q <-> k
    w = sd["transformer.h.1.attn.c_attn.weight"].clone()
    w[16:24] = w[16:24].flip(0)  # head 2 of q (4 heads of 8): rows reversed
    sd["transformer.h.1.attn.c_attn.weight"] = w
    sd["transformer.h.1.mlp.c_proj.weight"] = sd["transformer.h.1.mlp.c_proj.weight"].to(torch.bfloat16)
    sd["transformer.h.0.mlp.c_fc.weight"] = sd["transformer.h.0.mlp.c_fc.weight"].T.contiguous()  # left as Conv1D
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out))


BROKEN = {
    "transformer.h.0.attn.c_attn.weight": ("permuted", "rows [0:32] = A[32:64], [32:64] = A[0:32]"),
    "transformer.h.1.attn.c_attn.weight": ("permuted", "rows [16:24] reordered: order [7, 6, 5, 4, 3, 2, 1, 0]"),
    "transformer.h.1.mlp.c_proj.weight": ("cast", "B is A in bfloat16 (rounded from float32)"),
    "transformer.h.0.mlp.c_fc.weight": ("transposed", "transposed"),
}


def test_broken_conversion_diagnosed(root, tmp_path, capsys):
    good = _apply("gpt2-hf-to-nanogpt", root / GPT2_HF, tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    _broken_nano(good, bad)
    code, b, _ = _diff(capsys, str(good), str(bad), "--values")
    assert code == 1
    wrong = {k: e for k, e in b.items() if e["kind"] != "same"}
    assert set(wrong) == set(BROKEN), wrong
    for k, (kind, text) in BROKEN.items():
        assert wrong[k]["kind"] == kind and text in wrong[k]["detail"], wrong[k]
        assert wrong[k]["a"] == [k]
    assert wrong["transformer.h.1.mlp.c_proj.weight"]["cast"] == "bfloat16"

    # --spec: B against the spec applied to the HF source; each mismatch names the rule of its key
    rules = _rule_lines("gpt2-hf-to-nanogpt", str(root / GPT2_HF))
    code, b, _ = _diff(capsys, str(root / GPT2_HF), str(bad), "--spec", "gpt2-hf-to-nanogpt")
    assert code == 1
    wrong = {k: e for k, e in b.items() if e["kind"] != "same"}
    assert set(wrong) == set(BROKEN)
    for k, (kind, text) in BROKEN.items():
        assert wrong[k]["kind"] == kind and text in wrong[k]["detail"]
        assert wrong[k]["rule"].startswith(rules[k] + " "), (wrong[k]["rule"], rules[k])
    file, line = rules["transformer.h.0.attn.c_attn.weight"].rsplit(":", 1)
    assert "transpose:" in Path(file).read_text().splitlines()[int(line) - 1]
    # the correct output against the same spec: nothing to report
    code, b, _ = _diff(capsys, str(root / GPT2_HF), str(good), "--spec", "gpt2-hf-to-nanogpt")
    assert code == 0 and {e["kind"] for e in b.values()} == {"same"}


def test_swapped_projections_and_changed_values(root, tmp_path, capsys):
    good = _apply("fairseq-legacy-to-hf", root / LEGACY, tmp_path / "good.safetensors")
    sd = load_file(str(good))
    q, k = "model.encoder.layers.0.self_attn.q_proj.weight", "model.encoder.layers.0.self_attn.k_proj.weight"
    sd[q], sd[k] = sd[k].clone(), sd[q].clone()
    fc1 = "model.decoder.layers.1.fc1.weight"
    sd[fc1] = sd[fc1].clone()
    sd[fc1][3, 5] += 0.25
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    code, b, _ = _diff(capsys, str(good), str(bad), "--values")
    assert code == 1
    wrong = {key: e for key, e in b.items() if e["kind"] != "same"}
    assert set(wrong) == {q, k, fc1}
    assert wrong[q]["kind"] == wrong[k]["kind"] == "swapped" and wrong[q]["a"] == [k] and wrong[k]["a"] == [q]
    e = wrong[fc1]
    assert e["kind"] == "differs" and e["max_abs"] == pytest.approx(0.25, rel=1e-5) and e["rows_differ"].startswith("[3] (1 of")

    rules = _rule_lines("fairseq-legacy-to-hf", str(root / LEGACY))
    code, b, _ = _diff(capsys, str(root / LEGACY), str(bad), "--spec", "fairseq-legacy-to-hf")
    assert code == 1
    wrong = {key: e for key, e in b.items() if e["kind"] != "same"}
    assert set(wrong) == {q, k, fc1}
    assert wrong[q]["kind"] == "swapped" and wrong[q]["rule"].startswith(rules[q] + " (split)")
    assert wrong[fc1]["kind"] == "differs" and wrong[fc1]["rule"].startswith(rules[fc1] + " (rename)")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--spec", "no-such-spec"], "no such spec file or catalog name"),
        (["--spec", "vit-timm-to-hf"], "matched no key"),
    ],
)
def test_bad_spec_is_an_error(root, capsys, argv, match):
    assert main(["diff", str(root / GPT2_HF), str(root / GPT2_HF), *argv]) == 2
    assert match in capsys.readouterr().err


def test_hf_layout_has_no_values(root, capsys):
    assert main(["diff", str(root / GPT2_HF), "hf:GPT2LMHeadModel", "--spec", "gpt2-hf-to-nanogpt"]) == 2
    assert "--spec needs tensor values" in capsys.readouterr().err


def test_describe_permutation():
    inter = [h * 8 + j for h in range(4) for j in (0, 2, 4, 6, 1, 3, 5, 7)]
    assert (
        describe_permutation(inter) == "rows reordered within each block of 8 (blocks 0-3 of 4): order [0, 2, 4, 6, 1, 3, 5, 7]"
    )
    rotary = [h * 32 + j for h in range(2) for j in [*range(0, 32, 2), *range(1, 32, 2)]]
    assert describe_permutation(rotary) == "rows reordered within each block of 32 (blocks 0-1 of 2): order [0:31:2, 1:32:2]"
    heads = [x for h in (1, 0, 2, 3) for x in range(h * 8, h * 8 + 8)]
    assert describe_permutation(heads) == "rows [0:8] = A[8:16], [8:16] = A[0:8]"
    one = list(range(32))
    one[8:16] = [11, 8, 14, 9, 15, 10, 13, 12]
    assert describe_permutation(one).startswith("rows [8:16] reordered")


def test_fold_keeps_index_correspondence():
    rows = fold_correspondences(
        [(f"b.{i}.w", "renamed", f"A:a.{i}.w", "") for i in range(3)] + [("b.3.w", "renamed", "A:a.4.w", "")]
    )
    assert rows == [("b.{0-2}.w", "renamed", "A:a.{0-2}.w", "", 3), ("b.3.w", "renamed", "A:a.4.w", "", 1)]


def _explain_arrays(a: dict, b: dict):
    from statemap.correspond import explain
    from statemap.dtypes import from_numpy
    from statemap.meta import TensorMeta

    def metas(d):
        return {
            k: TensorMeta(k, tuple(v.shape), "bfloat16" if k.endswith("bf16") else from_numpy(v.dtype).name) for k, v in d.items()
        }

    return {c.b: c for c in explain(metas(a), a.__getitem__, metas(b), b.__getitem__).b}


def test_kinds_on_numpy_layouts():
    import numpy as np

    from statemap.dtypes import cast
    from statemap.dtypes import dtype as dt

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((6, 4), dtype=np.float32) for _ in range(3))
    w = rng.standard_normal((8, 6), dtype=np.float32)
    e = rng.standard_normal((5, 3), dtype=np.float32)
    a = {"q": q, "k": k, "v": v, "w": w, "e": e, "gone": np.ones(3, np.float32)}
    b = {
        "qkv": np.concatenate([q, k, v]),  # merged along dim 0
        "kv_cols": np.concatenate([k, v], axis=1),  # merged along dim 1
        "w_top_t": w[:4].T.copy(),  # split then transposed
        "w_cols": w[:, 2:5].copy(),  # split along dim 1
        "e3": e.reshape(3, 5).copy(),  # reshaped (same bytes)
        "e_bf16": cast(e, dt("float32"), dt("bfloat16")),  # rounded
        "zeros": np.zeros((2, 3), np.float32),  # constant
        "noise": rng.standard_normal((4, 4), dtype=np.float32),  # nothing
    }
    c = _explain_arrays(a, b)
    assert c["qkv"].kind == "merged" and c["qkv"].a == ("q", "k", "v")
    assert c["kv_cols"].kind == "merged" and "dim 1" in c["kv_cols"].detail
    assert c["w_top_t"].kind == "transposed" and c["w_top_t"].detail == "B = (rows [0:4] of A:w) transposed"
    assert c["w_cols"].kind == "split" and c["w_cols"].detail == "columns [2:5] of A:w (split along dim 1 of 6)"
    assert c["e3"].kind == "renamed" and "reshaped [5, 3] -> [3, 5]" in c["e3"].detail
    assert c["e_bf16"].kind == "renamed" and c["e_bf16"].cast == "bfloat16"
    assert c["zeros"].kind == "constant"
    assert c["noise"].kind == "unmatched"


@pytest.mark.parametrize(
    ("spec", "source"),
    [
        ("deltalm-fairseq-to-hf", "examples/deltalm-tiny.pt"),
        ("fairseq-legacy-to-hf", LEGACY),
        ("xlmr-fairseq-to-hf", "tests/fixtures/fairseq/xlmr.pt"),
        ("bart-fairseq-to-hf", "tests/fixtures/fairseq/bart.pt"),
        ("gpt2-hf-to-nanogpt", GPT2_HF),
        ("vit-timm-to-hf", "tests/fixtures/vit/timm/model.safetensors"),
        ("clip-openai-to-hf", "tests/fixtures/clip/openai_state_dict.pt"),
    ],
)
def test_suggest_from_values_reproduces_the_target(root, tmp_path, capsys, spec, source):
    """A draft from values, applied by `statemap apply`, gives the target bitwise (diff exits 0)."""
    target = _apply(spec, root / source, tmp_path / "target.safetensors")
    draft = tmp_path / "draft.yaml"
    assert main(["suggest", str(root / source), str(target), "--values", "-o", str(draft), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and out["from_names"] == 0 and out["problems"] == []
    assert "reproduces the target BITWISE" in draft.read_text()
    again = _apply(str(draft), root / source, tmp_path / "again.safetensors")
    assert main(["diff", str(target), str(again), "--values", "-q"]) == 0


def test_suggest_from_values_says_what_it_cannot_draft(root, tmp_path, capsys):
    """One head's rows reversed fits no known pattern: not drafted, the check fails, exit 1."""
    good = _apply("gpt2-hf-to-nanogpt", root / GPT2_HF, tmp_path / "good.safetensors")
    sd = load_file(str(good))
    w = sd["transformer.h.1.attn.c_attn.weight"].clone()
    w[16:24] = w[16:24].flip(0)
    sd["transformer.h.1.attn.c_attn.weight"] = w
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    draft = tmp_path / "draft.yaml"
    assert main(["suggest", str(root / GPT2_HF), str(bad), "--values", "-o", str(draft)]) == 1
    text = draft.read_text()
    assert "does NOT reproduce the target" in text
    assert "transformer.h.1.attn.c_attn.weight: permuted" in text and "no known row order" in text


def test_llama_rotary_permutation(root, capsys):
    """Meta LLaMA vs transformers' own convert_llama_weights_to_hf output (fixture made with it):
    wq / wk rows are permuted per head (even rows, then odd rows), the rest renamed."""
    meta, hf = root / "tests/fixtures/llama/meta/consolidated.00.pth", root / "tests/fixtures/llama/hf/model.safetensors"
    code, b, a_left = _diff(capsys, str(meta), str(hf), "--values")
    assert code == 1 and a_left == []
    q, k = b["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.k_proj.weight"]
    assert q["kind"] == k["kind"] == "permuted"
    assert q["a"] == ["layers.0.attention.wq.weight"] and k["a"] == ["layers.0.attention.wk.weight"]
    order = "order [0, 2, 4, 6, 1, 3, 5, 7]"  # head_dim 8: HF's rotary halves from Meta's interleaved pairs
    assert q["detail"].endswith(f"rows reordered within each block of 8 (blocks 0-3 of 4): {order}")
    assert k["detail"].endswith(f"rows reordered within each block of 8 (blocks 0-1 of 2): {order}")
    others = {key: e["kind"] for key, e in b.items() if key not in (q["b"], k["b"])}
    assert set(others.values()) == {"renamed"}, others
    assert b["model.layers.0.self_attn.v_proj.weight"]["a"] == ["layers.0.attention.wv.weight"]
    assert b["lm_head.weight"]["a"] == ["output.weight"]


def test_suggest_from_values_llama_rotary(root, tmp_path, capsys):
    """The rotary permutation is drafted as reshape -> permute -> reshape and reproduces
    transformers' conversion bitwise; the draft re-applied by `statemap apply` too."""
    meta, hf = root / "tests/fixtures/llama/meta/consolidated.00.pth", root / "tests/fixtures/llama/hf/model.safetensors"
    draft = tmp_path / "llama.yaml"
    assert main(["suggest", str(meta), str(hf), "--values", "-o", str(draft), "-q"]) == 0
    text = draft.read_text()
    from statemap.suggest_values import has_rearrange

    if has_rearrange():  # one rule per projection: q (4 heads) and k (2 kv heads)
        assert text.count("rearrange:") == 2 and text.count("pattern: (h d two) c -> (h two d) c") == 2
        assert "sizes: {h: 4, two: 2}" in text and "sizes: {h: 2, two: 2}" in text
    else:
        assert "dims: [0, 2, 1, 3]" in text and "shape: [4, 4, 2, 32]" in text
    out = _apply(str(draft), meta, tmp_path / "out.safetensors")
    assert main(["diff", str(hf), str(out), "--values", "-q"]) == 0


def test_empty_and_repeated_tensors_are_bounded():
    """An empty tensor is never read; a stride-0 view too large to compare is refused, naming the file."""
    import numpy as np

    from statemap.correspond import explain
    from statemap.errors import CheckpointError
    from statemap.meta import TensorMeta

    def boom(k):
        raise AssertionError(f"read {k}")

    a = {"w": TensorMeta("w", (4,), "float32")}
    b = {"e": TensorMeta("e", (0, 2**40), "float32")}
    ex = explain(a, lambda k: np.arange(4, dtype=np.float32), b, boom)
    assert ex.b[0].kind == "unmatched" and "empty" in ex.b[0].detail
    big = {"r": TensorMeta("r", (2**16, 2**16), "float32")}
    with pytest.raises(CheckpointError, match=r"b\.pt: tensor 'r': a view with repeated elements \(stride 0\)"):
        explain(
            a,
            lambda k: np.arange(4, dtype=np.float32),
            big,
            lambda k: np.broadcast_to(np.float32(1), (2**16, 2**16)),
            names=("a.pt", "b.pt"),
        )


def test_swap_pattern_exact_and_negatives():
    """The row orders drafted as one `rearrange` rule, found exactly; other orders are not."""
    import numpy as np

    from statemap.suggest_values import known_rearrange, swap_pattern

    rot = [h * 8 + j for h in range(4) for j in (0, 2, 4, 6, 1, 3, 5, 7)]  # Meta pairs -> HF halves, 4 heads of 8
    assert swap_pattern(rot) == (4, 4, 2, 1)
    assert known_rearrange(rot, 2) == (
        "(h d two) c -> (h two d) c",
        {"h": 4, "two": 2},
        "rotary: interleaved pairs -> halves, per head",
    )
    assert known_rearrange(list(np.argsort(rot)), 2)[0] == "(h two d) c -> (h d two) c"
    qkv = list(np.arange(6 * 3 * 5).reshape(1, 6, 3, 5).transpose(0, 2, 1, 3).reshape(-1))  # 6 heads of 5, [h, 3, d]
    assert swap_pattern(qkv) == (1, 6, 3, 5)
    assert known_rearrange(qkv, 1) == (
        "(h three d) -> (three h d)",
        {"h": 6, "three": 3},
        "fused q/k/v: per head [h, 3, d] -> q|k|v blocks",
    )
    assert known_rearrange(list(np.argsort(qkv)), 2)[:2] == ("(three h d) c -> (h three d) c", {"h": 6, "three": 3})
    one_head = list(range(32))
    one_head[16:24] = one_head[16:24][::-1]
    random = list(np.random.default_rng(0).permutation(32))
    for bad in (list(range(32)), one_head, random, [1, 0, 2, 3]):
        assert swap_pattern(bad) is None and known_rearrange(bad, 2) is None
    assert (
        known_rearrange(list(np.arange(24).reshape(2, 3, 2, 2).transpose(0, 2, 1, 3).reshape(-1)), 2) is None
    )  # fits, not known


def _neox_pair(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A tiny GPT-NeoX saved by transformers (query_key_value rows per head [h, 3, d]) and the
    same weights with q, k, v as separate projections, cut as GPTNeoXAttention reads them
    (view(..., h, 3 * d), then the three d-wide slices) -- by numpy here, no tool writes this layout."""
    import numpy as np
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    h, d = 4, 8
    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(hidden_size=h * d, num_hidden_layers=2, num_attention_heads=h, intermediate_size=64, vocab_size=50)
    )
    with torch.no_grad():  # every parameter perturbed: zero biases and unit norms would match anything
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    fused = tmp_path / "neox"
    model.save_pretrained(fused)
    sd = load_file(str(fused / "model.safetensors"))
    sep = {}
    for k, v in sd.items():
        if ".query_key_value." not in k:
            sep[k] = v
            continue
        x = v.numpy().reshape(h, 3, d, *v.shape[1:])
        for j, name in enumerate(("query", "key", "value")):
            sep[k.replace("query_key_value", name)] = torch.from_numpy(np.ascontiguousarray(x[:, j]).reshape(h * d, *v.shape[1:]))
    out = tmp_path / "neox_separate.safetensors"
    save_file(sep, str(out))
    return fused / "model.safetensors", out, sd


def test_suggest_from_values_gpt_neox_fused_qkv(tmp_path, capsys):
    """Per-head fused q/k/v <-> separate projections: one `rearrange` and a `split` (or a `merge`
    and a `rearrange`); each draft reproduces the other side bitwise, and applied by `statemap
    apply` too."""
    from statemap.suggest_values import has_rearrange

    if not has_rearrange():
        pytest.skip("the rearrange op is not in this engine yet")
    fused, sep, _ = _neox_pair(tmp_path)
    for n, (a, b, want) in enumerate(
        (
            (fused, sep, "pattern: (h three d) c -> (three h d) c"),
            (sep, fused, "pattern: (three h d) c -> (h three d) c"),
        )
    ):
        draft = tmp_path / f"draft{n}.yaml"
        assert main(["suggest", str(a), str(b), "--values", "-o", str(draft), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["verified"] and out["from_names"] == 0
        text = draft.read_text()
        assert want in text and "h: 4" in text and text.count("rearrange:") == 2  # weight and bias, layers folded
        again = _apply(str(draft), a, tmp_path / f"again{n}.safetensors")
        assert main(["diff", str(b), str(again), "--values", "-q"]) == 0
    # negative: a plain split (q|k|v blocks) is not what GPT-NeoX holds
    from statemap.cli import main as cli

    plain = tmp_path / "plain.yaml"
    plain.write_text(
        "name: plain\nversion: 1\nrules:\n  - split: {from: 'gpt_neox.layers.{i}.attention.query_key_value.{p}', "
        "to: ['gpt_neox.layers.{i}.attention.query.{p}', 'gpt_neox.layers.{i}.attention.key.{p}', "
        "'gpt_neox.layers.{i}.attention.value.{p}'], dim: 0}\n"
    )
    wrong = _apply(str(plain), fused, tmp_path / "wrong.safetensors")
    assert cli(["diff", str(sep), str(wrong), "--values", "-q"]) == 1


def test_row_and_column_hashes_are_exact():
    """A row of A hashes like the same column of A transposed (no transpose is made); a bfloat16
    tensor like its exact float32 widening; float64 holding float32 values like float32; one bit
    flipped changes exactly that row's and that column's hash; blocks wider than the exact span
    (2**13 positions) and row chunks split across threads give the same hashes."""
    import numpy as np

    from statemap.correspond import _Hasher
    from statemap.dtypes import cast
    from statemap.dtypes import dtype as dt
    from statemap.meta import TensorMeta

    def fp(h, x, name="float32"):
        return h.fingerprint("k", TensorMeta("k", x.shape, name), x)

    rng = np.random.default_rng(3)
    h = _Hasher(20000)
    x = rng.standard_normal((300, 9000), dtype=np.float32)  # 9000 > 2**13: two column blocks
    a, t = fp(h, x), fp(h, np.ascontiguousarray(x.T))
    assert np.array_equal(a.rows, t.cols) and np.array_equal(a.cols, t.rows)
    assert len(set(a.rows.tolist())) == 300 and len(set(a.cols.tolist())) == 9000
    one = _Hasher(20000, workers=1)
    assert np.array_equal(fp(one, x).rows, a.rows) and fp(one, x).full == a.full
    y = x.copy()
    y.view(np.uint32)[17, 4321] ^= 1  # the lowest mantissa bit of one element
    b = fp(h, y)
    assert list(np.nonzero(a.rows != b.rows)[0]) == [17] and list(np.nonzero(a.cols != b.cols)[0]) == [4321]
    bf = cast(x[:, :64], dt("float32"), dt("bfloat16"))
    assert np.array_equal(fp(h, bf, "bfloat16").rows, fp(h, cast(bf, dt("bfloat16"), dt("float32"))).rows)
    assert np.array_equal(fp(h, x[:, :64].astype(np.float64), "float64").rows, fp(h, np.ascontiguousarray(x[:, :64])).rows)
    assert not np.array_equal(
        fp(h, (x[:, :64].astype(np.float64) + 1e-12), "float64").rows, fp(h, np.ascontiguousarray(x[:, :64])).rows
    )


def test_complex_values_compare_both_parts():
    """A complex tensor equal in its real parts only is not explained as the same values."""
    import numpy as np

    rng = np.random.default_rng(5)
    re_, im = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    z = (re_ + 1j * im).astype(np.complex64)
    w = (re_ + 1j * (im + 1)).astype(np.complex64)
    c = _explain_arrays(
        {"z": z, "zz": (re_ + 1j * im).astype(np.complex128)},
        {"z": z.copy(), "w": w, "zz_t": np.ascontiguousarray((re_ + 1j * im).astype(np.complex128).T)},
    )
    assert c["z"].kind == "same"
    assert c["w"].kind != "renamed" and c["w"].a != ("z",)
    assert c["zz_t"].kind in ("unmatched", "constant") or c["zz_t"].a != ("z",)
    c = _explain_arrays({"z": z}, {"t": np.ascontiguousarray(z.T)})
    assert c["t"].kind == "transposed" and c["t"].a == ("z",)


def test_constant_matched_only_by_an_unrelated_name_is_a_constant():
    """Zeros equal to a differently named A tensor of zeros are a constant (values carry no evidence);
    a related name keeps the rename, and a non-constant tensor is renamed whatever its name."""
    import numpy as np

    from statemap.correspond import explain
    from statemap.meta import TensorMeta

    av = {
        "layers.1.fc2_bias": np.zeros(6, np.float32),
        "enc.ln.bias": np.zeros(4, np.float32),
        "proj.w": np.arange(8, dtype=np.float32),
    }
    bv = {
        "embeddings.token_type.weight": np.zeros((1, 6), np.float32),
        "model.ln.bias": np.zeros(4, np.float32),
        "head.kernel": np.arange(8, dtype=np.float32),
    }
    meta = lambda d: {k: TensorMeta(k, v.shape, "float32") for k, v in d.items()}  # noqa: E731
    ex = explain(meta(av), av.__getitem__, meta(bv), bv.__getitem__)
    kinds = {c.b: (c.kind, c.a) for c in ex.b}
    assert kinds["embeddings.token_type.weight"][0] == "constant"
    assert "A:layers.1.fc2_bias holds the same values" in next(c.detail for c in ex.b if c.b.startswith("embeddings"))
    assert kinds["model.ln.bias"] == ("renamed", ("enc.ln.bias",))
    assert kinds["head.kernel"] == ("renamed", ("proj.w",))


def test_spec_diff_of_what_apply_wrote_with_tied_dedupe_is_the_same(root, tmp_path, capsys):
    """The catalog's DeltaLM spec writes the tied embedding once (`tied: dedupe`); `diff --spec` of
    exactly what `apply` wrote says same, and names what the loader re-ties. A B that lost the kept
    name, or holds wrong values under it, still differs."""
    src = root / "examples" / "deltalm-tiny.pt"
    out = tmp_path / "hf.safetensors"
    assert main(["apply", "deltalm-fairseq-to-hf", str(src), str(out), "-q"]) == 0  # the spec's own tied: dedupe
    code = main(["diff", str(src), str(out), "--spec", "deltalm-fairseq-to-hf", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 0 and d["same"] and d["only_in_a"] == []
    assert sorted(d["retied_on_load"]) == ["lm_head.weight", "model.encoder.embed_tokens.weight"]
    assert all("re-tied on load" in v and "deltalm-fairseq-to-hf.yaml:" in v for v in d["retied_on_load"].values())
    assert main(["diff", str(src), str(out), "--spec", "deltalm-fairseq-to-hf"]) == 0
    assert "the loader re-ties them): 2" in capsys.readouterr().out
    sd = load_file(str(out))
    kept = "model.shared.weight"
    broken = {k: v for k, v in sd.items() if k != kept}
    save_file(broken, str(tmp_path / "lost.safetensors"))
    code = main(["diff", str(src), str(tmp_path / "lost.safetensors"), "--spec", "deltalm-fairseq-to-hf", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 1 and sorted(m["name"] for m in d["only_in_a"]) == ["model.encoder.embed_tokens.weight", kept]
    assert list(d["retied_on_load"]) == ["lm_head.weight"]  # its group's kept name is still in B
    changed = dict(sd)
    changed[kept] = sd[kept].clone()
    changed[kept][3] += 1
    save_file(changed, str(tmp_path / "changed.safetensors"))
    code = main(["diff", str(src), str(tmp_path / "changed.safetensors"), "--spec", "deltalm-fairseq-to-hf", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 1 and [v["name"] for v in d["values"] if not v["allclose"]] == [kept]
