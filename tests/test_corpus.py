"""The real-tool corpus (issue #10): every checkpoint under tests/fixtures/corpus/ is read by statemap
with the keys, dtypes, shapes and bytes the real loader saw when the file was made.

The corpus is enumerated: each ``X.expected.json`` describes the file or folder ``X`` beside it
(written by the generators in that folder, see docs/corpus.md), so a new file with its expected.json
is covered with no new code here.

Files statemap cannot read yet are listed in KNOWN_GAPS with the way they fail today. Such a file's
test is a strict xfail: it must still fail, and in that way (a different failure is a real failure);
when a fix makes it pass, the test reports XPASS(strict) as a failure and the entry must be removed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from statemap import open_checkpoint
from statemap.cli import main
from statemap.dtypes import dtype as lookup_dtype

CORPUS = Path(__file__).resolve().parent / "fixtures" / "corpus"
EXPECTED = sorted(CORPUS.rglob("*.expected.json"))
NOT_ENTRIES = {".py", ".md"}


def _id(p: Path) -> str:
    """``checkpoint-1/rng_state.pth`` for ``checkpoint-1/rng_state.pth.expected.json``."""
    return p.relative_to(CORPUS).as_posix().removesuffix(".expected.json")


# file -> (why it fails today, regex the failure message must match: "the documented way").
KNOWN_GAPS: dict[str, tuple[str, str]] = {}  # none left: every corpus file reads as its real loader reads it


class KnownGap(Exception):
    """A corpus file failed exactly as KNOWN_GAPS documents."""


def _load(p: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(p.read_text())
    return doc


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def check_api(target: Path, doc: dict[str, Any]) -> None:
    """statemap.open_checkpoint + ck.read give exactly the real loader's tensors."""
    want = {t["name"]: t for t in doc["tensors"]}
    with open_checkpoint(target) as ck:
        assert ck.container == doc["container"], (
            f"container {ck.container!r}, real loader's model state dict is {doc['container']!r}"
        )
        missing, extra = sorted(set(want) - set(ck.metas)), sorted(set(ck.metas) - set(want))
        assert not missing and not extra, f"keys differ: missing {missing[:5]}, extra {extra[:5]}"
        for name, t in want.items():
            meta = ck.metas[name]
            assert (meta.dtype, list(meta.shape)) == (t["dtype"], t["shape"]), (
                f"{name}: {meta.dtype} {list(meta.shape)}, want {t['dtype']} {t['shape']}"
            )
            a = ck.read(name)
            if lookup_dtype(meta.dtype).value_bits:  # quint4x2 / quint2x4: the packed bytes, as torch stores them
                assert a.ndim == 1 and a.nbytes == meta.nbytes, f"{name}: read {a.nbytes} packed bytes, want {meta.nbytes}"
            else:
                assert list(a.shape) == t["shape"], f"{name}: read shape {list(a.shape)}, want {t['shape']}"
            assert _sha(a) == t["sha256"], f"{name}: bytes differ from the real loader's"


