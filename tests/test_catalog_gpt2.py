"""GPT-2 family: Hugging Face GPT2LMHeadModel <-> nanoGPT (Karpathy), proven by logits.

nanoGPT is not a pip package (PyPI's `nano-gpt` is a different project with its own names and
dependencies), so the nanoGPT side is `NanoGPT` below: a GPT-2 forward written from the GPT-2
architecture with the module names nanoGPT's model.py gives its parameters (nn.Linear [out, in],
fused c_attn, pre-LN blocks, lm_head tied to wte, LayerNorm eps 1e-5, exact nn.GELU() as nanoGPT
uses; `gelu_approximate="tanh"` gives GPT-2's gelu_new). The HF side is the real transformers
4.57.6 GPT2LMHeadModel.

Fixtures (tests/fixtures/gpt2/, written by make_fixtures.py):
- hf/ : GPT2LMHeadModel.save_pretrained (config.json + model.safetensors, no lm_head.weight),
  hf_reference.safetensors: input_ids and the HF model's logits;
- ckpt.pt : nanoGPT's train.py container with `_orig_mod.` keys (real torch.compile wrapper),
  AdamW state, tied wte / lm_head storage; nano_reference.safetensors: idx and NanoGPT's logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import statemap
from statemap.errors import AssumptionError

pytestmark = pytest.mark.transformers

FIX = Path(__file__).resolve().parent / "fixtures" / "gpt2"
HF_DIR = FIX / "hf"
NANO_CKPT = FIX / "ckpt.pt"
TOL = 1e-5


# --------------------------------------------------------------------------------------------
# the target / source model on the nanoGPT side


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool = True) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.n_head)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, n_embd: int, gelu_approximate: str, bias: bool = True) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU(approximate=gelu_approximate)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, gelu_approximate: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLP(n_embd, gelu_approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """GPT-2 with nanoGPT's parameter names (GPTConfig bias=True, flash attention: no mask buffer)."""

    def __init__(
        self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, gelu_approximate: str = "none"
    ) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                h=nn.ModuleList([Block(n_embd, n_head, gelu_approximate) for _ in range(n_layer)]),
                ln_f=nn.LayerNorm(n_embd, eps=1e-5),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # logits at every position


def nano_from_args(model_args: dict[str, Any], gelu_approximate: str = "none") -> NanoGPT:
    assert model_args["bias"] is True and model_args["dropout"] == 0.0
    return NanoGPT(
        model_args["vocab_size"],
        model_args["block_size"],
        model_args["n_layer"],
        model_args["n_head"],
        model_args["n_embd"],
        gelu_approximate,
    )


