"""The command line: diff / inspect / apply / check / list, exit codes, one-line errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file, save_file
from seed_layouts import xlmr_hf

from statemap.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- diff (acceptance 4) -----------------------------------------------------------------------


def _pair(tmp_path):
    base = {"keep": torch.ones(2, 3), "gone": torch.zeros(4), "reshaped": torch.zeros(2, 2), "retyped": torch.zeros(3)}
    other = {
        "keep": torch.ones(2, 3),
        "added": torch.zeros(1),
        "reshaped": torch.zeros(4),
        "retyped": torch.zeros(3, dtype=torch.float16),
    }
    a, b = tmp_path / "a.pt", tmp_path / "b.safetensors"
    torch.save(base, a)
    save_file(other, b)
    return a, b


def test_diff_shows_each_difference_and_exits_1(tmp_path, capsys):
    a, b = _pair(tmp_path)
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1
    sections = {
        title: out.index(title) for title in ("only in A (1)", "only in B (1)", "shape mismatch (1)", "dtype mismatch (1)")
    }
    assert "gone" in out[sections["only in A (1)"] : sections["only in B (1)"]]
    assert "added" in out[sections["only in B (1)"] : sections["shape mismatch (1)"]]
    assert "reshaped" in out[sections["shape mismatch (1)"] : sections["dtype mismatch (1)"]]
    assert "retyped" in out[sections["dtype mismatch (1)"] :]
    code, out, _ = run(capsys, "diff", a, b, "--json")
    d = json.loads(out)
    assert code == 1 and d["same"] is False
    assert [m["name"] for m in d["only_in_a"]] == ["gone"]
    assert [m["name"] for m in d["only_in_b"]] == ["added"]
    assert d["shape_mismatch"] == [{"name": "reshaped", "expected": [2, 2], "got": [4]}]
    assert d["dtype_mismatch"] == [{"name": "retyped", "expected": "float32", "got": "float16"}]


def test_diff_identical_exits_0_across_formats(tmp_path, capsys):
    sd = {"w": torch.randn(3, 4), "b": torch.randn(4).to(torch.bfloat16)}
    torch.save(sd, tmp_path / "a.pt")
    save_file(sd, tmp_path / "b.safetensors")
    code, out, _ = run(capsys, "diff", tmp_path / "a.pt", tmp_path / "b.safetensors", "--values")
    assert code == 0 and "same" in out and "2/2 allclose" in out


def test_diff_values_finds_changed_tensor(tmp_path, capsys):
    sd = {"w": torch.zeros(3, 4), "v": torch.ones(2)}
    torch.save(sd, tmp_path / "a.pt")
    sd2 = {"w": torch.zeros(3, 4), "v": torch.tensor([1.0, 1.5])}
    torch.save(sd2, tmp_path / "b.pt")
    assert run(capsys, "diff", tmp_path / "a.pt", tmp_path / "b.pt")[0] == 0  # metadata equal
    code, out, _ = run(capsys, "diff", tmp_path / "a.pt", tmp_path / "b.pt", "--values", "--json")
    d = json.loads(out)
    assert code == 1
    assert {v["name"]: v["max_abs"] for v in d["values"]} == {"w": 0.0, "v": 0.5}


# -- inspect (acceptance 5) -------------------------------------------------------------------


def test_inspect_xlmr_counts_per_module(tmp_path, capsys):
    shapes = xlmr_hf(d=8, ffn=16, vocab=50, pos=12)
    torch.save({k: torch.zeros(s) for k, s in shapes.items()}, tmp_path / "xlmr.bin")
    code, out, _ = run(capsys, "inspect", tmp_path / "xlmr.bin", "--json")
    d = json.loads(out)
    rows = {r["module"]: r for r in d["modules"]}
    assert code == 0 and d["n_tensors"] == 205
    layer = rows["roberta.encoder.layer.{0-11}"]
    assert (layer["per_instance"], layer["instances"], layer["tensors"]) == (16, 12, 192)
    # q, k, v, out dense + attention LayerNorm + intermediate + output dense + output LayerNorm
    assert layer["params"] == 12 * (4 * (8 * 8 + 8) + 2 * 8 + (16 * 8 + 16) + (8 * 16 + 8) + 2 * 8)
    assert rows["roberta.embeddings"]["tensors"] == 5
    assert sum(r["tensors"] for r in d["modules"]) == 205
    code, out, _ = run(capsys, "inspect", tmp_path / "xlmr.bin")
    assert "roberta.encoder.layer.{0-11}" in out and "x12" in out and "192" in out and "205 tensors" in out


# -- bad input (acceptance 6) -----------------------------------------------------------------


def _spec(tmp_path, rules: str) -> str:
    p = tmp_path / "spec.yaml"
    p.write_text("name: t\nversion: 1\nrules:\n" + rules)
    return str(p)


def _ckpt(tmp_path):
    p = tmp_path / "in.safetensors"
    save_file({"a.0.w": torch.zeros(10, 4), "a.1.w": torch.zeros(10, 4), "b": torch.zeros(3)}, p)
    return p


BAD_INPUTS = [
    ("unknown-op", "  - renam: a -> b\n", None, r"spec\.yaml:4: rule #1: unknown op 'renam'; did you mean 'rename'\?"),
    ("matches-nothing", "  - rename: x.{i} -> y.{i}\n", None, r"spec\.yaml:4: rule #1 \(rename x\.\{i\}\): matched no key"),
    (
        "two-rules-one-key",
        "  - rename: a.0.w -> c\n  - rename: b -> c\n",
        None,
        r"spec\.yaml:5: rule #2 \(rename b\): writes 'c', which already exists \(written by rule #1",
    ),
    (
        "split-not-divide",
        "  - split: {from: 'a.{i}.w', to: ['p.{i}', 'q.{i}', 'r.{i}']}\n",
        None,
        r"can't split dim 0 of length 10 into 3 equal chunks \(10 % 3 = 1\)",
    ),
    ("missing-input", "  - keep: '{k:path}'\n", "missing.pt", r"missing\.pt: no such file or directory"),
    (
        "truncated-safetensors",
        "  - keep: '{k:path}'\n",
        "truncated",
        r"truncated\.safetensors: tensor 'b': data ends at byte \d+ of a \d+-byte buffer \(truncated file\?\)",
    ),
]


@pytest.mark.parametrize("name, rules, source, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, name, rules, source, message):
    import re

    src = _ckpt(tmp_path)
    if source == "missing.pt":
        src = tmp_path / "missing.pt"
    elif source == "truncated":
        data = src.read_bytes()
        src = tmp_path / "truncated.safetensors"
        src.write_bytes(data[:-8])
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(capsys, "apply", _spec(tmp_path, rules), src, out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statemap: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"spec.yaml", "in.safetensors", src.name} - {"missing.pt"})


@pytest.mark.parametrize("where", ["run_node", "copy_range"])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, where):
    import statemap
    import statemap.apply as apply_mod
    import statemap.kernel_copy as kernel_copy

    src = _ckpt(tmp_path)
    target, name = (apply_mod, "run_node") if where == "run_node" else (kernel_copy, "copy_range")
    real = getattr(target, name)
    calls = {"n": 0}
    fail_at = 2 if where == "run_node" else 1  # adjacent kept tensors are one kernel copy (after the header)

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, flaky)
    rules = "  - transpose: 'a.{i}.w'\n  - keep: b\n" if where == "run_node" else "  - keep: '{k:path}'\n"
    with pytest.raises(statemap.OutputError, match="No space left on device; no output left behind"):
        statemap.convert(_spec(tmp_path, rules), src, tmp_path / "out.safetensors")
    assert calls["n"] == fail_at
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "spec.yaml"]


def test_existing_output_needs_force_and_input_is_never_overwritten(tmp_path, capsys):
    src = _ckpt(tmp_path)
    spec = _spec(tmp_path, "  - keep: '{k:path}'\n")
    before = src.read_bytes()
    code, _, err = run(capsys, "apply", spec, src, src, "--force")
    assert code == 2 and "is an input; statemap never writes over its inputs" in err
    out = tmp_path / "out.safetensors"
    out.write_text("precious")
    code, _, err = run(capsys, "apply", spec, src, out)
    assert code == 2 and "already exists; pass --force" in err and out.read_text() == "precious"
    assert run(capsys, "apply", spec, src, out, "--force")[0] == 0
    assert set(load_file(out)) == {"a.0.w", "a.1.w", "b"}
    assert src.read_bytes() == before


# -- apply / check / list --------------------------------------------------------------------------


def test_apply_json_dry_run_and_expect(tmp_path, capsys):
    src = _ckpt(tmp_path)
    spec = _spec(tmp_path, "  - rename: 'a.{i}.w -> layer.{i}.weight'\n  - drop: b\n  - inject: {to: c, shape: [2], value: 1}\n")
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"layer.0.weight": [10, 4], "layer.1.weight": [10, 5], "d": [1]}))
    out = tmp_path / "out.safetensors"
    code, stdout, _ = run(capsys, "apply", spec, src, out, "--dry-run", "--json", "--expect", ref)
    d = json.loads(stdout)
    assert code == 1 and not out.exists()
    assert d["dry_run"] is True and d["dropped"] == ["b"]
    assert [m["name"] for m in d["missing"]] == ["d"]
    assert [m["name"] for m in d["unexpected"]] == ["c"]
    assert d["shape_mismatch"] == [{"name": "layer.1.weight", "expected": [10, 5], "got": [10, 4]}]
    code, stdout, _ = run(capsys, "apply", spec, src, out)
    assert code == 0 and "wrote 3 tensors" in stdout and "dropped (1)" in stdout
    got = load_file(out)
    assert torch.equal(got["c"], torch.ones(2))


def test_set_overrides_var(tmp_path, capsys):
    src = _ckpt(tmp_path)
    spec = _spec(tmp_path, "  - slice: {from: 'a.{i}.w', stop: n}\n  - keep: b\n")
    p = tmp_path / "spec.yaml"
    p.write_text(p.read_text().replace("rules:", "vars: {n: 2}\nrules:"))
    out = tmp_path / "o.safetensors"
    assert run(capsys, "apply", spec, src, out, "--set", "n=7")[0] == 0
    assert load_file(out)["a.0.w"].shape == (7, 4)


def test_check_and_list(tmp_path, capsys, root):
    code, out, _ = run(capsys, "check", "deltalm-fairseq-to-hf", "--against", root / "examples" / "deltalm-tiny.pt", "--json")
    d = json.loads(out)
    assert code == 0 and d["outputs"] == 395 and d["passthrough"] == []
    code, out, _ = run(capsys, "list", "--json")
    names = {e["name"] for e in json.loads(out)}
    assert {"deltalm-pretrained-to-fairseq", "deltalm-fairseq-to-hf", "fairseq-legacy-to-hf"} <= names
    assert all(e["verified"] and e["source"] and e["target"] for e in json.loads(out))


def test_module_entry_point_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "statemap", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("statemap ")


def test_metadata_commands_do_not_import_torch_or_numpy(tmp_path):
    """inspect / diff / check / dry-run on safetensors and torch zip files import neither torch
    (~4 s) nor numpy (~0.15 s): they read metadata only."""
    np_save_file({"w": np.zeros((2, 3), "f4")}, str(tmp_path / "a.safetensors"))
    torch.save({"model": {"w": torch.zeros(2, 3)}}, tmp_path / "b.pt")
    code = (
        "import sys; from statemap.cli import main\n"
        f"assert main(['inspect', r'{tmp_path / 'b.pt'}', '-q']) == 0\n"
        f"assert main(['diff', r'{tmp_path / 'a.safetensors'}', r'{tmp_path / 'b.pt'}', '-q']) == 0\n"
        f"assert main(['apply', 'deltalm-fairseq-to-hf', r'{tmp_path / 'b.pt'}', '--dry-run', '-q']) == 2\n"
        f"assert main(['check', 'deltalm-fairseq-to-hf', '--against', r'{tmp_path / 'b.pt'}', '-q']) == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_header_length_past_end(tmp_path, capsys):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    code, _, err = run(capsys, "inspect", p)
    assert code == 2 and "header length 1048576 runs past the end of the 10-byte file" in err


def test_output_records_provenance_and_inspect_shows_it(tmp_path, capsys, root):
    import hashlib

    src = root / "examples" / "deltalm-tiny.pt"
    out = tmp_path / "o.safetensors"
    assert main(["apply", "deltalm-fairseq-to-hf", str(src), str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    md = json.loads(capsys.readouterr().out)["metadata"]
    assert md["statemap.spec"] == "deltalm-fairseq-to-hf" and md["statemap.source"] == "deltalm-tiny.pt"
    assert md["statemap.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert len(md["statemap.spec_sha256"]) == 64 and md["statemap.version"]
    assert main(["inspect", str(out)]) == 0
    assert "statemap.spec=deltalm-fairseq-to-hf" in capsys.readouterr().out


@pytest.mark.parametrize("flag", [False, True])
def test_a_source_over_16_mib_is_hashed_only_when_asked(tmp_path, capsys, root, monkeypatch, flag):
    """Hashing reads the whole source again (~2x the kernel's copy): by default a large source is
    recorded by size and mtime; --source-sha256 records its sha256 too."""
    import hashlib

    import statemap.api

    monkeypatch.setattr(statemap.api, "HASH_FREE", 1000)  # the tiny example counts as large here
    src = root / "examples" / "deltalm-tiny.pt"
    out = tmp_path / "o.safetensors"
    assert main(["apply", "deltalm-fairseq-to-hf", str(src), str(out), *(["--source-sha256"] if flag else [])]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    md = json.loads(capsys.readouterr().out)["metadata"]
    assert md["statemap.source_size"] == str(src.stat().st_size)
    assert md["statemap.source_mtime"] == str(int(src.stat().st_mtime))
    if flag:
        assert md["statemap.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert "statemap.source_digest" not in md
    else:
        assert "statemap.source_sha256" not in md
        assert "--source-sha256" in md["statemap.source_digest"]


def test_spec_digest_ignores_layout_and_notes_but_not_meaning():
    from statemap.api import spec_digest
    from statemap.spec import load_spec

    a = load_spec("name: t\nversion: 1\nrules:\n  - rename: a -> b\n")
    b = load_spec("# a comment\nname: t\nversion: 1\nrules:\n  - rename: {from: a, to: b, note: hello}\n")
    c = load_spec("name: t\nversion: 1\nrules:\n  - rename: a -> c\n")
    assert spec_digest(a) == spec_digest(b) != spec_digest(c)
