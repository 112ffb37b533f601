"""A large index held as columns, and the planner's whole-list paths, give what the per-key paths give.

`open_checkpoint` reads a sharded safetensors index with common headers as parallel lists
(`statemap.load.checkpoint.Columns`) and builds a key's TensorMeta / ByteTensor / storage id only
when it is read; the planner plans a spec of plain renames over the list of names, and `inspect`
folds names with one regex pass. Each is compared here with the per-key path it stands in for.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from statemap import load_spec, make_plan
from statemap.errors import PlanError
from statemap.load import formats, open_checkpoint
from statemap.load import safetensors_format as st
from statemap.load.checkpoint import LocationView, MetaView, StorageView, columns_of
from statemap.meta import TensorMeta
from tests.test_index_outputs import keys, write_index


def opened(index: Path) -> tuple[object, object]:
    """(the columns reader's checkpoint, the per-key fast path's)."""
    lazy = formats._open_index_columns(index)
    eager = formats._open_index_fast(index)
    assert lazy is not None and eager is not None
    assert isinstance(lazy.metas, MetaView) and not isinstance(eager.metas, MetaView)
    return lazy, eager


@pytest.mark.parametrize("reverse", [False, True], ids=["index-order", "index-reversed"])
def test_columns_give_what_the_per_key_reader_gives(tmp_path, reverse):
    entries = keys(layers=3, experts=4)
    index = write_index(tmp_path / "a", entries[::-1] if reverse else entries)
    lazy, eager = opened(index)
    for attr in ("path", "format", "metadata"):
        assert getattr(lazy, attr) == getattr(eager, attr), attr
    assert list(lazy.metas) == list(eager.metas)  # the index's order
    assert list(lazy.metas.items()) == list(eager.metas.items())
    assert list(lazy.metas.values()) == list(eager.metas.values())
    assert dict(lazy.locations) == dict(eager.locations)
    assert dict(lazy.storage_ids) == dict(eager.storage_ids)
    assert lazy.tied_groups() == eager.tied_groups() == []
    k = entries[7][0]
    assert (lazy.read(k) == eager.read(k)).all()
    lazy.close()
    eager.close()


def rewrite_index(index: Path, change) -> None:
    """Rewrite the index's text: ``change(body, wm_items)`` returns the new text."""
    body = json.loads(index.read_text())
    index.write_text(change(body, list(body["weight_map"].items())))


