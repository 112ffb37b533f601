"""The linear-time key matcher (statemap/keymatch.py), text safety (textsafe) and file-type checks (fsutil)."""

from __future__ import annotations

import os
import random
import re
import time

import pytest

from statemap.errors import CheckpointError, SpecError
from statemap.fsutil import check_regular, read_regular
from statemap.keymatch import compile_regex
from statemap.template import parse_pattern
from statemap.textsafe import short_repr, show

REGEXES = {  # pattern: keys it matches (random edits of them make the test keys)
    r"enc\.(?P<i>\d+)\.w": ["enc.12.w"],
    r"(?P<a>.*)\.(?P<b>.*)": ["a.b.c", "."],
    r"(?P<a>.+?)\.(?P<b>.+)": ["a.b.c"],
    r"(?P<a>a|ab)(?P<b>c|bcd)(?P<d>d*)": ["abcdd", "ac"],
    r"(?P<k>(?:h|wte|wpe|ln_f)\..+)": ["h.0.w", "ln_f.b"],
    r"(?P<norm>(?:.*\.)?layernorm(?:_before|_after)?)\.weight": ["h.1.layernorm_after.weight", "layernorm.weight"],
    r"(?P<x>[^.]+)_(?P<y>[^.]+)": ["a_b_c"],
    r"^(?P<x>a{2,3})(?P<y>a{1,2}?)$": ["aaaa", "aaa"],
    r"(?P<x>(a|b)*?)(?P<y>b+)": ["abab", "bbb"],
    r"(?P<x>a$\n?)(?P<y>\n?)": ["a\n", "a"],
    r"(?P<x>[^a-c\d])+(?P<y>\w*)\Z": ["xy_1", "..a"],
    r"(?s)(?P<x>.)(?P<y>.*)": ["\nab", "a"],
    r"(?P<x>\s|\S)(?P<y>[\W_]?)": [" _", "a."],
}
TEMPLATES = {
    "{a}.{b}": ["x.y"],
    "{a:path}.{b}": ["x.y.z"],
    "{a}.{b:path}": ["x.y.z"],
    "x{a}_{b}y": ["xa_b_cy"],
    "{a:path}.{b:path}.w": ["a.b.c.w"],
    "{a:int}{b}": ["12x", "123"],
    "{a}.{a}": ["x.x"],
    "l.{i:int}.{p:path}": ["l.3.a.b"],
    "{a:path}{b:path}.w": ["ab.c.w"],
    "layer_{i}.{{lit}}.{p}": ["layer_1.{lit}.w"],
}


def _keys(examples: list[str], rnd: random.Random, n: int = 3000) -> list[str]:
    alphabet = sorted(set("".join(examples)) | set(".x1_a"))
    out = []
    for _ in range(n):
        k = list(rnd.choice(examples))
        for _ in range(rnd.randint(0, 3)):
            pos = rnd.randint(0, len(k))
            op = rnd.randrange(3)
            if op == 0:
                k.insert(pos, rnd.choice(alphabet))
            elif k and op == 1:
                del k[min(pos, len(k) - 1)]
            elif k:
                k[min(pos, len(k) - 1)] = rnd.choice(alphabet)
        out.append("".join(k))
    return out


@pytest.mark.parametrize("src", list(REGEXES))
def test_regex_captures_equal_pythons(src):
    """Same match and same captures as Python's backtracking engine, on keys near matching ones."""
    rx, m, rnd = re.compile(src), compile_regex(src), random.Random(src)
    hits = misses = 0
    for key in _keys(REGEXES[src], rnd):
        want = rx.fullmatch(key)
        assert m.match(key) == (None if want is None else want.groupdict()), (src, key)
        hits += want is not None
        misses += want is None
    assert hits > 50 and misses > 50  # the comparison saw both outcomes


@pytest.mark.parametrize("text", list(TEMPLATES))
def test_template_captures_equal_the_regex_they_stand_for(text):
    p, rnd = parse_pattern(text), random.Random(text)
    rx = re.compile(p.regex)  # the equivalent Python regex (with a back-reference for a repeated capture)
    hits = misses = 0
    for key in _keys(TEMPLATES[text], rnd):
        want = rx.fullmatch(key)
        assert p.match(key) == (None if want is None else want.groupdict()), (text, key)
        hits += want is not None
        misses += want is None
    assert hits > 50 and misses > 50


def test_captures_differ_when_patterns_differ():
    """The comparison above can fail: greedy and lazy captures split a key differently."""
    assert compile_regex(r"(?P<a>.*)\.(?P<b>.*)").match("x.y.z") == {"a": "x.y", "b": "z"}
    assert compile_regex(r"(?P<a>.*?)\.(?P<b>.*)").match("x.y.z") == {"a": "x", "b": "y.z"}