def hf_from_nano_args(model_args: dict[str, Any], activation: str = "gelu"):
    """The GPT2Config equivalent to a nanoGPT model_args (what docs/mappings/gpt2.md prescribes)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=model_args["vocab_size"],
        n_positions=model_args["block_size"],
        n_embd=model_args["n_embd"],
        n_layer=model_args["n_layer"],
        n_head=model_args["n_head"],
        activation_function=activation,
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def _nano_ckpt() -> dict[str, Any]:
    return torch.load(NANO_CKPT, map_location="cpu", weights_only=False)


def _hf_model():
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(HF_DIR).eval()


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------
# HF -> nanoGPT


def test_hf_fixture_is_what_save_pretrained_writes():
    sd = load_file(HF_DIR / "model.safetensors")
    assert "lm_head.weight" not in sd  # save_pretrained drops the tied duplicate
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D [in, out]
    assert not any(k.endswith((".attn.bias", ".attn.masked_bias")) for k in sd)  # mask buffers
    # the fixture's weights are perturbed away from the init (biases non-zero, LN not 1/0)
    assert sd["transformer.h.1.mlp.c_fc.bias"].abs().min() > 0
    assert (sd["transformer.h.1.ln_2.weight"] - 1).abs().min() > 0


def _hf_to_nano_model(tmp_path: Path, gelu_approximate: str) -> tuple[NanoGPT, dict[str, torch.Tensor]]:
    cfg = json.loads((HF_DIR / "config.json").read_text())
    out = tmp_path / "nano.pt"
    report = statemap.convert("gpt2-hf-to-nanogpt", HF_DIR, out)
    assert report.passthrough == [] and report.dropped == []
    assert report.tied == [["transformer.wte.weight", "lm_head.weight"]]
    sd = torch.load(out, weights_only=True)
    # one storage for the tied pair, as torch.save of a nanoGPT model writes it
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    nano = NanoGPT(cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"], gelu_approximate)
    assert set(sd) == set(nano.state_dict())
    nano.load_state_dict(sd, strict=True)
    return nano.eval(), sd


def test_hf_to_nanogpt_logits_equal(tmp_path):
    ref = load_file(FIX / "hf_reference.safetensors")
    cfg = json.loads((HF_DIR / "config.json").read_text())
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    # GPT-2's activation is the tanh GELU: the target forward uses it to prove the weight mapping
    nano, _ = _hf_to_nano_model(tmp_path, "tanh")
    with torch.no_grad():
        got = nano(ref["input_ids"])
    diff = _maxdiff(got, ref["logits"])
    print(f"hf -> nanogpt: max abs diff {diff:.3e}")
    assert diff <= TOL

    # stock nanoGPT computes exact GELU: a model difference (as in nanoGPT's from_pretrained),
    # visible on these perturbed weights, and it shows the comparison can fail
    (tmp_path / "exact").mkdir()
    exact, _ = _hf_to_nano_model(tmp_path / "exact", "none")
    with torch.no_grad():
        gap = _maxdiff(exact(ref["input_ids"]), ref["logits"])
    print(f"hf (gelu_new) -> nanogpt (exact GELU): max abs diff {gap:.3e}")
    assert gap > 1e-4


def test_hf_state_dict_in_memory_with_lm_head(tmp_path):
    """GPT2LMHeadModel.state_dict() carries lm_head.weight: it is dropped and re-tied from wte."""
    hf = _hf_model()
    sd = hf.state_dict()
    assert "lm_head.weight" in sd
    new, report = statemap.map_state_dict("gpt2-hf-to-nanogpt", sd)
    assert report.dropped == ["lm_head.weight"]
    assert new["lm_head.weight"] is new["transformer.wte.weight"]
    for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert torch.equal(new[f"transformer.h.1.{k}.weight"], sd[f"transformer.h.1.{k}.weight"].t())
        assert torch.equal(new[f"transformer.h.1.{k}.bias"], sd[f"transformer.h.1.{k}.bias"])


def test_untransposed_square_weight_is_caught(root):
    """attn.c_proj.weight is square [d, d]: left untransposed it still loads strictly, and only
    the logits catch it. The catalog spec with that one transpose narrowed must fail."""
    import yaml

    spec = yaml.safe_load((root / "mappings" / "gpt2-hf-to-nanogpt.yaml").read_text())
    rules = spec["rules"]
    i = rules.index({"transpose": "transformer.h.{i}.attn.c_proj.weight"})
    rules[i] = {"keep": "transformer.h.{i}.attn.c_proj.weight"}
    ref = load_file(FIX / "hf_reference.safetensors")
    cfg = json.loads((HF_DIR / "config.json").read_text())
    new, _ = statemap.map_state_dict(spec, load_file(HF_DIR / "model.safetensors"))
    nano = NanoGPT(cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"], "tanh")
    nano.load_state_dict(new, strict=True)
    with torch.no_grad():
        assert _maxdiff(nano.eval()(ref["input_ids"]), ref["logits"]) > 1e-2


def test_legacy_hf_layout_with_mask_buffers(tmp_path):
    """Older checkpoints: saved from GPT2Model (no transformer. prefix) with attn.bias /
    attn.masked_bias buffers (as transformers < 4.3x wrote them). Same output as the new layout."""
    hf = _hf_model()
    n = hf.config.n_positions
    legacy: dict[str, torch.Tensor] = {}
    for k, v in hf.transformer.state_dict().items():
        legacy[k] = v.clone()
        if k.endswith("attn.c_proj.bias"):
            i = k.split(".")[1]
            legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    assert "wte.weight" in legacy and "h.0.attn.bias" in legacy
    report = statemap.convert("gpt2-hf-to-nanogpt", tmp_path / "pytorch_model.bin", tmp_path / "nano.safetensors")
    assert sorted(report.dropped) == [f"transformer.h.{i}.attn.{b}" for i in (0, 1) for b in ("bias", "masked_bias")]
    got = load_file(tmp_path / "nano.safetensors")
    want, _ = statemap.map_state_dict("gpt2-hf-to-nanogpt", hf.state_dict())
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_hf_nanogpt_hf_round_trip_is_bitwise(tmp_path):
    src = load_file(HF_DIR / "model.safetensors")
    statemap.convert("gpt2-hf-to-nanogpt", HF_DIR, tmp_path / "nano.safetensors")
    report = statemap.convert("nanogpt-to-gpt2-hf", tmp_path / "nano.safetensors", tmp_path / "hf.safetensors")
    assert report.dropped == ["lm_head.weight"]
    back = load_file(tmp_path / "hf.safetensors")
    hf = _hf_model()
    assert set(back) == set(hf.state_dict())  # what strict loading needs, lm_head.weight included
    assert set(back) - set(src) == {"lm_head.weight"}
    for k, v in src.items():
        assert v.dtype == back[k].dtype and torch.equal(v, back[k]), k
    assert torch.equal(back["lm_head.weight"], src["transformer.wte.weight"])


# --------------------------------------------------------------------------------------------
# nanoGPT -> HF


def test_nano_fixture_is_a_compiled_training_checkpoint():
    ck = _nano_ckpt()
    assert set(ck) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert all(k.startswith("_orig_mod.") for k in ck["model"])
    m = ck["model"]
    assert m["_orig_mod.lm_head.weight"].data_ptr() == m["_orig_mod.transformer.wte.weight"].data_ptr()
    assert ck["optimizer"]["state"]  # AdamW moments, tensors outside the model dict
    assert m["_orig_mod.transformer.h.1.attn.c_attn.weight"].shape == (24, 8)  # nn.Linear [3d, d]


def test_nanogpt_ckpt_to_hf_logits_equal(tmp_path):
    from transformers import GPT2LMHeadModel

    ck = _nano_ckpt()
    ref = load_file(FIX / "nano_reference.safetensors")
    out = tmp_path / "model.safetensors"
    report = statemap.convert("nanogpt-to-gpt2-hf", NANO_CKPT, out)
    assert report.container == "model" and report.stripped_prefix == "_orig_mod."
    assert report.dropped == ["lm_head.weight"] and report.passthrough == []
    sd = load_file(out)
    hf = hf_from_nano_args(ck["model_args"])
    assert set(sd) == set(hf.state_dict())
    hf.load_state_dict(sd, strict=True)
    with torch.no_grad():
        got = hf(ref["idx"]).logits
    diff = _maxdiff(got, ref["logits"])
    print(f"nanogpt -> hf: max abs diff {diff:.3e}")
    assert diff <= TOL

    # and through HF's own loader: config.json + the converted model.safetensors
    hf.config.save_pretrained(tmp_path)
    again = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert _maxdiff(again(ref["idx"]).logits, ref["logits"]) <= TOL

    # negative: GPT-2's default gelu_new instead of nanoGPT's exact GELU is caught
    wrong = hf_from_nano_args(ck["model_args"], activation="gelu_new")
    wrong.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert _maxdiff(wrong(ref["idx"]).logits, ref["logits"]) > 1e-4


def test_nano_reference_is_reproduced_by_the_nanogpt_forward():
    """The committed nanoGPT logits come from NanoGPT on the ckpt's own weights."""
    ck = _nano_ckpt()
    ref = load_file(FIX / "nano_reference.safetensors")
    nano = nano_from_args(ck["model_args"]).eval()
    nano.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}, strict=True)
    with torch.no_grad():  # not bitwise: BLAS kernels differ between machines (5.96e-7 seen on CI's kind)
        assert _maxdiff(nano(ref["idx"]), ref["logits"]) <= 1e-5