def same_checkpoints(a, b) -> None:
    for attr in ("path", "format", "metadata"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert list(a.metas.items()) == list(b.metas.items())
    assert dict(a.locations) == dict(b.locations)


INDEX_TEXTS = {  # each: the text of an index, from its JSON and its weight_map items (key, shard) in shard order
    "json.dumps": lambda b, wm: json.dumps(b),
    "indent=2 (statemap, HF)": lambda b, wm: json.dumps(b, indent=2),
    "compact": lambda b, wm: json.dumps(b, separators=(",", ":")),
    "metadata after": lambda b, wm: json.dumps({"weight_map": b["weight_map"], "metadata": {"a": "b"}}),
    # other key orders or spacing: parsed whole
    "sorted keys": lambda b, wm: json.dumps(b, indent=2, sort_keys=True),
    "mixed spacing": lambda b, wm: json.dumps(b).replace('", "', '","', 1),
    "reversed in a shard": lambda b, wm: json.dumps({**b, "weight_map": dict([*wm[:3][::-1], *wm[3:]])}),
    "weight_map named in metadata": lambda b, wm: json.dumps({**b, "metadata": {"note": "weight_map", "x": '"weight_map"'}}),
    "nested weight_map": lambda b, wm: json.dumps({"metadata": {"weight_map": {}}, "weight_map": b["weight_map"]}),
    "a key twice in the text": lambda b, wm: json.dumps(b).replace("}}", ', "' + wm[0][0] + '": "' + wm[0][1] + '"}}'),
    "an escaped key": lambda b, wm: json.dumps(b).replace(
        wm[5][0][:5], wm[5][0][:4] + "\\u00" + format(ord(wm[5][0][4]), "x"), 1
    ),
}
GROUPED = {"json.dumps", "indent=2 (statemap, HF)", "compact", "metadata after"}


@pytest.mark.parametrize("form", list(INDEX_TEXTS))
def test_the_grouped_index_reads_what_the_parsed_index_reads(tmp_path, form, monkeypatch):
    """An index listing each shard's keys together is checked against the shard headers' names
    without parsing its weight_map; the result is the index parsed whole (or that reader's None)."""
    index = write_index(tmp_path / "a", keys(layers=2, experts=3), n_shards=4)
    rewrite_index(index, INDEX_TEXTS[form])
    grouped = formats._grouped_index(index, index.read_bytes(), {})
    assert (grouped is not None) == (form in GROUPED)
    fast = formats._open_index_columns(index)
    with monkeypatch.context() as m:
        m.setattr(formats, "_grouped_index", lambda *a: None)
        whole = formats._open_index_columns(index)
    assert (fast is None) == (whole is None)
    if fast is not None:
        same_checkpoints(fast, whole)
        same_checkpoints(fast, formats._open_index_fast(index))
    else:  # the per-key paths read it (a key given twice: both map it to the shard that holds it)
        same_checkpoints(open_checkpoint(index), formats._open_index_fast(index))


def test_the_grouped_index_sees_a_key_in_two_shards(tmp_path):
    """Negative check: the text lists every shard's keys, in order, under its shard, but one key
    is in two shards (json.loads would keep one of its two members)."""
    entries = keys(layers=2, experts=2)
    index = write_index(tmp_path / "a", [*entries, entries[0]], n_shards=3)
    shards = sorted(p.name for p in index.parent.glob("*.safetensors"))
    members = [f'"{k}": "{s}"' for s in shards for k in st.read_columns(str(index.parent / s)).names]
    index.write_text('{"metadata": {}, "weight_map": {' + ", ".join(members) + "}}")
    assert formats._grouped_index(index, index.read_bytes(), {}) is not None
    assert formats._open_index_columns(index) is None
    with pytest.raises(Exception, match="two shards|appears twice"):
        open_checkpoint(index)


def test_lazy_mappings_behave_as_dicts(tmp_path):
    entries = keys(layers=2, experts=2)
    index = write_index(tmp_path / "a", entries)
    lazy, eager = opened(index)
    for view, plain in ((lazy.metas, eager.metas), (lazy.locations, eager.locations), (lazy.storage_ids, eager.storage_ids)):
        assert isinstance(view, (MetaView, LocationView, StorageView))
        assert len(view) == len(plain) == len(entries)
        assert list(view) == list(plain)
        assert view.keys() == plain.keys()
        first = entries[0][0]
        assert first in view and "no.such.key" not in view and 3 not in view
        assert view[first] == plain[first] and view[first] is view[first]  # built once
        assert view.get(first) == plain[first]
        assert view.get("no.such.key") is None and view.get("no.such.key", 1) == 1
        with pytest.raises(KeyError):
            view["no.such.key"]
    with pytest.raises(Exception, match="no tensor"):
        lazy.read("no.such.key")
    assert columns_of(lazy.metas) is lazy.metas.columns and columns_of(eager.metas) is None
    lazy.close()
    eager.close()


def test_a_changed_shape_shows_in_the_columns(tmp_path):
    """Negative check: the comparisons above see one shape changed in one shard."""
    entries = keys(layers=2, experts=2)
    a = opened(write_index(tmp_path / "a", entries))[0]
    name = entries[3][0]
    b = opened(write_index(tmp_path / "b", [(k, [5] if k == name else s, dt) for k, s, dt in entries]))[0]
    assert a.metas[name] != b.metas[name]
    assert list(a.metas.items()) != list(b.metas.items())


def test_zero_size_tensors_keep_their_ties(tmp_path):
    """Empty tensors share an offset (and a storage id): found as ties, as the per-key reader finds them."""
    entries = [("a.w", [2], "F32"), ("a.e", [0], "F32"), ("a.f", [0], "F32"), ("b.w", [1], "F32")]
    lazy, eager = opened(write_index(tmp_path / "a", entries, n_shards=1))
    assert lazy.tied_groups() == eager.tied_groups() == [["a.e", "a.f"]]


def write_shard(path: Path, header: str, data: int) -> str:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    return str(path)


E = '{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'
UNUSUAL = [
    ('{"w":' + E % (0, 4) + ',"w":' + E % (4, 8) + "}", 8),  # a repeated name
    ('{"w\\u003a":' + E % (0, 4) + "}", 4),  # an escape
    ('{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4),
    ('{"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', 4),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}', 4),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4),
    ('{"v":' + E % (4, 8) + ',"w":' + E % (0, 4) + "}", 8),  # valid, but out of order: the per-key reader's
    ('{"w":' + E % (0, 4) + "}", 8),  # padding after the data
    ('{"w":{"dtype":"XX","shape":[1],"data_offsets":[0,4]}}', 4),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":["0",4]}}', 4),
    ('{"__metadata__":{"a":1},"w":' + E % (0, 4) + "}", 4),
    ('{"__metadata__":{"a":"1","a":"2"},"w":' + E % (0, 4) + "}", 4),  # a repeated metadata key
    ("{}", 0),
    ("[1]", 0),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[00,4]}}', 4),  # not JSON: a leading zero
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4e0]}}', 4),
    ('{"w":' + E % (0, 4) + ",}", 4),  # a trailing comma
    ('{"w":' + E % (0, 4) + '"v":' + E % (4, 8) + "}", 8),  # a missing comma
    ('{"w\t":' + E % (0, 4) + "}", 4),  # a raw control character in a name
    ('{"w":' + E % (0, 4) + ',"__metadata__":' + E % (4, 8) + "}", 8),  # metadata, not a tensor (and not strings)
]


