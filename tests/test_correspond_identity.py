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
