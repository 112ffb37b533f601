"""Target checks without weights: --expect hf:ModelClass --config config.json (meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import statemap
from statemap.cli import main

pytestmark = pytest.mark.transformers

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


def test_diff_against_a_class(root, tmp_path):
    cfg = _config_for_ckpt(root, tmp_path)
    out = tmp_path / "hf.safetensors"
    statemap.convert("nanogpt-to-gpt2-hf", root / CKPT, out)
    assert main(["diff", str(out), "hf:GPT2LMHeadModel", "--config", str(cfg), "-q"]) == 0
    assert main(["diff", "hf:GPT2LMHeadModel", str(out), "--config", str(cfg), "-q"]) == 0
    assert main(["diff", str(out), "hf:GPT2Model", "--config", str(cfg), "-q"]) == 1  # the check can fail


@pytest.mark.flax
def test_diff_against_a_flax_class(root, tmp_path):
    cfg = _config_for_ckpt(root, tmp_path)
    # the tied lm_head is left out as save_pretrained does (tied="dedupe"): a separate COPY of it
    # (tied: clone) reads as an untied head and becomes lm_head.kernel (see gpt2-pt-to-flax)
    statemap.convert("nanogpt-to-gpt2-hf", root / CKPT, tmp_path / "dedupe.safetensors", tied="dedupe")
    flax = tmp_path / "flax_model.msgpack"
    statemap.convert("gpt2-pt-to-flax", tmp_path / "dedupe.safetensors", flax)
    assert main(["diff", str(flax), "hf:FlaxGPT2LMHeadModel", "--config", str(cfg), "-q"]) == 0


def test_flax_class_under_transformers_5_says_what_to_do(root, monkeypatch, capsys):
    """transformers 5 removed the Flax classes: say so and what to do, not "no model class"
    (under 4.x the major version is patched to 5 to check the message; the test runs under both)."""
    from hf_compat import TF_MAJOR

    from statemap.load import hf_meta

    if TF_MAJOR < 5:
        monkeypatch.setattr(hf_meta, "transformers_major", lambda: 5)
    monkeypatch.chdir(root)
    assert main(["diff", CKPT, "hf:FlaxGPT2LMHeadModel", "--config", "tests/fixtures/gpt2/hf"]) == 2
    err = capsys.readouterr().err
    assert "has no Flax classes (they were removed in transformers 5)" in err
    assert "install transformers<5" in err and "reference file" in err
    assert "no model class" not in err


# -- transformers 5: models whose weights are renamed in memory ------------------------------------


def _vit_config(tmp_path):
    from test_catalog_vit import _hf_vit_config_for_timm

    cfg = _hf_vit_config_for_timm()
    cfg.save_pretrained(tmp_path / "cfg")
    return cfg, tmp_path / "cfg" / "config.json"


def test_catalog_vit_output_is_what_save_pretrained_writes(tmp_path):
    """The correct vit-timm-to-hf output checks clean under 4.x and 5.x (under 5.x the in-memory
    names differ: 32 missing + 32 unexpected when they were compared), and the layout it is checked
    against is exactly the one the real save_pretrained writes."""
    from hf_compat import TF_MAJOR
    from safetensors import safe_open
    from test_catalog_vit import TIMM
    from transformers import ViTForImageClassification

    cfg, cfg_file = _vit_config(tmp_path)
    r = statemap.convert("vit-timm-to-hf", TIMM, dry_run=True, expect="hf:ViTForImageClassification", config=cfg_file)
    assert r.ok and not (r.missing or r.unexpected or r.shape_mismatch or r.dtype_mismatch), r.expected
    if TF_MAJOR >= 5:
        assert "checkpoint names" in r.expected
    ViTForImageClassification(cfg).save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert saved == {m.name: m.shape for m in r.produced}
    # the check can fail: the headless class has a pooler and no classifier
    r = statemap.convert("vit-timm-to-hf", TIMM, dry_run=True, expect="hf:ViTModel", config=cfg_file)
    assert not r.ok and "pooler.dense.weight" in {m.name for m in r.missing}
    assert "classifier.weight" in {m.name for m in r.unexpected}


@pytest.mark.parametrize("spec", ["vit-timm-to-hf", "vit-hf-to-clip-vision"])
def test_catalog_output_checks_clean_and_loads_with_from_pretrained(tmp_path, spec):
    """Under 5.x ViT renames its weights in memory and CLIPVisionModel drops its vision_model.
    prefix; the catalog's output (the checkpoint names) checks clean against the class, and the
    real from_pretrained loads the written file with nothing missing or unexpected."""
    import test_catalog_vit as v
    import transformers
    from hf_compat import loading_problems

    src, cls, cfg = {
        "vit-timm-to-hf": (v.TIMM, "ViTForImageClassification", v._hf_vit_config_for_timm()),
        "vit-hf-to-clip-vision": (v.HF_VIT, "CLIPVisionModel", v._clip_config()),
    }[spec]
    out = tmp_path / "out"
    cfg.save_pretrained(out)
    r = statemap.convert(spec, src, out / "model.safetensors", expect=f"hf:{cls}", config=out)
    assert r.ok and r.produced and not (r.missing or r.unexpected or r.shape_mismatch or r.dtype_mismatch), r.expected
    _, info = getattr(transformers, cls).from_pretrained(out, output_loading_info=True)
    assert loading_problems(info) == {}, info
    assert main(["diff", str(out / "model.safetensors"), f"hf:{cls}", "--config", str(out), "-q"]) == 0


def test_in_memory_names_are_accepted_as_from_pretrained_accepts_them(tmp_path):
    """A file holding a model's ``state_dict()`` (under 5.x: the in-memory names) and the file
    ``save_pretrained`` writes both load with from_pretrained, and both check clean; a file that
    mixes them checks dirty."""
    from hf_compat import TF_MAJOR, loading_problems
    from safetensors.torch import save_file
    from transformers import ViTForImageClassification

    from statemap.load.hf_meta import hf_layout

    cfg, cfg_file = _vit_config(tmp_path)
    model = ViTForImageClassification(cfg)
    model.save_pretrained(tmp_path / "saved")
    mem_dir = tmp_path / "mem"
    cfg.save_pretrained(mem_dir)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, mem_dir / "model.safetensors")
    for d in (tmp_path / "saved", mem_dir):
        _, info = ViTForImageClassification.from_pretrained(d, output_loading_info=True)
        assert loading_problems(info) == {}, (d, info)
        assert main(["diff", str(d / "model.safetensors"), "hf:ViTForImageClassification", "--config", str(cfg_file), "-q"]) == 0
    ck = hf_layout("hf:ViTForImageClassification", cfg_file, closest_to=list(sd))
    assert set(ck.metas) == set(sd)
    if TF_MAJOR >= 5:
        assert "in-memory names" in ck.path and set(hf_layout("hf:ViTForImageClassification", cfg_file).metas) != set(sd)
        mixed = dict(sd)
        mixed["vit.encoder.layer.0.attention.attention.query.weight"] = mixed.pop("vit.layers.0.attention.q_proj.weight")
        save_file(mixed, tmp_path / "mixed.safetensors")
        assert (
            main(["diff", str(tmp_path / "mixed.safetensors"), "hf:ViTForImageClassification", "--config", str(cfg_file), "-q"])
            == 1
        )


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


_RENAMED_IN_5 = {
    "ViTForImageClassification",
    "ViTModel",
    "DeiTModel",
    "CLIPVisionModel",
    "CLIPTextModel",
    "SiglipVisionModel",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "GPTNeoXForCausalLM",
}
_LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "hf_layouts" / "layouts.json").read_text())


@pytest.mark.parametrize("cls", sorted(_LAYOUTS))
def test_hf_class_layout_is_the_one_transformers_4_wrote(tmp_path, cls):
    """hf:Class builds, under the installed transformers, the names and shapes transformers 4.57.6
    wrote for the same config (fixtures/hf_layouts, make_fixtures.py there). Under 5.x, nine of
    these classes hold other names in memory (ViT, DeiT, CLIP towers, SigLIP, Mixtral, Qwen2-MoE,
    GPT-NeoX): their checkpoint names come from transformers' own conversion mapping."""
    from hf_compat import TF_MAJOR

    from statemap.load.hf_meta import hf_layout

    (tmp_path / "config.json").write_text(json.dumps(_LAYOUTS[cls]["config"]))
    want = {k: tuple(v) for k, v in _LAYOUTS[cls]["keys"].items()}
    ck = hf_layout(f"hf:{cls}", tmp_path / "config.json")
    assert {k: m.shape for k, m in ck.metas.items()} == want
    # under 5.x the label says which layout it is exactly for the classes renamed in memory
    assert ("checkpoint names" in ck.path) == (TF_MAJOR >= 5 and cls in _RENAMED_IN_5), ck.path
    assert hf_layout(f"hf:{cls}", tmp_path / "config.json", closest_to=list(want)).metas.keys() == want.keys()


def test_the_transformers_5_ci_extra_matches_the_test_extra(root):
    """CI's second run installs the test-tf5 extra: transformers 5.x, every other pin as in `test`."""
    import re

    text = (root / "pyproject.toml").read_text()
    pins = {
        name: dict(re.findall(r'"([\w.-]+)==([^"]+)"', re.search(rf"^{name} = \[(.*?)^\]", text, re.S | re.M).group(1)))
        for name in ("test", "test-tf5")
    }
    assert pins["test"]["transformers"].startswith("4.") and pins["test-tf5"]["transformers"].startswith("5.")
    for pkg, v in pins["test-tf5"].items():
        assert pkg == "transformers" or pins["test"][pkg] == v, pkg
    ci = (root / ".ci" / "run").read_text()
    assert '-e ".[test-tf5]"' in ci and '-m "transformers and not flax"' in ci