def check_cli(target: Path, doc: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """`statemap inspect --json --keys` lists the same tensors; `diff --values` of the file with itself is clean."""
    want = {t["name"]: (t["dtype"], t["shape"]) for t in doc["tensors"]}
    code = main(["inspect", "--json", "--keys", str(target)])
    out, err = capsys.readouterr()
    assert code == 0, f"inspect exit {code}: {err.strip()}"
    rep = json.loads(out)
    got = {t["name"]: (t["dtype"], list(t["shape"])) for t in rep["tensors"]}
    assert got == want, "inspect --json lists other tensors than the real loader"
    assert rep["container"] == doc["container"]
    code = main(["diff", "--values", "--json", str(target), str(target)])
    out, err = capsys.readouterr()
    assert code == 0, f"diff --values exit {code}: {err.strip()}"
    rep = json.loads(out)
    assert rep["n_common"] == len(want) and rep["same"], "diff of a file with itself is not clean"
    assert len(rep["values"]) == len(want) and all(v["allclose"] for v in rep["values"]), "diff --values compared other tensors"


def _run(entry: Path, check: Any) -> None:
    """Run a check; for a known gap, turn the documented failure into KnownGap (strict xfail)."""
    doc = _load(entry)
    target = entry.parent / doc["file"]
    gap = KNOWN_GAPS.get(_id(entry))
    try:
        check(target, doc)
    except Exception as e:
        if gap is not None and re.search(gap[1], f"{type(e).__name__}: {e}"):
            raise KnownGap(f"{_id(entry)}: {gap[0]}") from e
        raise


def _params(entries: list[Path]) -> list[Any]:
    out = []
    for e in entries:
        gap = KNOWN_GAPS.get(_id(e))
        marks = [pytest.mark.xfail(strict=True, raises=KnownGap, reason=gap[0])] if gap else []
        out.append(pytest.param(e, id=_id(e), marks=marks))
    return out


@pytest.mark.parametrize("entry", _params(EXPECTED))
def test_corpus_file_reads_as_the_real_loader(entry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Python API, `inspect --json` and `diff --values`: keys, dtypes, shapes and bytes of the real loader."""
    _run(entry, lambda target, doc: (check_api(target, doc), check_cli(target, doc, capsys)))


WEIGHTS_ONLY = [e for e in EXPECTED if _load(e)["weights_only_ok"]]


@pytest.mark.parametrize("entry", _params(WEIGHTS_ONLY))
def test_what_torch_weights_only_reads_statemap_reads(entry: Path) -> None:
    """The floor: a file torch.load(weights_only=True) reads, statemap reads too, with the same tensors."""
    _run(entry, check_api)


def test_corpus_is_enumerated_and_complete() -> None:
    """Every file or folder in the corpus has an expected.json (a folder's may also describe a file inside
    it), every expected.json its file, and every gap names a corpus entry."""
    entries = {p.name for p in CORPUS.iterdir() if p.suffix not in NOT_ENTRIES and not p.name.endswith(".expected.json")}
    entries.discard("__pycache__")
    described = {_id(e) for e in EXPECTED}
    assert entries - {d.split("/")[0] for d in described} == set(), "corpus files without an expected.json (run their generator)"
    assert {d for d in described if not (CORPUS / d).exists()} == set(), "expected.json without its file"
    assert set(KNOWN_GAPS) <= described
    assert len(WEIGHTS_ONLY) >= 3


def test_the_comparison_can_fail(tmp_path: Path) -> None:
    """Negative check: a changed byte, dtype, shape, key or container in the expectation is caught."""
    entry = CORPUS / "bare_sd_p2.pt.expected.json"
    doc = _load(entry)
    target = CORPUS / doc["file"]
    check_api(target, doc)  # the untouched expectation holds
    t0 = doc["tensors"][0]
    for change, match in (
        ({**t0, "sha256": "0" * 64}, "bytes differ"),
        ({**t0, "dtype": "float16"}, "want float16"),
        ({**t0, "shape": [*t0["shape"], 1]}, "want"),
        ({**t0, "name": "renamed"}, "keys differ"),
    ):
        bad = {**doc, "tensors": [change, *doc["tensors"][1:]]}
        with pytest.raises(AssertionError, match=match):
            check_api(target, bad)
    with pytest.raises(AssertionError, match="container"):
        check_api(target, {**doc, "container": "model"})


def test_the_real_loaders_agree_on_the_same_model() -> None:
    """The expectations are trustworthy: one model (make_torch.TinyNet) saved through every torch route
    and read back by each route's own loader (torch.load, torch.jit.load, DCP's dcp_to_torch_save,
    .state_dict() of a pickled module) has the same tensors in every expected.json."""
    same = ["bare_sd_p2.pt", "pickled_module.pt", "yolo_style.pt", "jit_scripted.pt", "jit_traced.pt", "dcp_single", "dcp_gloo2"]
    same += [f"{kind}_{p}.pt" for kind in ("payload", "plain") for p in ("p2", "p4", "p5", "legacy")]
    ref = {t["name"]: (t["dtype"], t["shape"], t["sha256"]) for t in _load(CORPUS / "bare_sd_p2.pt.expected.json")["tensors"]}
    assert len(ref) == 8
    for name in same:
        got = {t["name"]: (t["dtype"], t["shape"], t["sha256"]) for t in _load(CORPUS / f"{name}.expected.json")["tensors"]}
        assert got == ref, f"{name}: the real loader saw other tensors than bare_sd_p2.pt's"


def test_packed_quantized_tensors_are_read_but_never_converted_silently(tmp_path, capsys):
    """quint4x2 / quint2x4 hold several values per byte: read exactly, refused clearly when converting."""
    src = CORPUS / "dtypes_all.pt"
    with open_checkpoint(src) as ck:
        assert ck.metas["quint4x2"].nbytes == 2 and ck.read("quint4x2").nbytes == 2 and not ck.skipped
    spec = tmp_path / "s.yaml"
    spec.write_text("name: q\nversion: 1\nrules:\n  - rename: 'quint4x2 -> q4'\n")
    out = tmp_path / "out.pt"
    assert main(["apply", str(spec), str(src), str(out)]) == 2
    assert "(packed values): statemap reads it, but cannot convert or write it" in capsys.readouterr().err
    assert not out.exists()