@pytest.mark.parametrize("header,data", UNUSUAL)
def test_unusual_headers_are_left_to_the_per_key_reader(tmp_path, header, data):
    assert st.read_columns(write_shard(tmp_path / "m.safetensors", header, data)) is None


def test_plain_headers_read_as_columns(tmp_path):
    path = write_shard(
        tmp_path / "m.safetensors",
        '{"__metadata__":{"format":"pt"},"w":'
        + E % (0, 4)
        + ', "b": {"dtype": "BF16", "shape": [2, 1], "data_offsets": [4, 8]}}',
        8,
    )
    cols = st.read_columns(path)
    assert cols is not None
    metas, locs, _, _ = st.read_header_ids(path)
    assert cols.names == list(metas)
    assert [cols.kinds[p][:2] for p in cols.pairs] == [(m.dtype, m.shape) for m in metas.values()]
    assert [cols.data_start + b for b in cols.begins] == [loc.offset for loc in locs.values()]


S = '{"dtype": "F32", "shape": [1], "data_offsets": [%d, %d]}'
# valid headers, each read by the one-pass text reader (compact or json.dumps spacing, a leading
# __metadata__ of strings, names holding JSON punctuation or non-ASCII text, empty and scalar shapes)
TEXT_FORMS = [
    ('{"__metadata__":{"format":"pt","a:b":"c, d"},"w":' + E % (0, 4) + ',"x,y}{[":' + E % (4, 8) + "}", 8),
    ('{"w": ' + S % (0, 4) + ', "a: {b}": ' + S % (4, 8) + "}", 8),
    ('{"__metadata__": {"format": "pt"}, "\u00fc.\u00df x": ' + S % (0, 4) + "}", 4),
    (
        '{"__metadata__":{},"s":{"dtype":"I64","shape":[],"data_offsets":[0,8]},"e":{"dtype":"F16","shape":[0,3],"data_offsets":[8,8]}}',
        8,
    ),
]
# valid, but in a form the text reader leaves to the JSON one (other spacing, order, numbers)
JSON_FORMS = [
    ('{\n "w": ' + S % (0, 4) + "\n}", 4),
    ('{"w":{"shape":[1],"dtype":"F32","data_offsets":[0,4]}}', 4),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}', 4),
    ('{"w":' + E % (0, 4) + ',"__metadata__":{"format":"pt"}}', 4),
    ('{"w":' + E % (0, 4) + ', "v": ' + S % (4, 8) + "}", 8),
]


def raw_of(header: str, data: int) -> tuple[bytes, int, int]:
    raw = header.encode()
    return raw, len(raw), 8 + len(raw) + data


def same_columns(a: st.HeaderColumns, b: st.HeaderColumns) -> bool:
    return (a.names, a.pairs, a.begins, a.data_start, a.kinds) == (b.names, b.pairs, b.begins, b.data_start, b.kinds)


@pytest.mark.parametrize("header,data", TEXT_FORMS + JSON_FORMS)
def test_the_text_reader_reads_what_the_json_reader_reads(tmp_path, header, data):
    got = st._columns_text(*raw_of(header, data))
    assert (got is not None) == ((header, data) in TEXT_FORMS)
    cols = st.read_columns(write_shard(tmp_path / "m.safetensors", header, data))
    want = st._columns(*raw_of(header, data))
    assert cols is not None and want is not None and same_columns(cols, want)
    if got is not None:
        assert same_columns(got, want)
    metas, locs, _, _ = st.read_header_ids(str(tmp_path / "m.safetensors"))
    assert cols.names == list(metas)
    assert [cols.kinds[p][:2] for p in cols.pairs] == [(m.dtype, m.shape) for m in metas.values()]
    assert [cols.data_start + b for b in cols.begins] == [loc.offset for loc in locs.values()]


