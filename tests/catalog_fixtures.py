"""One test checkpoint per catalog spec: (file, vars). test_streaming.py requires an entry for
every spec in mappings/, so a new spec cannot skip the streaming-equals-in-memory check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from seed_layouts import deltalm_pretrained

ROOT = Path(__file__).resolve().parent.parent


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
