"""Fuzzing: random and mutated inputs to the spec parser, the template engine and every reader.

In process (hypothesis, 2 s deadline per example): the spec parser, planner, templates and
expressions; nothing but StatemapError may escape. Through the CLI (seeded mutations, each run in
a child process under a 2 GiB memory cap and a 10 s deadline): every reader and the spec parser;
one error line, never a traceback or a hang. Bounded to about a minute."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from statemap import StatemapError, TensorMeta, load_spec, make_plan
from statemap.template import eval_expr, parse_expr, parse_pattern, parse_template

# in-process: the spec parser and the template engine (bounded by themselves); a 2 s deadline per example
FAST = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

GOOD_SPEC = """name: fuzz
version: 1
vars: {n: 2, vocab: 4}
strict: false
rules:
  - split: {from: 'a.{i}.w', to: ['q.{i}', 'k.{i}'], dim: 0}
  - merge: {from: ['q.{i}', 'k.{i}'], to: 'qk.{i+1}'}
  - slice: {from: e, stop: vocab}
  - pad: {from: e, size: 6, value: 1}
  - transpose: m
  - inject: {to: z, shape: [1, {dim: 0, of: e}], value: 0}
  - rename: "qk.{j} -> out.{2*j-1}"
  - drop: {from: nope, optional: true}
