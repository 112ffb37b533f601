"""The metadata commands print exactly what they printed before the planner / index speed-up.

A mid-size sharded index (about 5k keys over 7 shards, mixed dtypes and shapes) is generated
deterministically; `inspect`, `diff` and `apply --dry-run` (text and --json) run on it and their
outputs (temporary paths replaced by ``<TMP>``) are compared with SHA-256 digests stored in
tests/fixtures/index_outputs/expected.json. The digests were recorded with the code as it was before
the speed-up (commit 9f8eed5); regenerate them only for an intended output change:

    STATEMAP_RECORD=1 python -m pytest -q tests/test_index_outputs.py
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import pytest

from statemap.cli import main

EXPECTED = Path(__file__).parent / "fixtures" / "index_outputs" / "expected.json"
SECONDS = re.compile(r'(?<=in )\d+\.\d+s|(?<="seconds": )[0-9.e-]+')
DTYPES = (("F32", 4), ("BF16", 2), ("F16", 2), ("I64", 8))


def keys(layers: int = 24, experts: int = 64) -> list[tuple[str, list[int], str]]:
    out = [("model.embed_tokens.weight", [32, 8], "F32")]
    for i in range(layers):
        out += [(f"model.layers.{i}.self_attn.{p}.weight", [8, 8], "BF16") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(f"model.layers.{i}.{n}_layernorm.weight", [8], "F32") for n in ("input", "post_attention")]
        out.append((f"model.layers.{i}.mlp.gate.weight", [experts, 8], "F16"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out.append((f"model.layers.{i}.mlp.shared_experts.{proj}.weight", [4, 8], "BF16"))
            out += [(f"model.layers.{i}.mlp.experts.{e}.{proj}.weight", [2, 4], "BF16") for e in range(experts)]
    out.append(("model.layers.0.attn.rotary.inv_freq", [4], "I64"))
    return [*out, ("model.norm.weight", [8], "F32"), ("lm_head.weight", [32, 8], "F32")]


def write_index(d: Path, entries: list[tuple[str, list[int], str]], n_shards: int = 7) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    size = dict(DTYPES)
    per = -(-len(entries) // n_shards)
    wm: dict[str, str] = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        hdr: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for k, shape, dt in entries[s * per : (s + 1) * per]:
            n = size[dt]
            for x in shape:
                n *= x
            hdr[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
            off += n
            wm[k] = name
        h = json.dumps(hdr, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        (d / name).write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * off)
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": sum(1 for _ in wm)}, "weight_map": wm}))
    return index


SPEC = """name: index-outputs
version: 1
rules:
  - rename: "model.embed_tokens.weight -> tok.weight"
  - rename: "model.layers.{i}.mlp.experts.{e}.{proj}.weight -> layers.{i}.moe.experts.{e}.{proj}.w"
  - rename: "model.layers.{i}.mlp.shared_experts.{proj}.weight -> layers.{i}.moe.shared.{proj}.w"
  - rename: "model.layers.{i}.mlp.gate.weight -> layers.{i}.moe.gate.w"
  - drop: "model.layers.{i}.attn.rotary.inv_freq"
  - merge:
      from: ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"]
      to: "layers.{i}.attn.qkv.w"
  - rename: "model.layers.{i}.self_attn.o_proj.weight -> layers.{i}.attn.o.w"
  - rename: "model.layers.{i}.{n}_layernorm.weight -> layers.{i}.{n}_norm.w"
  - rename: "model.norm.weight -> norm.w"
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    d = tmp_path_factory.mktemp("idx")
    base = keys()
    a = write_index(d / "a", base)
    # b: one key gone, one added, one shape and one dtype changed
    changed = [e for e in base if e[0] != "model.layers.3.mlp.experts.7.up_proj.weight"]
    changed = [(k, [2, 8], dt) if k == "model.layers.5.mlp.experts.1.down_proj.weight" else (k, s, dt) for k, s, dt in changed]
    changed = [(k, s, "F32") if k == "model.layers.2.input_layernorm.weight" else (k, s, dt) for k, s, dt in changed]
    b = write_index(d / "b", [*changed, ("model.extra.weight", [3], "F32")])
    spec = d / "spec.yaml"
    spec.write_text(SPEC)
    return d, a, b, spec


COMMANDS = {
    "inspect": ["inspect", "{a}"],
    "inspect --json": ["inspect", "{a}", "--json"],
    "inspect --keys": ["inspect", "{a}", "--keys"],
    "diff": ["diff", "{a}", "{b}"],
    "diff --json": ["diff", "{a}", "{b}", "--json"],
    "diff same": ["diff", "{a}", "{a}"],
    "dry-run": ["apply", "{spec}", "{a}", "--dry-run"],
    "dry-run --json": ["apply", "{spec}", "{a}", "--dry-run", "--json"],
}


def run(capsys: pytest.CaptureFixture[str], d: Path, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    text = f"exit {code}\n{out}\n--stderr--\n{err}".replace(str(d), "<TMP>")
    return SECONDS.sub("<seconds>", text)  # the run's duration (dry-run text and --json) is the one field that varies


def test_metadata_commands_print_what_they_printed(inputs, capsys, monkeypatch):
    d, a, b, spec = inputs
    monkeypatch.setenv("COLUMNS", "120")
    got = {}
    for label, argv in COMMANDS.items():
        text = run(capsys, d, [x.format(a=a, b=b, spec=spec) for x in argv])
        got[label] = hashlib.sha256(text.encode()).hexdigest()
        if os.environ.get("STATEMAP_DUMP"):
            Path(os.environ["STATEMAP_DUMP"], label.replace(" ", "_")).write_text(text)
    if os.environ.get("STATEMAP_RECORD"):
        EXPECTED.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(EXPECTED.read_text())


def test_the_comparison_sees_one_changed_shape(inputs, capsys, tmp_path, monkeypatch):
    """Negative check: one tensor's shape changed in one shard changes the --json digest."""
    d, *_ = inputs
    monkeypatch.setenv("COLUMNS", "120")
    other = write_index(
        tmp_path, [(k, [3, 4] if k == "model.layers.9.mlp.experts.9.gate_proj.weight" else s, dt) for k, s, dt in keys()]
    )
    text = run(capsys, tmp_path, ["inspect", str(other), "--json"])
    assert hashlib.sha256(text.encode()).hexdigest() != json.loads(EXPECTED.read_text())["inspect --json"]
    shapes = {t["name"]: t["shape"] for t in json.loads(text.split("\n", 1)[1].split("\n--stderr--")[0])["tensors"]}
    assert shapes["model.layers.9.mlp.experts.9.gate_proj.weight"] == [3, 4]
