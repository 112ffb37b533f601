"""The planner's fast paths give the results of the general ones.

- Template patterns that cannot make Python's `re` backtrack more than linearly run on `re`;
  captures must equal the linear-time automaton's on matching and non-matching keys, and
  templates outside that class keep the automaton.
- The planner updates its key table in place (each replacement takes the place of the key it
  replaces): output order, errors and tie groups are those of the rule-by-rule rebuild.
"""

from __future__ import annotations

import pytest

from statemap import TensorMeta, load_spec, make_plan
from statemap.errors import PlanError
from statemap.keymatch import compile_template
from statemap.template import _template_parts

KEYS = [
    "model.layers.12.mlp.experts.7.up_proj.weight",
    "model.layers.x.mlp.experts.7.up_proj.weight",
    "model.layers.12.self_attn.q_proj.weight",
    "model.layers.12.input_layernorm.weight",
    "encoder.layers.3.fc1.weight",
    "encoder.layers.3.fc1",
    "encoder..fc1.weight",
    "a.b.c.d.e.f.weight",
    "lm_head.weight",
    "",
]
FAST = [
    "model.layers.{i}.mlp.experts.{e}.{proj}.weight",
    "model.layers.{i:int}.{n}_layernorm.weight",
    "model.layers.{i}.self_attn.{p}_proj.{w}",
    "encoder.{rest:path}",
    "{prefix:path}.weight",
    "encoder.layers.{i:int}.fc{n:int}.weight",
    "a.{x}.c.{rest:path}.weight",
]
SLOW = [
    "{a}{b}.weight",  # two captures touch
    "{a}_{b}.weight",  # two captures in one segment
    "{a:path}.{b}.weight",  # a capture after a path capture
    "{a}.{a}.weight",  # a repeated name must capture the same text
]


def _automaton(text):
    m = compile_template(_template_parts(text))
    m.fast = None
    return m


@pytest.mark.parametrize("text", FAST)
def test_fast_templates_capture_what_the_automaton_captures(text):
    m = compile_template(_template_parts(text))
    assert m.fast is not None
    ref = _automaton(text)
    hits = 0
    for key in KEYS:
        assert m.match(key) == ref.match(key), key
        assert m.spans(key) == ref.spans(key), key
        hits += m.match(key) is not None
    assert hits  # every template matches one of the keys: the comparison is not vacuous


@pytest.mark.parametrize("text", SLOW)
def test_templates_that_could_backtrack_keep_the_automaton(text):
    assert compile_template(_template_parts(text)).fast is None


def test_negative_the_comparison_can_fail():
    assert _automaton("model.layers.{i}.{rest:path}").match(KEYS[0]) != _automaton("model.{i}.{rest:path}").match(KEYS[0])


def _plan(rules, keys, ties=()):
    spec = load_spec({"name": "t", "version": 1, "rules": rules})
    return make_plan(spec, [TensorMeta(k, (6, 2), "float32") for k in keys], ties)


def test_outputs_keep_the_place_of_the_keys_they_replace():
    keys = ["a.0.w", "b", "a.1.w", "c", "in_proj"]
    plan = _plan(
        [
            {"split": {"from": "in_proj", "to": ["q", "k", "v"]}},
            {"rename": "a.{i}.w -> x.{i}.w"},
            {"copy": {"from": "b", "to": ["b1", "b2"]}},
            {"merge": {"from": ["q", "k"], "to": "qk"}},
            {"inject": {"to": "z", "shape": [1], "value": 0}},
            {"rename": "c -> a.0.w"},
        ],
        keys,
    )
    assert [o.name for o in plan.outputs] == ["x.0.w", "b1", "b2", "x.1.w", "a.0.w", "qk", "v", "z"]
    assert plan.same == (("b1", "b2"),)


def test_writing_an_existing_key_is_refused():
    plan = _plan([{"rename": "p -> r"}, {"rename": "q -> p"}], ["p", "q"])
    assert [o.name for o in plan.outputs] == ["r", "p"]
    with pytest.raises(PlanError, match=r"writes 'c', which already exists"):
        _plan([{"rename": "a -> c"}], ["a", "b", "c"])


def test_source_ties_make_one_group_in_output_order():
    plan = _plan([{"rename": "e -> model.shared"}, {"rename": "h -> lm_head"}], ["h", "e", "x"], ties=[["e", "h"]])
    assert plan.same == (("lm_head", "model.shared"),)