"""
METAS = [
    TensorMeta("a.0.w", (4, 3), "float32"),
    TensorMeta("a.1.w", (4, 3), "float32"),
    TensorMeta("e", (5, 3), "bfloat16"),
    TensorMeta("m", (2, 3), "float16"),
]


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in edits:
        if not b:
            break
        pos %= len(b)
        if kind == 0:
            b[pos] = val
        elif kind == 1:
            del b[pos : pos + 1 + val % 8]
        else:
            b[pos:pos] = bytes([val]) * (1 + val % 4)
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=6)


def test_the_seed_spec_plans():
    assert [o.name for o in make_plan(load_spec(GOOD_SPEC), METAS).outputs] == ["out.1", "out.3", "e", "m", "z"]


@FAST
@given(st.text(max_size=300))
def test_spec_parser_random_text(text):
    try:
        load_spec(text if "\n" in text else text + "\n")
    except StatemapError:
        pass


@FAST
@given(EDITS)
def test_spec_parser_and_planner_mutated(edits):
    text = _mutate(GOOD_SPEC.encode(), edits).decode("utf-8", "replace")
    try:
        make_plan(load_spec(text if "\n" in text else text + "\n"), METAS)
    except StatemapError:
        pass


@FAST
@given(
    st.text(alphabet="{}:.+-*/%()_ ai0123456789xre\\[]?<>P|", max_size=40),
    st.dictionaries(st.sampled_from(["i", "x", "n"]), st.one_of(st.integers(-5, 50), st.text(max_size=3)), max_size=3),
)
def test_templates_and_expressions(text, env):
    for parse in (parse_pattern, parse_template, parse_expr):
        try:
            obj = parse(text)
        except StatemapError:
            continue
        try:
            if parse is parse_pattern:
                obj.match("a.0.b")
                obj.match(".".join(["a0"] * 200) + "!")  # linear-time matching: never slow, whatever the pattern
            elif parse is parse_template:
                obj.fill(env)
            else:
                eval_expr(obj, env)
        except StatemapError:
            pass


def _seed_files() -> dict[str, bytes]:
    sd = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3, dtype=torch.bfloat16), "i": torch.arange(4)}
    out = {"safetensors": st_save({k: v.float().numpy() for k, v in sd.items()})}
    buf = io.BytesIO()
    torch.save({"model": sd, "args": {"lr": 1.0}}, buf)
    out["pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"model": sd}, buf, _use_new_zipfile_serialization=False)
    out["legacy.pt"] = buf.getvalue()
    import pickle

    out["pdparams"] = pickle.dumps({"w": np.arange(6, dtype="f4"), "meta": {"a": 1}}, protocol=2)
    buf = io.BytesIO()
    np.savez(buf, w=np.arange(6, dtype="f4").reshape(2, 3), b=np.ones(3, dtype="f2"))
    out["npz"] = buf.getvalue()
    buf = io.BytesIO()  # a TorchScript archive (code/ + data.pkl + constants.pkl), as torch.jit.save writes it
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))), buf)
    out["jit.pt"] = buf.getvalue()
    return out


def _dcp_seed() -> dict[str, bytes]:
    """A torch.distributed.checkpoint folder (single process): .metadata + one .distcp file."""
    import tempfile

    import torch.distributed.checkpoint as dcp

    with tempfile.TemporaryDirectory() as d:
        dcp.save({"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}}, checkpoint_id=d, no_dist=True)
        return {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)}


SEEDS = _seed_files()


def _msgpack_seed() -> bytes:
    import msgpack

    def arr(a: np.ndarray) -> msgpack.ExtType:
        return msgpack.ExtType(1, msgpack.packb([list(a.shape), a.dtype.name.encode(), a.tobytes()]))

    return msgpack.packb({"params": {"w": arr(np.arange(6, dtype="f4").reshape(2, 3)), "b": arr(np.ones(3, "f4"))}})


SEEDS["msgpack"] = _msgpack_seed()
DCP = _dcp_seed()
INDEX = b'{"metadata": {}, "weight_map": {"w": "s1.safetensors", "b": "s2.safetensors"}}'
SHARDS = {
    "s1.safetensors": st_save({"w": np.arange(12.0, dtype="f4").reshape(3, 4)}),
    "s2.safetensors": st_save({"b": np.ones(3, dtype="f4")}),
}
FUZZ_SEED = int(os.environ.get("STATEMAP_FUZZ_SEED", "12"))
FUZZ_N = int(os.environ.get("STATEMAP_FUZZ_N", "60"))  # mutated files per reader; raise it for a longer local run


def _edits(rnd: random.Random) -> list[tuple[int, int, int]]:
    return [(rnd.randrange(3), rnd.randrange(1 << 30), rnd.randrange(256)) for _ in range(rnd.randint(1, 6))]


def test_readers_and_spec_parser_through_the_cli(tmp_path):
    """Mutated files for every reader (and mutated specs) through the CLI, each in a child process
    under a 2 GiB memory cap and a 10 s deadline: exit 0, 1 or 2; an error is one line; never a
    traceback or a hang. (In-process fuzzing of the readers once drew a 19 GB memo case by chance.)"""
    from attack_runner import run_batch

    rnd = random.Random(FUZZ_SEED)
    runs: list[tuple[str, list[str], str]] = []
    kinds = {**{k: k for k in SEEDS}, "index.json": "index.json", "dcp": "dcp"}
    for suffix in kinds:
        for n in range(FUZZ_N):
            d = tmp_path / f"{suffix}-{n}"
            d.mkdir()
            if suffix == "index.json":
                name = "model.safetensors.index.json"
                target = rnd.choice([name, *SHARDS])
                for f, data in SHARDS.items():
                    (d / f).write_bytes(_mutate(data, _edits(rnd)) if f == target else data)
                (d / name).write_bytes(_mutate(INDEX, _edits(rnd)) if target == name else INDEX)
            elif suffix == "dcp":  # one of the folder's two files mutated
                name = "ckpt"
                (d / name).mkdir()
                target = rnd.choice(sorted(DCP))
                for f, data in DCP.items():
                    (d / name / f).write_bytes(_mutate(data, _edits(rnd)) if f == target else data)
            else:
                name = "f." + suffix
                (d / name).write_bytes(_mutate(SEEDS[suffix], _edits(rnd)))
            runs.append((f"{suffix}-{n}", ["diff", "--values", name, name], str(d)))
    seed_st = tmp_path / "seed.safetensors"
    seed_st.write_bytes(st_save({"a.0.w": np.zeros((4, 3), "f4"), "a.1.w": np.zeros((4, 3), "f4"), "e": np.zeros((5, 3), "f4")}))
    for n in range(2 * FUZZ_N):
        d = tmp_path / f"spec-{n}"
        d.mkdir()
        (d / "s.yaml").write_bytes(_mutate(GOOD_SPEC.encode(), _edits(rnd)))
        runs.append((f"spec-{n}", ["apply", "s.yaml", str(seed_st), "--dry-run"], str(d)))
    res = run_batch(runs, str(tmp_path), mem=2 << 30, timeout=10.0, jobs=4)
    bad = []
    for cid, _, _ in runs:
        r = res[cid]
        lines = r["stderr"].splitlines()
        if r["timeout"] or r["rc"] not in (0, 1, 2) or "Traceback" in r["stderr"]:
            bad.append((cid, r["rc"], r["timeout"], r["stderr"][-500:]))
        elif r["rc"] == 2 and (len(lines) != 1 or not lines[0].startswith("statemap: error: ")):
            bad.append((cid, r["rc"], "not one error line", r["stderr"][-500:]))
    assert not bad, bad[:5]
    assert sum(res[c]["rc"] == 2 for c, _, _ in runs) > len(runs) // 4  # the mutations do break files