def test_the_text_reader_sees_a_changed_entry():
    """Negative check: the comparison above sees a different shape and a different offset."""
    a = st._columns_text(*raw_of(TEXT_FORMS[3][0], 8))
    b = st._columns_text(*raw_of(TEXT_FORMS[3][0].replace("[0,3]", "[3,0]"), 8))
    assert a is not None and b is not None and not same_columns(a, b)
    assert st._columns_text(*raw_of(TEXT_FORMS[3][0].replace("[8,8]", "[8,9]"), 9)) is None


def test_the_text_reader_accepts_only_what_the_checked_reader_accepts(tmp_path):
    """Random one-character edits of a valid header: whatever the text reader accepts, the checked
    reader (json.loads with every check) accepts too, with the same names, shapes and offsets."""
    import random

    rnd = random.Random(14)
    base = TEXT_FORMS[0][0]
    alphabet = '{}[]",: 0123456789-.eaw\\'
    accepted = 0
    for _ in range(400):
        i = rnd.randrange(len(base))
        edited = base[:i] + rnd.choice(["", rnd.choice(alphabet), rnd.choice(alphabet) + base[i]]) + base[i + 1 :]
        raw, n, size = raw_of(edited, 8)
        try:
            got = st._columns_text(raw, n, size)
        except Exception:  # read_columns declines on any exception
            continue
        if got is None:
            continue
        accepted += 1
        metas, locs, _, _ = st._slow("m", raw, n, size)
        assert got.names == list(metas)
        assert [got.kinds[p][:2] for p in got.pairs] == [(m.dtype, m.shape) for m in metas.values()]
        assert [got.data_start + b for b in got.begins] == [loc.offset for loc in locs.values()]
    assert accepted > 20  # edits inside names and metadata strings keep the header valid


def test_the_index_is_left_to_the_per_key_path_when_unusual(tmp_path):
    index = write_index(tmp_path / "a", keys(layers=2, experts=2))
    body = json.loads(index.read_text())
    body["weight_map"]["model.norm.weight"] = body["weight_map"]["lm_head.weight"] = "model-00001-of-00007.safetensors"
    index.write_text(json.dumps(body))
    assert formats._open_index_columns(index) is None
    with pytest.raises(Exception, match="index maps|which the index maps to"):
        open_checkpoint(index)


# -- the planner ---------------------------------------------------------------------------------

RENAMES = """name: t
version: 1
rules:
  - rename: "model.embed_tokens.weight -> tok.weight"
  - rename: "model.layers.{i}.mlp.experts.{e}.{proj}.weight -> layers.{i}.moe.experts.{e}.{proj}.w"
  - rename: "model.layers.{i}.mlp.shared_experts.{proj}.weight -> layers.{i}.moe.shared.{proj}.w"
  - rename: "layers.{i}.moe.shared.{proj}.w -> L.{i}.{proj}.{i}"
  - rename: "model.layers.{i}.{n}_layernorm.weight -> layers.{i}.{n}_norm.w"
  - rename: "model.nothing.{x} -> y.{x}"
    optional: true
  - rename: "lm_head.weight -> head.w"
"""


def metas_of(entries: list[tuple[str, list[int], str]]) -> list[TensorMeta]:
    return [TensorMeta(k, tuple(s), "float32") for k, s, _ in entries]


def general(spec, source, monkeypatch):
    from statemap import plan

    with monkeypatch.context() as m:
        m.setattr(plan, "_renames_only", lambda *a: None)
        return make_plan(spec, source)


def summary(p):
    return (
        [(o.name, o.node, o.rule, o.tie) for o in p.outputs],
        p.passthrough,
        p.matches,
        p.unmatched,
        p.ties,
        p.source_ties,
        p.dropped,
        p.checks,
        list(p.output_metas),
        p.same,
    )


VARS = """name: t
version: 1
vars:
  pre: "x"
rules:
  - rename: "model.layers.{i}.mlp.experts.{e}.{proj}.weight -> {pre}.{i}.{e}.{proj}"
  - rename: "model.norm.weight -> {pre}.norm"
  - rename: "lm_head.weight -> 100%.w"
"""