def test_repeated_capture_must_agree():
    p = parse_pattern("{x}.mid.{x}")
    assert p.match("a.mid.a") == {"x": "a"}
    assert p.match("a.mid.b") is None


SLOW_FOR_BACKTRACKING = [  # (pattern, key): each takes Python's re from seconds to forever
    ("re:(.+){30}Z", "a" * 3000),
    ("re:(a|aa)+$", "a" * 5000 + "b"),
    ("re:" + "a*" * 40 + "b", "a" * 3000),
    ("re:(?P<x>.*)(?P<y>.*)(?P<z>.*)q", "x" * 20000 + "q"),
    (".".join(f"{{x{i}:path}}" for i in range(12)) + ".Z", ".".join(["a"] * 100)),
    (".".join(f"{{x{i}:path}}" for i in range(12)), ".".join(["a"] * 100)),
    ("_".join(f"{{x{i}}}" for i in range(12)) + ".w", "_".join(["x"] * 2000) + ".v"),
]


@pytest.mark.parametrize("text,key", SLOW_FOR_BACKTRACKING, ids=range(len(SLOW_FOR_BACKTRACKING)))
def test_catastrophic_shapes_match_in_milliseconds(text, key):
    p = parse_pattern(text)
    t = time.perf_counter()
    p.match(key)
    p.match(key + "!")
    assert time.perf_counter() - t < 0.5  # milliseconds on a laptop; generous for a loaded CI machine


def test_time_grows_linearly_with_the_key():
    p = parse_pattern(".".join(f"{{x{i}:path}}" for i in range(12)) + ".Z")

    def cost(n: int) -> float:
        key = ".".join(["a"] * n) + ".Y"
        t = time.perf_counter()
        for _ in range(3):
            p.match(key)
        return time.perf_counter() - t

    cost(50)
    assert cost(3200) < 40 * cost(400) + 0.05  # 8x the key: ~8x the time, not 8**12


@pytest.mark.parametrize(
    "src,message",
    [
        (r"(?P<a>x)(?P=a)", "back-reference"),
        (r"(a)\1", "back-reference"),
        (r"(?=a)a", "look-around"),
        (r"(?<!a)b", "look-around"),
        (r"\ba", "word-boundary"),
        (r"(?i)a", "inline flag"),
        (r"(?i:a)b", "scoped inline flag"),
        (r"(?>a+)b", "atomic group or possessive repeat"),
        (r"a++b", "atomic group or possessive repeat"),
        (r"(a{1000}){1000}", "too large"),
        (r"(?P<a", "invalid regex"),
    ],
)
def test_unsupported_regex_is_refused_when_the_spec_loads(src, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_pattern("re:" + src)


def test_show_escapes_and_cuts():
    assert show("enc.[/bold].w") == "enc.[/bold].w"  # markup stays text (consoles render no markup)
    assert show("a\x1b]0;t\x07b\nc\u202ed") == "a\\x1b]0;t\\x07b\\nc\\u202ed"
    long = "F" * 10 + "x" * 10_000 + "problem"
    cut = show(long, 100)
    assert cut.startswith("FFFFFFFFFFx") and cut.endswith("problem") and "characters cut" in cut and len(cut) < 200
    assert short_repr(10**5000) == "<an integer of 16,610 bits>"
    assert short_repr("y" * 10**6).endswith("...(1,000,000 long)")


def test_non_regular_files_are_refused_by_type(tmp_path):
    fifo = tmp_path / "f.safetensors"
    os.mkfifo(fifo)
    zero = tmp_path / "z.yaml"
    zero.symlink_to("/dev/zero")
    ok = tmp_path / "ok.json"
    ok.write_bytes(b"{}")
    with pytest.raises(CheckpointError, match=r"f\.safetensors: checkpoint is a FIFO \(named pipe\), not a regular file"):
        check_regular(fifo, "checkpoint")
    with pytest.raises(SpecError, match=r"z\.yaml: spec is a character device"):
        read_regular(zero, 1 << 20, "spec", SpecError)
    with pytest.raises(CheckpointError, match=r"fifo|FIFO"):
        read_regular(fifo, 1 << 20)  # opened non-blocking: refused, not hung
    with pytest.raises(CheckpointError, match=r"is a directory"):
        check_regular(tmp_path)
    with pytest.raises(CheckpointError, match=r"larger than 1 bytes"):
        read_regular(ok, 1)
    assert read_regular(ok, 2) == b"{}" and check_regular(ok) == 2
