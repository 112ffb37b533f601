"""Several input files (`inputs:`) and vars from a config (`config:`, `--vars-from`): issue #13.

The multi-file inputs are real `torch.save` files of real shards: a model's tensors cut the way
Meta's model-parallel `consolidated.0N.pth` and Megatron's `mp_rank_0N/model_optim_rng.pt` cut
them (column-parallel rows, row-parallel columns, replicated norms). Every mapping test compares
the joined tensors with the unsharded originals, value for value.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from statemap import convert, load_spec, map_state_dict
from statemap.cli import main
from statemap.errors import CheckpointError, SpecError, StatemapError
from statemap.load import open_checkpoint
from statemap.source import open_input, open_source

ROOT = Path(__file__).resolve().parent.parent
FAIRSEQ_BART = ROOT / "tests/fixtures/fairseq/bart.pt"
META = ROOT / "tests/fixtures/llama/meta"

DIM, HEADS, LAYERS = 8, 2, 2

# Meta model parallel: wq/wk/wv/w1/w3 and the output are column-parallel (rows cut), wo/w2 and the
# embedding row-parallel (columns cut: Meta's ParallelEmbedding shards the embedding dim), norms replicated
COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight", "feed_forward.w3.weight")
ROW = ("attention.wo.weight", "feed_forward.w2.weight")


def _full(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"tok_embeddings.weight": torch.randn(16, DIM, generator=g), "norm.weight": torch.randn(DIM, generator=g)}
    sd["output.weight"] = torch.randn(16, DIM, generator=g)
    for i in range(LAYERS):
        for name in COLUMN[:3] + ROW[:1]:
            sd[f"layers.{i}.{name}"] = torch.randn(DIM, DIM, generator=g)
        sd[f"layers.{i}.feed_forward.w1.weight"] = torch.randn(12, DIM, generator=g)
        sd[f"layers.{i}.feed_forward.w3.weight"] = torch.randn(12, DIM, generator=g)
        sd[f"layers.{i}.feed_forward.w2.weight"] = torch.randn(DIM, 12, generator=g)
        sd[f"layers.{i}.attention_norm.weight"] = torch.randn(DIM, generator=g)
        sd[f"layers.{i}.ffn_norm.weight"] = torch.randn(DIM, generator=g)
    return sd


def _shard(full: dict[str, torch.Tensor], rank: int, n: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in full.items():
        if k.endswith(COLUMN) or k == "output.weight":
            out[k] = v.chunk(n, 0)[rank].clone()
        elif k.endswith(ROW) or k == "tok_embeddings.weight":
            out[k] = v.chunk(n, 1)[rank].clone()
        else:
            out[k] = v.clone()
    return out


def _meta_folder(tmp: Path, n: int = 2, name: str = "consolidated.{:02d}.pth") -> tuple[Path, dict[str, torch.Tensor]]:
    full = _full()
    d = tmp / "ckpt"
    d.mkdir()
    for r in range(n):
        torch.save(_shard(full, r, n), d / name.format(r))
    (d / "params.json").write_text(json.dumps({"dim": DIM, "n_heads": HEADS, "n_layers": LAYERS, "n_kv_heads": None}))
    return d, full


def _merge_rules(n: int) -> str:
    """Per-file rules (the existing n-source `merge`), so this test needs no merge-over-a-capture op."""
    ranks = [f"{r:02d}" for r in range(n)]

    def srcs(key: str) -> str:
        return "[" + ", ".join(f'"{r}/{key}"' for r in ranks) + "]"

    lines = []
    for name in COLUMN:
        lines.append(f'  - merge: {{from: {srcs("layers.{i}." + name)}, to: "layers.{{i}}.{name}", dim: 0}}')
    for name in ROW:
        lines.append(f'  - merge: {{from: {srcs("layers.{i}." + name)}, to: "layers.{{i}}.{name}", dim: 1}}')
    lines.append(f"  - merge: {{from: {srcs('output.weight')}, to: output.weight, dim: 0}}")
    lines.append(f"  - merge: {{from: {srcs('tok_embeddings.weight')}, to: tok_embeddings.weight, dim: 1}}")
    lines.append('  - rename: "00/{rest:path} -> {rest}"')  # lint: SM102, the output could start with 00/ again
    lines.append('  - drop: "{rank:int}/{rest:path}"')  # the other ranks' replicas of the norms
    return "\n".join(lines) + "\n"


def _spec(tmp: Path, n: int = 2, header: str = 'inputs: "consolidated.{rank:int}.pth"\n') -> Path:
    p = tmp / "meta.yaml"
    p.write_text(f"name: meta-mp\nversion: 1\n{header}rules:\n{_merge_rules(n)}")
    return p


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_meta_model_parallel_pair_joins_to_the_full_tensors(tmp_path):
    folder, full = _meta_folder(tmp_path)
    report = convert(_spec(tmp_path), folder, tmp_path / "out.safetensors")
    _assert_same(load_file(tmp_path / "out.safetensors"), full)
    # the report names each source key's file
    assert [r["file"] for r in report.inputs] == ["consolidated.00.pth", "consolidated.01.pth"]
    assert [r["captures"] for r in report.inputs] == [{"rank": "00"}, {"rank": "01"}]
    assert "01/layers.1.attention.wq.weight" in report.inputs[1]["keys"]
    assert all(k.startswith("00/") for k in report.inputs[0]["keys"]) and len(report.inputs[0]["keys"]) == len(full)
    # negative: the comparison can fail — ranks joined in the wrong order give other values
    wrong = torch.cat([_shard(full, 1, 2)["layers.0.attention.wq.weight"], _shard(full, 0, 2)["layers.0.attention.wq.weight"]])
    assert not torch.equal(wrong, full["layers.0.attention.wq.weight"])


def test_four_ranks_and_numeric_order(tmp_path):
    """Ranks 2 and 10 sort numerically (an int capture), not as text."""
    full = _full()
    d = tmp_path / "ckpt"
    d.mkdir()
    for r in (0, 1, 2, 10):
        torch.save({"w": full["layers.0.attention.wq.weight"][r % 8 : r % 8 + 1].clone()}, d / f"part.{r}.pt")
    ck = open_input(d, load_spec('name: t\nversion: 1\ninputs: "part.{r:int}.pt"\nrules:\n  - keep: "{r}/w"\n').inputs)
    with ck:
        assert [f.name for f in ck.inputs] == ["part.0.pt", "part.1.pt", "part.2.pt", "part.10.pt"]
        assert list(ck.metas) == ["0/w", "1/w", "2/w", "10/w"]
        assert torch.equal(torch.from_numpy(np.array(ck.read("10/w"))), full["layers.0.attention.wq.weight"][2:3])


def test_cli_folder_pattern_and_json(tmp_path, capsys):
    folder, full = _meta_folder(tmp_path)
    spec = _spec(tmp_path)
    assert main(["apply", str(spec), str(folder), str(tmp_path / "a.safetensors"), "-q"]) == 0
    _assert_same(load_file(tmp_path / "a.safetensors"), full)
    # the pattern itself, for a spec without `inputs:`
    plain = tmp_path / "plain.yaml"
    plain.write_text(spec.read_text().replace('inputs: "consolidated.{rank:int}.pth"\n', ""))
    pattern = str(folder / "consolidated.{rank:int}.pth")
    assert main(["apply", str(plain), pattern, str(tmp_path / "b.safetensors"), "-q"]) == 0
    _assert_same(load_file(tmp_path / "b.safetensors"), full)
    capsys.readouterr()
    assert main(["apply", str(spec), str(folder), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    files = {k: row["file"] for row in out["inputs"] for k in row["keys"]}
    assert files["01/norm.weight"] == "consolidated.01.pth" and files["00/norm.weight"] == "consolidated.00.pth"
    assert out["source_format"] == "torch-zip x2 files"
    # text report: one row per file
    assert main(["apply", str(spec), str(folder), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "input files (2)" in text and "consolidated.01.pth" in text and "rank=01" in text
    # check and lint plan against the folder as apply reads it
    assert main(["check", str(spec), "--against", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == len(full)
    assert main(["lint", str(spec), "--against", str(folder), "--json"]) == 1
    assert [f["code"] for f in json.loads(capsys.readouterr().out)["findings"]] == ["SM102"]  # '/' is a separator (no SM103)
    # inspect a pattern
    assert main(["inspect", pattern, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n_tensors"] == 2 * len(full) and [f["file"] for f in got["inputs"]] == [
        "consolidated.00.pth",
        "consolidated.01.pth",
    ]


def test_folder_of_shards_without_inputs_is_refused_with_a_suggestion(tmp_path, capsys):
    folder, _ = _meta_folder(tmp_path)
    spec = tmp_path / "one.yaml"
    spec.write_text("name: t\nversion: 1\nrules:\n  - keep: '{k:path}'\n")
    assert main(["apply", str(spec), str(folder), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "holds 2 checkpoints and no index (consolidated.00.pth, consolidated.01.pth)" in err
    assert 'inputs: "consolidated.{n:int}.pth"' in err


def _megatron_args() -> argparse.Namespace:
    """Megatron-LM saves its command line as an argparse.Namespace beside the model."""
    return argparse.Namespace(
        num_layers=LAYERS,
        hidden_size=DIM,
        num_attention_heads=HEADS,
        group_query_attention=False,
        num_query_groups=None,
        tensor_model_parallel_size=2,
    )


def test_megatron_layout_long_form_key_and_tracker(tmp_path):
    """`mp_rank_{tp:int}/model_optim_rng.pt` under a Megatron save folder (tracker file followed),
    the model under `model`, and keys addressed as `tp{tp}.` + key by the long form."""
    full = _full()
    it = tmp_path / "save" / "iter_0000010"
    for r in range(2):
        (it / f"mp_rank_{r:02d}").mkdir(parents=True)
        torch.save(
            {"model": _shard(full, r, 2), "iteration": 10, "args": _megatron_args()},
            it / f"mp_rank_{r:02d}" / "model_optim_rng.pt",
        )
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("10")
    spec = tmp_path / "m.yaml"
    rules = _merge_rules(2).replace('"00/', '"tp0.').replace('"01/', '"tp1.').replace('"{rank:int}/', '"tp{t:int}.')
    spec.write_text(
        "name: m\nversion: 1\ninputs: {files: 'mp_rank_{tp:int}/model_optim_rng.pt', key: 'tp{tp+0}.{key}'}\n"
        f"rules:\n{rules}"
    )
    # {tp+0} turns '00' into '0': the key template computes
    convert(spec, tmp_path / "save", tmp_path / "out.safetensors")
    _assert_same(load_file(tmp_path / "out.safetensors"), full)
    with open_input(tmp_path / "save", load_spec(spec).inputs) as ck:
        assert ck.container == "model" and [f.name for f in ck.inputs] == [
            "mp_rank_00/model_optim_rng.pt",
            "mp_rank_01/model_optim_rng.pt",
        ]
    # vars from the pickled Namespace (read as data by the safe unpickler, never run)
    header = (
        "config: {checkpoint: args}\nvars:\n  layers: {config: num_layers}\n  heads: {config: num_attention_heads}\n"
        "  groups: {config: num_query_groups, default: heads}\n  tp: {config: tensor_model_parallel_size}\n"
        "  dim: {config: hidden_size}\n"
    )
    spec.write_text(spec.read_text().replace("rules:\n", header + "rules:\n", 1))
    ck, s = open_source(load_spec(spec), tmp_path / "save")
    ck.close()
    assert s.var_dict == {"layers": LAYERS, "heads": HEADS, "groups": HEADS, "tp": 2, "dim": DIM}
    assert s.config_label.endswith("mp_rank_00/model_optim_rng.pt [args]")


def test_files_do_not_tie_to_each_other(tmp_path):
    """Two files store their tensors at the same places (`data/0`, same offsets): they are not one tensor."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for r in range(2):
        torch.save({"w": torch.full((4,), float(r))}, d / f"c.{r}.pt")
    with open_input(d, load_spec('name: t\nversion: 1\ninputs: "c.{r:int}.pt"\nrules:\n  - keep: "{r}/w"\n').inputs) as ck:
        assert ck.tied_groups() == []
        assert ck.locations["0/w"].offset == ck.locations["1/w"].offset  # same place, different files
        assert float(ck.read("1/w")[0]) == 1.0 and float(ck.read("0/w")[0]) == 0.0