@pytest.mark.parametrize("text", [RENAMES, VARS], ids=["renames", "vars-in-targets"])
def test_renames_give_what_the_general_planner_gives(monkeypatch, text):
    spec = load_spec(text)
    source = metas_of(keys(layers=3, experts=5))
    from statemap import plan

    whole_list = plan._renames_only(spec, tuple(source), [m.name for m in source], {m.name: m for m in source}.__getitem__, [])
    assert (whole_list is not None) == (text is RENAMES)  # a var in a target: the general table plans it
    fast = make_plan(spec, source)
    assert fast.passthrough
    assert summary(fast) == summary(general(spec, source, monkeypatch))
    assert fast.outputs[-1] == fast.outputs[len(fast.outputs) - 1]
    assert list(fast.outputs[2:5]) == list(fast.outputs)[2:5]
    with pytest.raises(IndexError):
        fast.outputs[len(fast.outputs)]


def test_renames_over_index_columns(tmp_path, monkeypatch):
    entries = keys(layers=3, experts=5)
    lazy, eager = opened(write_index(tmp_path / "a", entries[::-1]))
    spec = load_spec(RENAMES)
    fast = make_plan(spec, lazy.metas.values())
    assert summary(fast) == summary(general(spec, list(eager.metas.values()), monkeypatch))
    assert list(fast.source) == list(eager.metas.values())


def test_the_comparison_sees_a_changed_rename(monkeypatch):
    """Negative check: a different target gives a different summary."""
    source = metas_of(keys(layers=2, experts=2))
    a = make_plan(load_spec(RENAMES), source)
    b = make_plan(load_spec(RENAMES.replace("{n}_norm.w", "{n}_ln.w")), source)
    assert summary(a) != summary(b)


@pytest.mark.parametrize(
    "rules,match",
    [
        ('- rename: "model.layers.{i}.mlp.experts.{e}.{p}.weight -> x.{i}.{p}"', "writes 'x.0.gate_proj' twice"),
        ('- rename: "model.layers.{i}.mlp.gate.weight -> model.norm.weight"', "writes 'model.norm.weight' twice"),
        ('- rename: "model.layers.0.mlp.gate.weight -> model.norm.weight"', "which already exists"),
        ('- rename: "model.nothing.{x} -> y.{x}"', "matched no key"),
        ('- rename: "model.norm.weight -> lm_head.weight"', "which already exists"),
        ('- rename: "lm_head.weight -> x"\n  - rename: "model.norm.weight -> x"', "which already exists"),
    ],
)
def test_rename_errors_are_the_general_planners(rules, match, monkeypatch):
    spec = load_spec(f"name: t\nversion: 1\nrules:\n  {rules}\n")
    source = metas_of(keys(layers=2, experts=2))
    with pytest.raises(Exception, match=match) as fast:
        make_plan(spec, source)
    with pytest.raises(Exception, match=match) as slow:
        general(spec, source, monkeypatch)
    assert str(fast.value) == str(slow.value)
    assert isinstance(fast.value, (PlanError, type(slow.value)))


RULE_POOL = [
    '- rename: "model.layers.{i}.mlp.experts.{e}.{p}.weight -> x.{i}.{e}.{p}"',
    '- rename: "model.layers.{i}.mlp.experts.{e}.{p}.weight -> x.{i}.{p}"',  # two keys, one name
    '- rename: "x.{i}.{e}.{p} -> model.norm.weight"',
    '- rename: "x.{i}.{e}.{p} -> y.{p}.{e}.{i}"',
    '- rename: "model.layers.{i}.{n}_layernorm.weight -> n.{i}.{n}"',
    '- rename: "model.layers.{i}.mlp.gate.weight -> model.layers.{i}.input_layernorm.weight"',  # onto an existing key
    '- rename: "model.layers.0.mlp.gate.weight -> lm_head.weight"',
    '- rename: "lm_head.weight -> model.layers.0.mlp.gate.weight"',
    '- rename: "model.norm.weight -> z"',
    '- rename: "lm_head.weight -> z"',
    '- rename: "z -> lm_head.weight"',
    '- rename: "n.{i}.{n} -> model.layers.{i}.{n}_layernorm.weight"',
    '- rename: "y.{a}.{b}.{c} -> x.{c}.{b}.{a}"',
    '- rename: "model.{rest:path} -> m.{rest}"',
    '- rename: "model.nothing.{x} -> w.{x}"\n    optional: true',
]


