"""Reverse conversion: apply then inverse is the identity, bitwise, for lossless specs."""

from __future__ import annotations

import json

import pytest
import torch
from catalog_fixtures import FIXTURES, spec_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import statemap
from statemap.catalog import names
from statemap.cli import main
from statemap.invert import invert


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def _round_trip(spec: dict | statemap.Spec, sd: dict) -> dict:
    fwd = statemap.load_spec(spec)
    mid, _ = statemap.map_state_dict(fwd, sd)
    inv = invert(fwd)
    assert inv.lossless, inv.lost
    back, report = statemap.map_state_dict(inv.spec, mid)
    assert report.passthrough == [] or not fwd.strict
    return back


@st.composite
def lossless_case(draw):
    """A random state dict and a random spec built only from invertible rules."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    n_layers = draw(st.integers(1, 4))
    d = draw(st.sampled_from([2, 4, 6]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64]))
    sd = {}
    for i in range(n_layers):
        sd[f"enc.layers.{i}.in_proj.weight"] = torch.randn(3 * d, d, generator=g).to(dtype)
        sd[f"enc.layers.{i}.norm.bias"] = torch.randn(d, generator=g).to(dtype)
    sd["emb.weight"] = torch.randn(5, d, generator=g).to(dtype)
    sd["conv.weight"] = torch.randn(4, 3, 2, 2, generator=g).to(dtype)
    a, b = draw(st.integers(1, 3)), draw(st.integers(0, 4))
    rules: list[dict] = []
    if draw(st.booleans()):
        rules.append({"split": {"from": "enc.layers.{i}.in_proj.weight", "to": [f"L.{{{a}*i+{b}}}.{x}.w" for x in "qkv"]}})
        if draw(st.booleans()):
            rules.append({"transpose": {"from": "L.{j}.k.w", "to": "L.{j}.k.kernel"}})
    else:
        rules.append({"rename": f"enc.layers.{{i:int}}.in_proj.weight -> blocks.{{{a}*i+{b}}}.qkv"})
    rules.append({"rename": {"from": "enc.{rest:path}.bias", "to": "model.{rest}.beta"}})
    if draw(st.booleans()):
        rules.append({"copy": {"from": "emb.weight", "to": ["shared.weight", "lm_head.weight"]}})
    else:
        rules.append({"tie": {"from": "emb.weight", "to": ["emb.weight", "out.weight"]}})
    perm = draw(st.permutations([0, 1, 2, 3]))
    rules.append({"permute": {"from": "conv.weight", "to": "conv.kernel", "dims": list(perm)}})
    rules.append({"inject": {"to": "extra.bias", "shape": [1, d], "value": 0}})
    return sd, {"name": "gen", "version": 1, "strict": True, "rules": rules}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lossless_case())
def test_generated_lossless_specs_round_trip_bitwise(case):
    sd, spec = case
    _same(_round_trip(spec, sd), sd)


INVERTIBLE = []
for _name in names():
    if invert(statemap.load_spec(_name)).lossless:
        INVERTIBLE.append(_name)


def test_some_catalog_specs_are_lossless():
    assert {"vit-timm-to-hf", "gpt2-flax-to-pt", "batchnorm-paddle-to-torch"} <= set(INVERTIBLE)


@pytest.mark.parametrize("spec", spec_params([n for n in INVERTIBLE if n in FIXTURES]))
def test_lossless_catalog_spec_round_trips_on_its_fixture(tmp_path, spec):
    src, vars_ = FIXTURES[spec](tmp_path)
    s = statemap.load_spec(spec, vars=vars_)
    if s.inputs is not None:  # several files: one state dict per file in, one flat dict back
        from statemap.load.multi import find_inputs

        per_file = {"/".join(c.values()): statemap.load_state_dict(p) for p, _, c in find_inputs(src, s.inputs)}
        s = s.__class__(**{**s.__dict__, "unwrap": None})
        mid, _ = statemap.map_state_dict(s, per_file)
        back, _ = statemap.map_state_dict(invert(s).spec, mid, vars=vars_)
        # the reverse writes an int capture as the number it stands for: 00/ -> 0/
        _same(
            back, {"/".join(str(int(x)) for x in r.split("/")) + "/" + k: v for r, sd in per_file.items() for k, v in sd.items()}
        )
        return
    with statemap.open_checkpoint(src, s.unwrap, s.strip_prefix) as ck:
        from statemap.torch_adapter import to_torch

        sd = {k: to_torch(ck.read(k), m.dtype) for k, m in ck.metas.items()}
    s = s.__class__(**{**s.__dict__, "unwrap": None, "strip_prefix": ()})
    _same(_round_trip(s, sd), sd)


def test_every_catalog_spec_inverts_and_names_what_it_cannot_restore():
    for name in names():
        inv = invert(statemap.load_spec(name))
        for line in inv.lost + inv.ambiguous:
            # merge over a capture: how many pieces; a concat of a list: the parts' lengths
            fix = "declare `inverse:`" in line or "give `count:`" in line or "give `sizes:`" in line
            assert line.startswith(str(statemap.load_spec(name).path)) and fix, line


def test_declared_inverse_restores_a_lossy_rule(tmp_path):
    sd = {"encoder.version": torch.tensor([1.0]), "encoder.w": torch.randn(5, 2), "v": torch.arange(6.0)}
    spec = {
        "name": "t",
        "version": 1,
        "strict": True,
        "rules": [
            {"drop": "encoder.version", "inverse": {"inject": {"to": "encoder.version", "shape": [1], "value": 1}}},
            {"slice": {"from": "encoder.w", "stop": 3}, "inverse": {"pad": {"from": "encoder.w", "size": 5, "value": 0}}},
            {"keep": "v"},
        ],
    }
    fwd = statemap.load_spec(spec)
    mid, _ = statemap.map_state_dict(fwd, sd)
    inv = invert(fwd)
    assert inv.lossless
    back, _ = statemap.map_state_dict(inv.spec, mid)
    assert torch.equal(back["encoder.version"], sd["encoder.version"])
    assert torch.equal(back["encoder.w"][:3], sd["encoder.w"][:3]) and torch.equal(back["encoder.w"][3:], torch.zeros(2, 2))
    lossy = invert(statemap.load_spec({**spec, "rules": [{"drop": "encoder.version"}, {"keep": "{k:path}"}]}))
    assert len(lossy.lost) == 1 and "rule #1 (drop encoder.version): drop is lossy" in lossy.lost[0]


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"rename": "a.{x}.w -> b.w"}, r"capture \{x\} of 'a\.\{x\}\.w' does not appear in the target"),
        ({"rename": "re:a\\.(?P<i>\\d+) -> b.{i}"}, r"raw regex source cannot be turned back"),
        ({"rename": "a.{i}.w -> b.{i*i}.w"}, r"not an invertible a\*i\+b"),
        ({"merge": {"from": ["a.{i}", "b.{i}"], "to": "c.{i}", "mode": "stack"}}, r"mode: stack needs a declared `inverse:`"),
        ({"cast": {"from": "a", "dtype": "float16"}}, r"cast is lossy: the original dtype"),
    ],
)
def test_not_invertible_is_reported(rule, message):
    import re

    inv = invert(statemap.load_spec({"name": "t", "version": 1, "rules": [rule]}))
    assert len(inv.lost) == 1 and re.search(message, inv.lost[0]), inv.lost


def test_ambiguous_reverse_is_refused_not_guessed(tmp_path):
    """Two rules write keys of one shape ({m}.kernel -> {m}.weight, {m}.scale -> {m}.weight): the
    reverse cannot tell a transposed kernel from a LayerNorm scale, so it refuses."""
    spec = {
        "name": "t",
        "version": 1,
        "rules": [
            {"transpose": {"from": "{m:path}.kernel", "to": "{m}.weight"}},
            {"rename": "{m:path}.scale -> {m}.weight"},
        ],
    }
    inv = invert(statemap.load_spec(spec))
    assert not inv.usable and len(inv.ambiguous) == 1
    assert (
        "rule #2 (rename {m:path}.scale): its reverse would also take keys that rule #1 (transpose {m:path}.kernel)"
        in inv.ambiguous[0]
    )
    src = tmp_path / "a.safetensors"
    statemap.save_state_dict({"ln.weight": torch.ones(3)}, src)
    with pytest.raises(statemap.PlanError, match=r"cannot reverse 't': .* the reverse cannot tell them apart"):
        statemap.convert(spec, src, tmp_path / "o.safetensors", reverse=True)
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_invert_and_apply_reverse(tmp_path, capsys, root):
    out = tmp_path / "back.yaml"
    assert main(["invert", "vit-timm-to-hf", "-o", str(out)]) == 0
    assert statemap.load_spec(out).name == "vit-timm-to-hf-inverse"
    assert main(["invert", "vit-timm-to-hf", "-o", str(out)]) == 2  # exists, no --force
    capsys.readouterr()
    assert main(["invert", "deltalm-fairseq-to-hf", "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["lossless"] is False and d["usable"] is False and len(d["not_restored"]) == 2 and d["ambiguous"]
    timm = root / "tests/fixtures/vit/timm/model.safetensors"
    hf, back = tmp_path / "hf.safetensors", tmp_path / "back.safetensors"
    assert main(["apply", "vit-timm-to-hf", str(timm), str(hf)]) == 0
    assert main(["apply", "vit-timm-to-hf", str(hf), str(back), "--reverse"]) == 0
    src, got = statemap.load_state_dict(timm), statemap.load_state_dict(back)
    _same(got, src)
    capsys.readouterr()
    assert main(["apply", "deltalm-fairseq-to-hf", str(root / "examples/deltalm-tiny.pt"), str(hf), "--force", "--reverse"]) == 2
    assert "cannot reverse 'deltalm-fairseq-to-hf'" in capsys.readouterr().err
