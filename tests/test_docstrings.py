"""Every ``Example::`` block in a statemap docstring runs, against small files made here.

Examples name files as a user would (``checkpoint_best.pt``, ``model.safetensors``,
``config.json``); :func:`workdir` makes each of them from the repository's tiny DeltaLM
checkpoint and runs the examples in that folder, so the printed results are checked too.
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import pkgutil
import re
import shutil
from pathlib import Path

import pytest

import statemap

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> list[str]:
    subs = (m.name for m in pkgutil.walk_packages(statemap.__path__, "statemap.") if m.name != "statemap.__main__")
    return ["statemap", *sorted(subs)]


def _examples() -> tuple[dict[str, doctest.DocTest], dict[str, str]]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    out: dict[str, doctest.DocTest] = {}
    broken: dict[str, str] = {}  # a module whose docstrings doctest cannot even parse: reported, not a collection error
    for name in _modules():
        mod = importlib.import_module(name)
        try:
            found = finder.find(mod, name)
        except ValueError as e:
            broken[name] = str(e)
            continue
        for t in found:
            if t.examples and (t.filename or "").startswith(str(ROOT)):
                out[t.name] = t
    return out, broken


EXAMPLES, BROKEN = _examples()


def test_every_docstring_parses():
    assert not BROKEN, BROKEN


def _common() -> dict[str, object]:
    """What every example may use without importing it: the public API, numpy, open_checkpoint."""
    import numpy as np

    from statemap.load import open_checkpoint

    names = {n: getattr(statemap, n) for n in statemap.__all__}
    return {**names, "np": np, "open_checkpoint": open_checkpoint}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    from statemap import convert

    d = tmp_path_factory.mktemp("examples")
    tiny = ROOT / "examples" / "deltalm-tiny.pt"
    for name in ("checkpoint_best.pt", "model.pt", "a.pt", "fairseq.pt"):
        shutil.copy(tiny, d / name)
    convert("deltalm-fairseq-to-hf", d / "model.pt", d / "model.safetensors")
    for name in ("b.safetensors", "hf.safetensors", "hf.pt"):
        shutil.copy(d / "model.safetensors", d / name)
    (d / "spec.yaml").write_text("name: t\nversion: 1\nrules:\n  - rename: a -> b\n")
    (d / "my-spec.yaml").write_text("name: my-spec\nversion: 1\nvars: {vocab: 64}\nrules:\n  - rename: a -> b\n")
    cfg = {"vocab_size": 50265, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2}
    cfg.update({"decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 32})
    (d / "config.json").write_text(json.dumps(cfg))
    np.savez(d / "weights.npz", w=np.zeros((2, 3), "f4"), b=np.zeros(3, "f4"))
    corpus = ROOT / "tests" / "fixtures" / "corpus"  # files real tools wrote (see make_*.py beside them)
    shutil.copy(tiny, d / "ckpt.pt")
    shutil.copy(corpus / "timm_last.pth.tar", d / "timm_train.pth.tar")
    shutil.copy(corpus / "yolo_style.pt", d / "yolo.pt")
    shutil.copytree(corpus / "dcp_single", d / "step_100")
    shutil.copy(ROOT / "tests" / "fixtures" / "clip" / "openai_jit.pt", d / "ViT-B-32.pt")
    meta = ROOT / "tests" / "fixtures" / "llama" / "meta"  # Meta's layout: consolidated.NN.pth + params.json
    for folder, ranks in (("llama-2-7b", 1), ("llama-2-13b", 2)):
        (d / folder).mkdir()
        shutil.copy(meta / "params.json", d / folder / "params.json")
        for r in range(ranks):
            shutil.copy(meta / "consolidated.00.pth", d / folder / f"consolidated.{r:02d}.pth")
    (d / "llama.yaml").write_text(
        'name: llama\nversion: 1\ninputs: "consolidated.{rank:int}.pth"\nconfig: params.json\n'
        "vars:\n  n_heads: {config: n_heads}\nrules:\n  - keep: '{k:path}'\n"
    )
    return d


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docstring_example_runs(name: str, workdir: Path) -> None:
    test = EXAMPLES[name]
    test.globs = {**_common(), **test.globs}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures: list[str] = []
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        result = runner.run(test, out=failures.append)
    finally:
        os.chdir(cwd)
    assert result.failed == 0, "".join(failures)


def test_every_example_block_is_collected() -> None:
    """Each ``Example::`` in the package's source is a docstring example found above (none is prose only)."""
    blocks = 0
    for path in (ROOT / "statemap").rglob("*.py"):
        blocks += len(re.findall(r"Example::\n\n\s+>>>", path.read_text(encoding="utf-8")))
        bare = re.findall(r"Example::\n\n(?!\s+>>>)", path.read_text(encoding="utf-8"))
        assert not bare, f"{path}: an Example:: block without >>> lines"
    assert blocks == len(EXAMPLES) and not BROKEN, (blocks, len(EXAMPLES), BROKEN)


def test_a_wrong_example_fails(workdir: Path) -> None:
    """The runner above does compare printed results: a wrong expected value fails."""
    test = doctest.DocTestParser().get_doctest(">>> 1 + 1\n3\n", {}, "wrong", None, 0)
    assert doctest.DocTestRunner().run(test, out=lambda s: None).failed == 1