def test_nanogpt_hf_nanogpt_round_trip_is_bitwise(tmp_path):
    src = {k.removeprefix("_orig_mod."): v for k, v in _nano_ckpt()["model"].items()}
    statemap.convert("nanogpt-to-gpt2-hf", NANO_CKPT, tmp_path / "hf.safetensors")
    statemap.convert("gpt2-hf-to-nanogpt", tmp_path / "hf.safetensors", tmp_path / "nano.pt")
    back = torch.load(tmp_path / "nano.pt", weights_only=True)
    assert set(back) == set(src)
    for k, v in src.items():
        assert v.dtype == back[k].dtype and torch.equal(v, back[k]), k


def test_ddp_prefix_and_mask_buffer(tmp_path):
    """DDP `module.` keys and the attn.bias mask of a non-flash nanoGPT convert the same."""
    m = {k.removeprefix("_orig_mod."): v for k, v in _nano_ckpt()["model"].items()}
    n = m["transformer.wpe.weight"].shape[0]
    ddp = {f"module.{k}": v for k, v in m.items()}
    for i in range(2):
        ddp[f"module.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    torch.save({"model": ddp, "iter_num": 3}, tmp_path / "ckpt.pt")
    report = statemap.convert("nanogpt-to-gpt2-hf", tmp_path / "ckpt.pt", tmp_path / "a.safetensors")
    assert report.stripped_prefix == "module."
    assert sorted(report.dropped) == ["lm_head.weight", "transformer.h.0.attn.bias", "transformer.h.1.attn.bias"]
    statemap.convert("nanogpt-to-gpt2-hf", NANO_CKPT, tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bias_free_nanogpt_is_refused(tmp_path):
    """train.py's default bias=False has no .bias tensors; HF GPT-2 cannot hold that: error."""
    m = {k.removeprefix("_orig_mod."): v for k, v in _nano_ckpt()["model"].items()}
    nobias = {k: v for k, v in m.items() if not k.endswith(".bias")}
    torch.save({"model": nobias}, tmp_path / "ckpt.pt")
    with pytest.raises(statemap.PlanError, match="bias"):
        statemap.convert("nanogpt-to-gpt2-hf", tmp_path / "ckpt.pt", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_untied_head_is_refused_both_ways_and_nothing_is_written(tmp_path):
    """nanoGPT always ties lm_head to wte; an untied head must fail loudly, never be dropped."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=False)
    hf = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.transformer.wte.weight + 0.25)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "nano.pt"
    with pytest.raises(
        AssumptionError,
        match=r"assumes 'lm_head\.weight' equals 'transformer\.wte\.weight', but they differ \(max abs diff 0\.25",
    ):
        statemap.convert("gpt2-hf-to-nanogpt", tmp_path / "hf", out)
    assert not out.exists()
    m = {k.removeprefix("_orig_mod."): v.clone() for k, v in _nano_ckpt()["model"].items()}
    m["lm_head.weight"] = m["transformer.wte.weight"] + 1.0  # separate storage, other values
    torch.save({"model": m}, tmp_path / "ckpt.pt")
    with pytest.raises(AssumptionError, match=r"'lm_head\.weight' equals 'transformer\.wte\.weight'"):
        statemap.convert("nanogpt-to-gpt2-hf", tmp_path / "ckpt.pt", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    m["lm_head.weight"] = m["transformer.wte.weight"].clone()  # separate storage, equal bytes: fine
    torch.save({"model": m}, tmp_path / "ckpt.pt")
    report = statemap.convert("nanogpt-to-gpt2-hf", tmp_path / "ckpt.pt", tmp_path / "o.safetensors")
    assert any("bytes compared" in a for a in report.assumptions)


def test_wrong_direction_is_refused_both_ways_and_nothing_is_written(tmp_path):
    """The two layouts have the same key names; only the shapes tell them apart. Each spec given
    the other side's checkpoint (real files: save_pretrained's, a nanoGPT training ckpt.pt, and
    statemap's own output converted twice) stops at the first Conv1D / nn.Linear weight whose
    shape is the other layout's, naming the rule, both shapes and the spec to use."""
    out = tmp_path / "o.safetensors"
    with pytest.raises(
        statemap.PlanError,
        match=r"gpt2-hf-to-nanogpt\.yaml:\d+: .*assumes 'transformer\.h\.0\.attn\.c_attn\.weight' has shape \[8, \*\] "
        r"\(\[\{dim: 1, of: transformer\.wte\.weight\}, \*\]\), but it is \[24, 8\].*use nanogpt-to-gpt2-hf",
    ):
        statemap.convert("gpt2-hf-to-nanogpt", NANO_CKPT, out)
    assert not out.exists()
    with pytest.raises(
        statemap.PlanError,
        match=r"nanogpt-to-gpt2-hf\.yaml:\d+: .*has shape \[\*, 32\].*but it is \[32, 96\].*use gpt2-hf-to-nanogpt",
    ):
        statemap.convert("nanogpt-to-gpt2-hf", HF_DIR, out)
    assert not out.exists()
    statemap.convert("gpt2-hf-to-nanogpt", HF_DIR, tmp_path / "nano.safetensors")
    with pytest.raises(statemap.PlanError, match=r"c_attn\.weight' has shape \[32, \*\].*but it is \[96, 32\]"):
        statemap.convert("gpt2-hf-to-nanogpt", tmp_path / "nano.safetensors", out)  # converted twice
    assert not out.exists()
    # the reverse of each spec carries its shape checks (transposed): HF given to the reverse
    # of hf->nanogpt is refused, nanoGPT output converted back is accepted
    with pytest.raises(
        statemap.PlanError, match=r"inverse of .*mlp\.c_proj\.weight' has shape \[32, \*\].*but it is \[128, 32\]"
    ):
        statemap.convert("gpt2-hf-to-nanogpt", HF_DIR, out, reverse=True, accept_loss=["all"])
    assert not out.exists()
    back = tmp_path / "back.safetensors"
    assert statemap.convert("gpt2-hf-to-nanogpt", tmp_path / "nano.safetensors", back, reverse=True, accept_loss=["all"])
    # the checks use shapes only: the right direction of both files still plans (and the other
    # tests prove the values)
    for spec, src in (("gpt2-hf-to-nanogpt", HF_DIR), ("nanogpt-to-gpt2-hf", NANO_CKPT)):
        assert statemap.convert(spec, src, tmp_path / f"{spec}.safetensors", dry_run=True).produced


# --------------------------------------------------------------------------------------------
# streaming fixtures (tests/test_streaming.py)


def _hf_fixture(tmp: Path) -> tuple[Path, dict[str, Any]]:
    return HF_DIR, {}


def _nano_fixture(tmp: Path) -> tuple[Path, dict[str, Any]]:
    return NANO_CKPT, {}


STREAMING_FIXTURES = {
    "gpt2-hf-to-nanogpt": _hf_fixture,
    "nanogpt-to-gpt2-hf": _nano_fixture,
}