def test_random_rename_specs_plan_as_the_general_planner_plans(monkeypatch):
    """Specs of 1-5 renames drawn from rules that chain, clash, write one name twice or move a
    key back: the whole-list path gives the general table's plan, or its error."""
    import random

    rnd = random.Random(7)
    source = metas_of(keys(layers=2, experts=2))
    for _ in range(300):
        drawn = [rnd.choice(RULE_POOL) for _ in range(rnd.randint(1, 5))]
        rules = "\n  ".join(r + ("\n    optional: true" if rnd.random() < 0.6 and "optional" not in r else "") for r in drawn)
        spec = load_spec(f"name: t\nversion: 1\nrules:\n  {rules}\n")
        try:
            fast: object = summary(make_plan(spec, source))
        except PlanError as e:
            fast = str(e)
        try:
            slow: object = summary(general(spec, source, monkeypatch))
        except PlanError as e:
            slow = str(e)
        assert fast == slow, rules


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_folds_columns_as_it_folds_metas(tmp_path):
    from statemap.inspect import dtype_counts, module_rows, totals

    entries = [
        ("0.weight", [2], "F32"),
        *keys(layers=2, experts=3),
        ("top", [3], "BF16"),
        ("a.01.b", [1], "F16"),
        ("a.1.c", [2], "F16"),
        ("x.7", [4], "I64"),
        ("5.", [1], "F32"),  # an index segment and its dot, nothing after
        (".3.w", [1], "F32"),
        ("b.", [2], "F32"),
        ("a.b.12", [1], "F32"),
        ("a.b.12.", [1], "F32"),
    ]
    lazy, eager = opened(write_index(tmp_path / "a", entries, n_shards=3))
    for depth in (1, 2, 3):
        assert module_rows(lazy, depth) == module_rows(eager, depth)
    assert dtype_counts(lazy) == dtype_counts(eager)
    assert (
        totals(lazy) == totals(eager) == (sum(m.numel for m in eager.metas.values()), sum(m.nbytes for m in eager.metas.values()))
    )


def test_inspect_folds_one_kind_of_tensor(tmp_path):
    """Every key one dtype and shape (the counting skips the per-key kinds)."""
    from statemap.inspect import module_rows

    entries = [(k, [2, 2], "BF16") for k, _, _ in [("head.w", 0, 0), *keys(layers=3, experts=2), ("a.3.b.4.c", 0, 0)]]
    lazy, eager = opened(write_index(tmp_path / "a", entries, n_shards=2))
    assert len(lazy.metas.columns.kinds) == 1
    assert module_rows(lazy) == module_rows(eager)
    row = next(r for r in module_rows(lazy) if r.module == "model.layers.{0-2}")
    assert row.params == 4 * row.tensors > 4 * 3 * 6  # every tensor 2 x 2, over three layers


# -- the joined-names regex -------------------------------------------------------------------

TRICKY = [
    "a.1.w",
    "a.12.w",
    "a..w",
    "a.x.y.w",
    "a.\u0663.w",  # an Arabic-Indic digit: \\d takes it, as in the per-key regex
    "a.1.w.w",
    "a.1.ww",
    "xa.1.w",
    "a.1.",
    ".a.1.w",
    "a.1.w ",
    "",
    "a.%s.w",
    "b.2.c.3.w",
]


@pytest.mark.parametrize(
    "text",
    ["a.{i}.w", "a.{i:int}.w", "{p:path}.w", "a.{i}.{rest:path}", "{x}.{i:int}.c.{j}.w", "a.{i}{j:int}.w"],
)
def test_joined_regex_finds_what_fullmatch_finds(text):
    from statemap.keymatch import joined_regex
    from statemap.plan import _joined
    from statemap.template import parse_pattern

    pattern = parse_pattern(text)
    rx = _joined(pattern)
    parts = [("lit", p.text) if not hasattr(p, "kind") else ("cap", p.name, p.kind) for p in pattern.parts]
    if rx is None:  # the per-key path plans it (two captures in one segment, ...)
        assert joined_regex(parts) is None or len(set(pattern.captures)) != len(pattern.captures)
        return
    found = rx.findall("\n".join(["", *TRICKY, ""]))
    want = [(k, *pattern.match(k).values()) for k in TRICKY if pattern.match(k) is not None]
    assert [f if isinstance(f, tuple) else (f,) for f in found] == want
    assert want  # each pattern matches some of the keys (the comparison is not of two empty lists)