def test_descriptors_stay_bounded(tmp_path, monkeypatch):
    from statemap.load import multi

    monkeypatch.setattr(multi, "MAX_OPEN_FILES", 2)
    d = tmp_path / "ckpt"
    d.mkdir()
    for r in range(5):
        torch.save({"w": torch.full((3,), float(r))}, d / f"c.{r}.pt")
    ck = open_input(d, load_spec('name: t\nversion: 1\ninputs: "c.{r:int}.pt"\nrules:\n  - keep: "{r}/w"\n').inputs)
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    base = open_fds()
    with ck:
        for _ in range(2):
            for r in range(5):
                assert float(ck.read(f"{r}/w")[1]) == float(r)
                assert open_fds() - base <= 2
    assert open_fds() <= base


@pytest.mark.parametrize("as_torch", [True, False])
def test_map_state_dict_with_one_state_dict_per_file(as_torch):
    full = _full()
    parts = {f"{r:02d}": _shard(full, r, 2) for r in range(2)}
    if not as_torch:
        parts = {p: {k: v.numpy() for k, v in sd.items()} for p, sd in parts.items()}
    parts["01"] = {f"module.{k}": v for k, v in parts["01"].items()}  # prefixes stripped per state dict
    spec = f'name: m\nversion: 1\ninputs: "consolidated.{{rank:int}}.pth"\nrules:\n{_merge_rules(2)}'
    out, report = map_state_dict(spec, parts)
    _assert_same({k: torch.as_tensor(v) for k, v in out.items()}, full)
    assert report.inputs[1]["stripped_prefix"] == "module." and report.inputs[0]["file"] == "00"
    with pytest.raises(CheckpointError, match=r"pass one state dict per file, keyed by its capture values"):
        map_state_dict(spec, full)
    with pytest.raises(CheckpointError, match=r"key 'x/y' must be <rank> \(the captures of 'consolidated\.\{rank:int\}\.pth'\)"):
        map_state_dict(spec, {"x/y": parts["00"]})
    with pytest.raises(CheckpointError, match=r"capture 'rank' of .* is an integer"):
        map_state_dict(spec, {"a": parts["00"]})


