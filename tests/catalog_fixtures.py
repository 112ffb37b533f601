"""One test checkpoint per catalog spec: (file, vars). test_streaming.py requires an entry for
every spec in mappings/, so a new spec cannot skip the streaming-equals-in-memory check.

Family test modules (tests/test_catalog_*.py) register theirs in a module-level dict
``STREAMING_FIXTURES = {spec_name: function(tmp_path) -> (path, vars)}``; they are merged here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from seed_layouts import deltalm_pretrained

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def _deltalm_pretrained(tmp: Path) -> tuple[Path, dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(s, generator=g) for k, s in deltalm_pretrained(d=8, ffn=12, vocab=40, pos=10).items()}
    path = tmp / "deltalm-base.pt"
    torch.save({"weights": weights}, path)
    return path, {"vocab": 33}


def _deltalm_fairseq(tmp: Path) -> tuple[Path, dict[str, Any]]:
    return ROOT / "examples" / "deltalm-tiny.pt", {}


def _fairseq_legacy(tmp: Path) -> tuple[Path, dict[str, Any]]:
    from test_fairseq_legacy import _legacy_state

    sd, _ = _legacy_state(torch.Generator().manual_seed(0))
    path = tmp / "legacy.pt"
    torch.save({"model": sd}, path, _use_new_zipfile_serialization=False)
    return path, {}


FIXTURES: dict[str, Callable[[Path], tuple[Path, dict[str, Any]]]] = {
    "deltalm-pretrained-to-fairseq": _deltalm_pretrained,
    "deltalm-fairseq-to-hf": _deltalm_fairseq,
    "fairseq-legacy-to-hf": _fairseq_legacy,
}

for _f in sorted(HERE.glob("test_catalog_*.py")):
    _mod = importlib.import_module(_f.stem)
    for _name, _fn in getattr(_mod, "STREAMING_FIXTURES", {}).items():
        assert _name not in FIXTURES, f"{_name} registered twice"
        FIXTURES[_name] = _fn


def spec_params(specs: list[str]) -> list[Any]:
    """``specs`` as pytest parameters; the PyTorch <-> Flax ones carry the ``flax`` mark (their
    fixtures are built with transformers' Flax classes, which transformers 5 no longer has)."""
    return [pytest.param(n, marks=pytest.mark.flax) if "flax" in n else n for n in specs]
