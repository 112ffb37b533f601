"""The whole-tensor identity of `diff --values` (statemap.correspond._word_hash): equal bytes give equal
identities; a changed word, two words or two blocks swapped, other tail bytes or another length
give different ones (the word sum alone misses reorders: the hash must see positions)."""

from __future__ import annotations

import numpy as np
import pytest

from statemap.correspond import _ID_WORDS, _id_keys, _word_hash


def _ident(a: np.ndarray | bytes) -> tuple[int, int]:
    return _word_hash(memoryview(a).cast("B") if isinstance(a, np.ndarray) else memoryview(a))


RNG = np.random.default_rng(11)
BASE = RNG.integers(0, 2**63, size=3 * _ID_WORDS + 77, dtype=np.uint64)  # three whole blocks and a rest


def _swap(i: int, j: int) -> np.ndarray:
    x = BASE.copy()
    x[[i, j]] = x[[j, i]]
    return x


def _changed(i: int) -> np.ndarray:
    x = BASE.copy()
    x[i] ^= np.uint64(1 << 40)
    return x


@pytest.mark.parametrize(
    ("what", "other"),
    [
        ("one word, first block", _changed(5)),
        ("one word, in the rest", _changed(3 * _ID_WORDS + 10)),
        ("two words swapped", _swap(1, 2)),
        ("words a block apart swapped", _swap(7, 7 + _ID_WORDS)),
        ("whole blocks swapped", np.concatenate([BASE[_ID_WORDS : 2 * _ID_WORDS], BASE[:_ID_WORDS], BASE[2 * _ID_WORDS :]])),
    ],
)
def test_changes_and_reorders_change_the_identity(what, other):
    assert _ident(BASE.copy()) == _ident(BASE)  # equal bytes, another buffer
    assert _ident(other)[0] != _ident(BASE)[0], what
    if "swapped" in what:
        assert _ident(other)[1] == _ident(BASE)[1]  # the word sum cannot tell: the hash must


@pytest.mark.parametrize("words", [100, 10_000])  # under and over 64 KB (zlib's CRC-32 / the word hash)
def test_tail_bytes_length_and_swaps_count(words):
    raw = BASE.tobytes()[: 8 * words + 3]
    assert _ident(raw) == _ident(bytes(raw))
    assert _ident(raw[:-1] + b"\xff")[0] != _ident(raw)[0]  # a tail byte
    zeros = bytes(8 * words)
    assert _ident(zeros + bytes(8))[0] != _ident(zeros)[0]  # one more zero word: another length
    swapped = raw[8:16] + raw[:8] + raw[16:]
    assert _ident(swapped)[0] != _ident(raw)[0] and _ident(swapped)[1] == _ident(raw)[1]
    assert _ident(b"") == (0, 0)


def test_block_multipliers_do_not_change_as_the_table_grows():
    before = _ident(BASE)
    _id_keys(1 << 20)  # a longer table (a ~64 GB buffer's worth of blocks)
    assert _ident(BASE) == before
    k, d = _id_keys(4)
    assert bool((k & np.uint64(1)).all()) and bool((d & np.uint64(1)).all())  # odd: no word change can vanish


def _negated(idx: slice | list[int]) -> np.ndarray:
    x = BASE.copy().view(np.float32)  # as float32 pairs: the high half of a word is the odd element
    x[idx] = -x[idx]
    return x.view(np.uint64)


@pytest.mark.parametrize(
    ("what", "idx"),
    [
        ("two odd elements (sign bits 63 of two words)", [1, 7]),
        ("two odd elements in different blocks", [3, 2 * _ID_WORDS + 9]),
        ("every odd element", slice(1, None, 2)),
        ("two whole words (both halves)", [0, 1, 4, 5]),
    ],
)
def test_sign_flips_in_the_high_half_change_the_identity(what, idx):
    """A word's high half has an odd multiplier of its own: with ``K * w`` alone, flipping bit 63 of
    two words added 2**63 twice (0 mod 2**64) and two negated odd-indexed float32 elements went unseen."""
    other = _negated(idx)
    assert not np.array_equal(other, BASE)
    assert _ident(other)[0] != _ident(BASE)[0], what


def test_negated_odd_elements_are_not_a_copy(tmp_path):
    """End to end: a B tensor with its odd-indexed elements negated (or just two of them) is not
    reported as a renamed copy of A's (it was, by the whole-tensor identity)."""
    from safetensors.numpy import save_file

    from statemap.diff import diff_checkpoints

    a = np.random.default_rng(0).standard_normal((64, 512), dtype=np.float32)  # 128 KB: the word hash
    every, two = a.copy(), a.copy()
    every[:, 1::2] *= -1
    two[0, 1] *= -1
    two[5, 7] *= -1
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"x": every, "y": two, "z": a.copy()}, str(tmp_path / "b.safetensors"))
    ex = diff_checkpoints(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), values=True).explanation
    kinds = {c.b: (c.kind, c.a) for c in ex.b}
    assert kinds["z"] == ("renamed", ("w",))  # the real copy still matches
    assert kinds["x"][0] == "unmatched" and kinds["y"][0] == "unmatched"
