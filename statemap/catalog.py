"""The catalog: specs shipped in ``mappings/``, found by name (files only: parsing them is
:func:`statemap.spec.catalog_entries`)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def catalog_dir() -> Path:
    """``statemap/mappings`` in an installed wheel; ``<repo>/mappings`` in a source checkout."""
    for d in (_HERE / "mappings", _HERE.parent / "mappings"):
        if d.is_dir():
            return d
    return _HERE / "mappings"


def names() -> list[str]:
    return sorted(p.stem for p in catalog_dir().glob("*.yaml"))


def find(name: str) -> Path | None:
    d = catalog_dir()
    for cand in (d / name, d / f"{name}.yaml"):
        if cand.is_file() and cand.parent == d:
            return cand
    return None
