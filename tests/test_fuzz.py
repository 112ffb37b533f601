"""Property-based fuzzing: random and mutated inputs to the spec parser, the template engine
and the file readers. Nothing but StatemapError may escape. Bounded to about a minute."""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

import statemap
from statemap import StatemapError, TensorMeta, load_spec, make_plan
from statemap.template import eval_expr, parse_expr, parse_pattern, parse_template

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

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
    return out


SEEDS = _seed_files()


@pytest.mark.parametrize("suffix", list(SEEDS))
def test_readers_on_mutated_files(suffix):
    data = SEEDS[suffix]
    d = tempfile.mkdtemp()

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(EDITS)
    def run(edits):
        path = os.path.join(d, "f." + suffix)
        with open(path, "wb") as f:
            f.write(_mutate(data, edits))
        try:
            with statemap.open_checkpoint(path) as ck:
                for k in ck.metas:
                    a = ck.read(k)
                    assert tuple(a.shape) == ck.metas[k].shape
        except StatemapError:
            pass

    run()