def test_meta_fixture_single_file_as_a_one_rank_input(tmp_path):
    """The committed Meta checkpoint (made by Meta's layout, read by transformers' script) as `inputs:` of one rank."""
    spec = tmp_path / "s.yaml"
    spec.write_text('name: t\nversion: 1\ninputs: "consolidated.{rank:int}.pth"\nrules:\n  - rename: "00/{k:path} -> {k}"\n')
    out, ref = tmp_path / "o.safetensors", open_checkpoint(META / "consolidated.00.pth")
    convert(spec, META, out)
    got = load_file(out)
    with ref:
        assert set(got) == set(ref.metas)
        for k in ref.metas:
            assert got[k].view(torch.int16).numpy().tobytes() == ref.read(k).tobytes(), k


# -- vars from a config ------------------------------------------------------------------------


LLAMA_VARS = """\
config: params.json
vars:
  dim: {config: dim}
  n_heads: {config: n_heads}
  n_kv_heads: {config: n_kv_heads, default: n_heads}
  head_dim: dim // n_heads
  kv_dim: n_kv_heads * head_dim
"""


def _vars_spec(tmp: Path, header: str = LLAMA_VARS, rules: str = "  - keep: '{k:path}'\n") -> Path:
    p = tmp / "v.yaml"
    p.write_text(f"name: v\nversion: 1\n{header}rules:\n{rules}")
    return p


