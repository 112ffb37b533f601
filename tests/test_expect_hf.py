"""Target checks without weights: --expect hf:ModelClass --config config.json (meta device)."""

from __future__ import annotations

import json

import pytest

import statemap
from statemap.cli import main

CKPT = "tests/fixtures/gpt2/ckpt.pt"


def _config_for_ckpt(root, tmp_path):
    from transformers import GPT2Config

    with statemap.open_checkpoint(root / CKPT) as ck:
        a = ck.extras["model_args"]
    cfg = GPT2Config(
        n_embd=a["n_embd"], n_layer=a["n_layer"], n_head=a["n_head"], vocab_size=a["vocab_size"], n_positions=a["block_size"]
    )
    cfg.save_pretrained(tmp_path)
    return tmp_path / "config.json"


def test_dry_run_against_the_target_class_passes_and_fails_correctly(root, tmp_path, capsys):
    cfg = _config_for_ckpt(root, tmp_path)
    report = statemap.convert("nanogpt-to-gpt2-hf", root / CKPT, dry_run=True, expect="hf:GPT2LMHeadModel", config=cfg)
    assert report.ok and report.expected.startswith("hf:GPT2LMHeadModel") and len(report.produced) > 20
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({**json.loads(cfg.read_text()), "n_embd": 16}))
    code = main(
        [
            "apply",
            "nanogpt-to-gpt2-hf",
            str(root / CKPT),
            "--dry-run",
            "--json",
            "--expect",
            "hf:GPT2LMHeadModel",
            "--config",
            str(wrong),
        ]
    )
    d = json.loads(capsys.readouterr().out)
    assert code == 1 and d["ok"] is False
    assert {"name": "transformer.wte.weight", "expected": [32, 16], "got": [32, 8]} in d["shape_mismatch"]


def test_drop_a_needed_key_shows_it_missing(root, tmp_path):
    cfg = _config_for_ckpt(root, tmp_path)
    spec = statemap.load_spec("nanogpt-to-gpt2-hf")
    spec = spec.__class__(
        **{
            **spec.__dict__,
            "rules": spec.rules + statemap.load_spec("name: x\nversion: 1\nrules:\n  - drop: lm_head.weight\n").rules,
        }
    )
    report = statemap.convert(spec, root / CKPT, dry_run=True, expect="hf:GPT2LMHeadModel", config=cfg)
    assert [m.name for m in report.missing] == ["lm_head.weight"] and not report.ok


def test_diff_against_a_class_and_flax_target(root, tmp_path, capsys):
    cfg = _config_for_ckpt(root, tmp_path)
    out = tmp_path / "hf.safetensors"
    statemap.convert("nanogpt-to-gpt2-hf", root / CKPT, out)
    assert main(["diff", str(out), "hf:GPT2LMHeadModel", "--config", str(cfg), "-q"]) == 0
    # the tied lm_head is left out as save_pretrained does (tied="dedupe"): a separate COPY of it
    # (tied: clone) reads as an untied head and becomes lm_head.kernel (see gpt2-pt-to-flax)
    statemap.convert("nanogpt-to-gpt2-hf", root / CKPT, tmp_path / "dedupe.safetensors", tied="dedupe")
    flax = tmp_path / "flax_model.msgpack"
    statemap.convert("gpt2-pt-to-flax", tmp_path / "dedupe.safetensors", flax)
    assert main(["diff", str(flax), "hf:FlaxGPT2LMHeadModel", "--config", str(cfg), "-q"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["diff", CKPT, "hf:GPT2LMHeadModel"], r"hf:GPT2LMHeadModel: needs the model's config\.json \(--config PATH\)"),
        (
            ["diff", CKPT, "hf:GPT2LMHeadModle", "--config", "tests/fixtures/gpt2/hf"],
            r"no model class 'GPT2LMHeadModle'; did you mean 'GPT2LMHeadModel'\?",
        ),
        (["diff", CKPT, "hf:GPT2LMHeadModel", "--config", "tests/fixtures/gpt2/hf", "--values"], r"--values needs tensor values"),
    ],
)
def test_bad_hf_targets(root, capsys, argv, message, monkeypatch):
    import re

    monkeypatch.chdir(root)
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
