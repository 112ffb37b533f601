"""Integer fields (dim, sizes, start/stop/step, size, count, shape, rearrange sizes): an integer,
an expression over vars and captures, or {dim: D, of: KEY}; values checked against torch."""

from __future__ import annotations

import pytest
import torch

import statemap
from statemap.errors import PlanError, SpecError
from statemap.spec import load_spec

g = torch.Generator().manual_seed(0)
W = torch.randn(12, 6, generator=g)
B = torch.randn(4, generator=g)


def run(rules: list, sd: dict, vars: dict | None = None) -> dict:
    out, _ = statemap.map_state_dict({"name": "t", "version": 1, "vars": vars or {}, "rules": rules}, sd)
    return out


@pytest.mark.parametrize(
    "rule, key, expected",
    [
        ({"split": {"from": "w", "to": ["a", "b"], "dim": "last", "sizes": ["heads * d", -1]}}, "a", W[:, :4]),
        ({"split": {"from": "w", "to": ["a", "b"], "sizes": [{"dim": 0, "of": "b4"}, -1]}}, "b", W[4:]),
        ({"split": {"from": "w", "to": ["a", "b"], "dim": {"dim": "0", "of": "one"}}}, "b", W[:, 3:]),
        ({"slice": {"from": "w", "stop": {"dim": "last - 1", "of": "b4"}, "step": "heads"}}, "w", W[0:4:2]),
        ({"pad": {"from": "w", "dim": -1, "size": "d * 4"}}, "w", torch.cat([W, torch.zeros(12, 2)], 1)),
        ({"reshape": {"from": "w", "shape": [{"dim": "0", "of": "b4"}, -1]}}, "w", W.reshape(4, 18)),
        ({"split": {"from": "l.{i}.w", "to": ["l.{i}.a", "l.{i}.b"], "dim": "i"}}, "l.1.a", W[:, :3]),
    ],
)
def test_values(rule, key, expected):
    sd = {"w": W, "b4": B, "one": torch.zeros(1), "l.1.w": W}
    if "l.{i}.w" in str(rule):
        sd = {"l.1.w": W}
    out = run([rule], sd, {"heads": 2, "d": 2, "last": 1})
    assert torch.equal(out[key], expected)


@pytest.mark.parametrize(
    "rule, error, message",
    [
        (
            {"split": {"from": "w", "to": ["a", "b"], "dim": "nope"}},
            SpecError,
            r"field 'dim' uses 'nope': not a var nor a capture",
        ),
        ({"split": {"from": "w", "to": ["a", "b"], "dim": True}}, SpecError, r"field 'dim': expected an integer, an expression"),
        ({"split": {"from": "w", "to": ["a", "b"], "dim": 1.5}}, SpecError, r"field 'dim': expected an integer"),
        ({"split": {"from": "w", "to": ["a", "b"], "dim": "2 +"}}, SpecError, r"field 'dim': expression '2 \+' ends too early"),
        ({"split": {"from": "w", "to": ["a", "b"], "dim": {"dim": 0}}}, SpecError, r"field 'dim': expected an integer"),
        (
            {"split": {"from": "w", "to": ["a", "b"], "dim": {"dim": {"dim": 0, "of": "x"}, "of": "w"}}},
            SpecError,
            r"'dim' of \{dim, of\} is an integer",
        ),
        (
            {"slice": {"from": "w", "stop": {"dim": 0, "of": "missing"}}},
            PlanError,
            r"refers to 'missing', which does not exist at this point",
        ),
        ({"slice": {"from": "w", "stop": {"dim": 5, "of": "b4"}}}, PlanError, r"'b4' has shape \[4\]; it has no dim 5"),
        ({"split": {"from": "w", "to": ["a", "b"], "dim": "last + 5"}}, PlanError, r"has 2 dims; dim 6 is out of range"),
    ],
)
def test_bad(rule, error, message):
    with pytest.raises(error, match=message):
        run([rule], {"w": W, "b4": B}, {"last": 1})


def test_inverse_keeps_an_expression_dim():
    from statemap.invert import invert

    spec = load_spec(
        {"name": "t", "version": 1, "vars": {"last": 1}, "rules": [{"split": {"from": "w", "to": ["a", "b"], "dim": "last"}}]}
    )
    inv = invert(spec)
    assert inv.data["rules"][0]["merge"]["dim"] == "last"
    out = run([{"split": {"from": "w", "to": ["a", "b"], "dim": "last"}}], {"w": W}, {"last": 1})
    back, _ = statemap.map_state_dict(inv.spec, out)
    assert torch.equal(back["w"], W)