def test_vars_from_params_json_the_real_meta_fixture(tmp_path):
    """params.json beside the committed Meta checkpoint: n_kv_heads 2 (GQA), head_dim 32 // 4 = 8;
    each checked against the tensors' shapes (wk has n_kv_heads * head_dim rows)."""
    rules = "  - slice: {from: layers.0.attention.wk.weight, to: k_first_head, dim: 0, stop: head_dim}\n  - keep: '{k:path}'\n"
    ck, spec = open_source(load_spec(_vars_spec(tmp_path, rules=rules)), META / "consolidated.00.pth")
    with ck:
        v = spec.var_dict
        assert (v["dim"], v["n_heads"], v["n_kv_heads"], v["head_dim"], v["kv_dim"]) == (32, 4, 2, 8, 16)
        assert ck.metas["layers.0.attention.wk.weight"].shape == (v["kv_dim"], v["dim"])
        assert spec.config_label == str(META / "params.json")
    out = tmp_path / "o.safetensors"
    report = convert(_vars_spec(tmp_path, rules=rules), META / "consolidated.00.pth", out)
    assert report.vars["head_dim"] == 8 and report.vars_from.endswith("params.json")
    with open_checkpoint(META / "consolidated.00.pth") as ref:
        wk = torch.from_numpy(np.array(ref.read("layers.0.attention.wk.weight"))).view(torch.bfloat16)
    assert torch.equal(load_file(out)["k_first_head"], wk[:8])
    assert not torch.equal(load_file(out)["k_first_head"], wk[8:16])  # negative: another head differs


