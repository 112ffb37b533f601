"""The catalog: specs shipped in ``mappings/``, found by name."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    source: str
    target: str
    verified: str
    path: str


def entries() -> list[Entry]:
    """Every catalog spec, parsed (a broken catalog spec raises SpecError naming its file)."""
    from .spec import load_spec

    out = []
    for n in names():
        p = catalog_dir() / f"{n}.yaml"
        s = load_spec(p)
        out.append(Entry(s.name, s.description, s.source, s.target, s.verified, str(p)))
    return out