def test_set_wins_over_config_and_config_over_default(tmp_path):
    folder, _ = _meta_folder(tmp_path)  # params.json: n_kv_heads null -> absent -> default n_heads
    spec = _vars_spec(tmp_path)
    ck, s = open_source(load_spec(spec, vars={"n_heads": 4}), folder / "consolidated.00.pth")
    ck.close()
    assert (s.var_dict["n_heads"], s.var_dict["n_kv_heads"], s.var_dict["head_dim"]) == (4, 4, 2)
    ck, s = open_source(load_spec(spec), folder / "consolidated.00.pth")
    ck.close()
    assert (s.var_dict["n_heads"], s.var_dict["n_kv_heads"], s.var_dict["head_dim"]) == (HEADS, HEADS, DIM // HEADS)


def test_vars_from_overrides_the_spec_config(tmp_path, capsys):
    folder, _ = _meta_folder(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text("dim: 64\nn_heads: 16\nn_kv_heads: 4\n")
    ck, s = open_source(load_spec(_vars_spec(tmp_path)), folder / "consolidated.00.pth", vars_from=other)
    ck.close()
    assert (s.var_dict["head_dim"], s.var_dict["kv_dim"], s.config_label) == (4, 16, str(other))
    assert (
        main(
            [
                "apply",
                str(_vars_spec(tmp_path)),
                str(folder / "consolidated.00.pth"),
                "--dry-run",
                "--json",
                "--vars-from",
                str(other),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["vars"]["kv_dim"] == 16 and out["vars_from"] == str(other)


def test_vars_from_the_checkpoint_cfg_of_a_real_fairseq_file(tmp_path):
    """fairseq's `cfg` (a dict of argparse/omegaconf sections, read by the safe unpickler): its
    encoder_layers equals the number of encoder layers the state dict holds."""
    header = "config: {checkpoint: cfg.model}\nvars:\n  n_layers: {config: encoder_layers}\n  d: {config: encoder_embed_dim}\n  last: n_layers - 1\n"
    rules = "  - rename: 'encoder.layers.{i}.fc1.weight -> fc1_from_the_top.{last - i}'\n  - keep: '{k:path}'\n"
    ck, spec = open_source(load_spec(_vars_spec(tmp_path, header, rules)), FAIRSEQ_BART)
    with ck:
        layers = {int(k.split(".")[2]) for k in ck.metas if k.startswith("encoder.layers.")}
        assert spec.var_dict["n_layers"] == len(layers) == 2
        assert spec.var_dict["d"] == ck.metas["encoder.layers.0.fc1.weight"].shape[1]
    out = tmp_path / "o.safetensors"
    convert(_vars_spec(tmp_path, header, rules), FAIRSEQ_BART, out)
    with open_checkpoint(FAIRSEQ_BART) as ref:
        assert np.array_equal(load_file(out)["fc1_from_the_top.0"].numpy(), ref.read("encoder.layers.1.fc1.weight"))
        assert not np.array_equal(load_file(out)["fc1_from_the_top.0"].numpy(), ref.read("encoder.layers.0.fc1.weight"))


def test_var_expression_defaults_without_config():
    spec = load_spec(
        "name: t\nversion: 1\nvars:\n  a: 6\n  b: a * 2\n  c: (b + a) // 4\n  p: 'vit.'\n  q: a\n  r: '2*3'\nrules:\n  - drop: x\n"
    )
    assert spec.var_dict == {"a": 6, "b": 12, "c": 4, "p": "vit.", "q": 6, "r": 6}
    assert spec.with_vars({"a": "2"}).var_dict["c"] == 1  # defaults follow an override
    cfg = load_spec("name: t\nversion: 1\nvars:\n  n: {config: c.1.1.1}\n  m: {config: flag}\nrules:\n  - drop: x\n")
    assert cfg.bind_config({"c": [[0, 0], [[1, 2], [3, 4]]], "flag": True}, "cfg").var_dict == {"n": 4, "m": 1}


def test_pending_config_var_is_named_when_planning(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    torch.save({"w": torch.zeros(2)}, d / "m.pt")
    spec = "name: t\nversion: 1\nvars:\n  n: {config: n}\nrules:\n  - keep: w\n"
    with pytest.raises(SpecError, match=r"var n comes from config key 'n', and no config was read"):
        convert(spec, d / "m.pt")
    assert convert(spec, d / "m.pt", vars_from={"n": 3}).vars == {"n": 3}


@pytest.mark.parametrize(
    "header, error, match",
    [
        ("vars:\n  a: b\n  b: a * 2\n", SpecError, r"var defaults form a cycle: a -> b -> a"),
        ("vars:\n  a: {config: x, default: c}\n  c: d + 1\n  d: a\n", SpecError, r"form a cycle: a -> c -> d -> a"),
        (
            "vars:\n  a: 2\n  b: a * n_head\n",
            SpecError,
            r"var 'b': default 'a \* n_head' reads as an expression over \['a'\] and unknown name\(s\) \['n_head'\]",
        ),
        ("vars:\n  a: {conifg: x}\n", SpecError, r"var 'a': unknown field\(s\) \['conifg'\]"),
        ("vars:\n  a: {config: 'x..y'}\n", SpecError, r"var 'a': 'config' is a dotted key"),
        ("vars:\n  a: [1]\n", SpecError, r"var 'a' must have a number or string default"),
        ("config: [a]\n", SpecError, r"'config' is a JSON/YAML file beside the input"),
        ("config: {checkpoint: args, x: 1}\n", SpecError, r"'config' is a JSON/YAML file"),
        ("inputs: '/abs/c.{r:int}.pth'\n", SpecError, r"must be relative to the input folder"),
        ("inputs: '../c.{r:int}.pth'\n", SpecError, r"path component '\.\.' is not allowed"),
        ("inputs: 're:c\\.\\d+'\n", SpecError, r"not a regex"),
        ("inputs: 'c.{r:path}'\n", SpecError, r"capture \{r:path\} must be \{r\} or \{r:int\}"),
        ("inputs: {files: 'c.{r}.pt', key: '{r}'}\n", SpecError, r"must contain \{key\}"),
        ("inputs: {files: 'd{a}/c.{r}.pt', key: '{r}/{key}'}\n", SpecError, r"leaves out the capture\(s\) \['a'\]"),
        ("inputs: {files: 'c.{r}.pt', key: '{s}/{key}'}\n", SpecError, r"uses \['s'\], which the file pattern"),
        ("inputs: {files: 'c.{key}.pt'}\n", SpecError, r"'key' is reserved"),
        ("inputs: {file: 'c.{r}.pt'}\n", SpecError, r"'inputs' is a file pattern, or \{files: PATTERN, key: TEMPLATE\}"),
        ("vars:\n  a: 4294967296\n  b: a * a * a\n", SpecError, r"var 'b' = a \* a \* a is beyond 64 bits \(97 bits\)"),
        (
            "vars:\n  a: 65536\n" + "".join(f"  v{k}: {'a' if k == 0 else f'v{k - 1}'} * 65536\n" for k in range(8)),
            SpecError,
            r"var 'v2' = v1 \* 65536 is beyond 64 bits \(65 bits\)",
        ),
    ],
)
def test_bad_headers(header, error, match):
    with pytest.raises(error, match=match):
        load_spec(f"name: t\nversion: 1\n{header}rules:\n  - drop: x\n")


def _one(tmp: Path) -> Path:
    d = tmp / "in"
    d.mkdir(exist_ok=True)
    torch.save({"w": torch.zeros(2)}, d / "m.pt")
    return d


@pytest.mark.parametrize(
    "setup, header, match",
    [
        (
            lambda d: None,
            "config: params.json\n",
            r"params\.json: no such config \('config: params\.json' in .* is read from the input's folder\)",
        ),
        (
            lambda d: (d / "params.json").write_text("[1, 2]"),
            "config: params.json\n",
            r"config must be a mapping of name: value, got list",
        ),
        (lambda d: (d / "params.json").write_text("{bad"), "config: params.json\n", r"params\.json: cannot read config: "),
        (
            lambda d: (d / "params.json").write_bytes(b" " * ((4 << 20) + 1)),
            "config: params.json\n",
            r"config is larger than 4,194,304 bytes",
        ),
        (
            lambda d: (d / "params.json").write_text("{}"),
            "config: params.json\nvars:\n  n: {config: model.n}\n",
            r"params\.json: no key 'model\.n' for var 'n' \(declared at .*v\.yaml:5\), which has no default",
        ),
        (
            lambda d: (d / "params.json").write_text('{"n": {"a": 1}}'),
            "config: params.json\nvars:\n  n: {config: n}\n",
            r"key 'n' \(var 'n'\) is dict, not a number or text",
        ),
        (lambda d: None, "config: {checkpoint: args}\n", r"m\.pt: no 'args' at top level of the checkpoint"),
        (
            lambda d: (d / "params.json").write_text('{"n": ' + "9" * 30 + "}"),
            "config: params.json\nvars:\n  n: {config: n}\n",
            r"key 'n' \(var 'n'\) is an integer beyond 64 bits",
        ),
        (
            lambda d: (d / "params.yaml").write_text("a: &a [1, 2]\nb: &b [*a, *a]\nc: [*b, *b]\n"),
            "config: params.yaml\nvars:\n  n: {config: c.0.1}\n",
            r"params\.yaml: key 'c\.0\.1' \(var 'n'\) is list, not a number or text",
        ),
        (
            lambda d: (d / "params.yaml").write_text("[" * 5000 + "]" * 5000),
            "config: params.yaml\nvars:\n  n: {config: c}\n",
            r"params\.yaml: (config nested too deeply|cannot read config)",
        ),
    ],
)
def test_bad_configs(tmp_path, setup, header, match):
    d = _one(tmp_path)
    setup(d)
    with pytest.raises(StatemapError, match=match):
        convert(_vars_spec(tmp_path, header, "  - keep: w\n"), d / "m.pt", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "setup, src, match",
    [
        (lambda d: None, "in", r"in: no file matches 'inputs: c\.\{r:int\}\.pt' \(the folder holds: m\.pt\)"),
        (lambda d: None, "nowhere", r"nowhere: no such folder; a spec with 'inputs: c\.\{r:int\}\.pt' reads a folder"),
        (
            lambda d: None,
            "in/m.pt",
            r"m\.pt: is one file, but the spec reads several \('inputs: c\.\{r:int\}\.pt'\); give the folder",
        ),
        (lambda d: (d / "c.1.pt").write_bytes(b"not a checkpoint at all"), "in", r"c\.1\.pt: "),
    ],
)
def test_bad_inputs(tmp_path, monkeypatch, setup, src, match):
    d = _one(tmp_path)
    setup(d)
    monkeypatch.chdir(tmp_path)
    spec = "name: t\nversion: 1\ninputs: 'c.{r:int}.pt'\nrules:\n  - keep: '{k:path}'\n"
    with pytest.raises(CheckpointError, match=match):
        convert(spec, src, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_too_many_files_and_colliding_keys(tmp_path, monkeypatch):
    from statemap.load import multi

    d = _one(tmp_path)
    for r in range(4):
        torch.save({"w": torch.zeros(2)}, d / f"c.{r}.pt")
    monkeypatch.setattr(multi, "MAX_INPUT_FILES", 3)
    spec = "name: t\nversion: 1\ninputs: 'c.{r:int}.pt'\nrules:\n  - keep: '{k:path}'\n"
    with pytest.raises(CheckpointError, match=r"'c\.\{r:int\}\.pt' matches more than 3 files; refusing to open them all"):
        convert(spec, d)
    monkeypatch.setattr(multi, "MAX_INPUT_FILES", 4096)
    torch.save({"w": torch.zeros(2)}, d / "c.01.pt")  # 1 and 01: two files, one key "1/w" with {r+0}
    spec2 = "name: t\nversion: 1\ninputs: {files: 'c.{r:int}.pt', key: '{r+0}/{key}'}\nrules:\n  - keep: '{k:path}'\n"
    with pytest.raises(CheckpointError, match=r"key '1/w' comes from two files \(c\.01\.pt and c\.1\.pt\)"):
        convert(spec2, d)


def test_conversion_of_many_files_keeps_few_descriptors_open(tmp_path, monkeypatch):
    """Streaming copy (safetensors out) and reading (pt out) each hold at most N input files open."""
    import os

    from statemap import kernel_copy
    from statemap.load import multi

    monkeypatch.setattr(multi, "MAX_OPEN_FILES", 2)
    monkeypatch.setattr(kernel_copy, "MAX_SOURCE_FDS", 2)
    d = tmp_path / "ckpt"
    d.mkdir()
    for r in range(6):
        torch.save({"w": torch.full((3,), float(r)), "b": torch.full((2,), -float(r))}, d / f"c.{r}.pt")
    spec = "name: t\nversion: 1\ninputs: 'c.{r:int}.pt'\nrules:\n  - rename: '{r}/{k} -> {k}.{r}'\n"
    base = len(os.listdir("/proc/self/fd"))
    peak = [0]

    def seen(_m: object) -> None:
        peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")) - base)

    for out in (tmp_path / "o.safetensors", tmp_path / "o.pt"):
        convert(spec, d, out, on_tensor=seen)
        got = load_file(out) if out.suffix == ".safetensors" else torch.load(out)
        assert all(torch.equal(got[f"w.{r}"], torch.full((3,), float(r))) for r in range(6))
        assert all(torch.equal(got[f"b.{r}"], torch.full((2,), -float(r))) for r in range(6))
    # the output file and its lock, the copy's pipe (two ends), plus at most 2 input files
    # (without the bound: 7-8, one per input file)
    assert 0 < peak[0] <= 2 + 2 + 2
    assert len(os.listdir("/proc/self/fd")) <= base


def test_diff_spec_over_several_files_and_invert_keeps_config_vars(tmp_path, capsys):
    folder, full = _meta_folder(tmp_path)
    spec = _spec(
        tmp_path, header='inputs: "consolidated.{rank:int}.pth"\n' + LLAMA_VARS.replace("  kv_dim: n_kv_heads * head_dim\n", "")
    )
    torch.save(full, tmp_path / "full.pt")
    assert main(["diff", str(folder), str(tmp_path / "full.pt"), "--spec", str(spec), "-q"]) == 0
    wrong = dict(full)
    wrong["layers.1.attention.wo.weight"] = wrong["layers.1.attention.wo.weight"].flip(1)
    torch.save(wrong, tmp_path / "wrong.pt")
    assert main(["diff", str(folder), str(tmp_path / "wrong.pt"), "--spec", str(spec), "--json"]) == 1
    assert "layers.1.attention.wo.weight" in capsys.readouterr().out
    # the reverse spec declares the vars as the spec does (config keys, expressions), not frozen values
    from statemap.invert import invert

    data = invert(load_spec(spec)).data
    assert data["config"] == "params.json" and "inputs" not in data
    assert (
        data["vars"]["n_kv_heads"] == {"config": "n_kv_heads", "default": "n_heads"}
        and data["vars"]["head_dim"] == "dim // n_heads"
    )


def test_parallel_shard_writers_reopen_the_files(tmp_path):
    """--workers: each worker process opens the files itself (and plans with the bound config vars)."""
    folder, full = _meta_folder(tmp_path)
    spec = _spec(tmp_path, header='inputs: "consolidated.{rank:int}.pth"\n' + LLAMA_VARS)
    report = convert(spec, folder, tmp_path / "o.safetensors", max_shard_size=2000, workers=2)
    assert len(report.files) > 2 and report.vars["head_dim"] == DIM // HEADS
    got: dict[str, torch.Tensor] = {}
    for f in report.files:
        if f.endswith(".safetensors"):
            got.update(load_file(f))
    _assert_same(got, full)


def test_config_and_input_files_are_never_outputs(tmp_path):
    from statemap.errors import OutputError

    d = tmp_path / "ckpt"
    d.mkdir()
    for r in range(2):
        torch.save({"w": torch.full((2,), float(r))}, d / f"c.{r}.pt")
    cfg = tmp_path / "vars.pt"  # a YAML config under a name an output could have
    cfg.write_text("n: 2\n")
    spec = "name: t\nversion: 1\ninputs: 'c.{r:int}.pt'\nvars:\n  n: {config: n}\nrules:\n  - rename: '{r}/w -> w{r}'\n"
    for victim in (d / "c.1.pt", cfg):
        before = victim.read_bytes()
        with pytest.raises(OutputError, match=r"is an input"):
            convert(spec, d, victim, force=True, vars_from=cfg)
        assert victim.read_bytes() == before


def _over_rank_rules() -> str:
    """One rule per layout kind, for any rank count: `merge ... over: rank` (ENGINE_13 section 6)."""
    lines = [f'  - merge: {{from: "{{rank:int}}/layers.{{i}}.{n}", over: rank, dim: 0, to: "layers.{{i}}.{n}"}}' for n in COLUMN]
    lines += [f'  - merge: {{from: "{{rank:int}}/layers.{{i}}.{n}", over: rank, dim: 1, to: "layers.{{i}}.{n}"}}' for n in ROW]
    lines += [
        '  - merge: {from: "{rank:int}/output.weight", over: rank, dim: 0, to: output.weight}',
        '  - merge: {from: "{rank:int}/tok_embeddings.weight", over: rank, dim: 1, to: tok_embeddings.weight}',
        '  - merge: {from: "{rank:int}/{n:path}.weight", over: rank, mode: same, to: "{n}.weight"}',
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("n", [2, 4])
def test_merge_over_rank_any_rank_count(tmp_path, n):
    """One spec for 2 and 4 ranks: merges over the `rank` capture of the files; replicated norms
    are checked equal (a diverged replica stops the conversion before anything is written)."""
    folder, full = _meta_folder(tmp_path, n=n)
    spec = tmp_path / "over.yaml"
    spec.write_text(f'name: over\nversion: 1\ninputs: "consolidated.{{rank:int}}.pth"\nrules:\n{_over_rank_rules()}')
    convert(spec, folder, tmp_path / "o.safetensors")
    _assert_same(load_file(tmp_path / "o.safetensors"), full)
    # negative: one rank's replica of a norm differs -> refused, nothing written
    sd = torch.load(folder / "consolidated.01.pth")
    sd["layers.1.ffn_norm.weight"] = sd["layers.1.ffn_norm.weight"] + 1
    torch.save(sd, folder / "consolidated.01.pth")
    with pytest.raises(StatemapError, match=r"01/layers\.1\.ffn_norm\.weight"):
        convert(spec, folder, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
