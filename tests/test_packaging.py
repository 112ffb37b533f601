"""Packaging smoke test: build the sdist and wheel, install the wheel into a clean venv, convert.

Slow (builds in an isolated env and installs numpy, pyyaml, rich, msgpack from the package
index); deselect with ``-m "not packaging"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

pytest.importorskip("build", reason="python -m build is needed (pip install build)")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (
        f"{' '.join(cmd)} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    )
    return r


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def test_wheel_installs_into_a_clean_venv_and_converts(root, tmp_path):
    dist = tmp_path / "dist"
    # no --sdist/--wheel: build the sdist, then the wheel *from the sdist* (so the sdist is complete)
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(root)], cwd=root)
    (wheel,) = dist.glob("statemap-*.whl")
    (sdist,) = dist.glob("statemap-*.tar.gz")

    names = set(zipfile.ZipFile(wheel).namelist())
    catalog = sorted(p.name for p in (root / "mappings").glob("*.yaml"))
    missing = [f"statemap/mappings/{n}" for n in catalog if f"statemap/mappings/{n}" not in names]
    assert not missing, f"catalog specs missing from the wheel: {missing}"
    for f in ("statemap/spec.schema.json", "statemap/py.typed", "statemap/__init__.py", "statemap/load/unpickle.py"):
        assert f in names, f"{f} missing from the wheel"
    assert not [n for n in names if n.startswith(("tests/", "mappings/", "docs/"))], "stray top-level files in the wheel"
    with tarfile.open(sdist) as tf:
        snames = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for f in ("pyproject.toml", "README.md", "statemap/spec.schema.json", "mappings/deltalm-fairseq-to-hf.yaml"):
        assert f in snames, f"{f} missing from the sdist"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)  # no --system-site-packages
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run([str(_bin(venv, "python")), "-m", "pip", "install", "--quiet", str(wheel)], cwd=tmp_path, env=env)

    work = tmp_path / "work"  # outside the repo, so nothing is imported from the source tree
    work.mkdir()
    r = _run([str(_bin(venv, "python")), "-c", "import statemap; print(statemap.__file__)"], cwd=work, env=env)
    assert Path(r.stdout.strip()).resolve().is_relative_to(venv.resolve()), r.stdout
    statemap = str(_bin(venv, "statemap"))

    _run([statemap, "list"], cwd=work, env=env)
    r = _run([statemap, "list", "--json"], cwd=work, env=env)
    listed = {e["name"] for e in json.loads(r.stdout)}
    assert listed == {Path(n).stem for n in catalog}

    _run(
        [statemap, "apply", "deltalm-fairseq-to-hf", str(root / "examples" / "deltalm-tiny.pt"), "out.safetensors"],
        cwd=work,
        env=env,
    )
    r = _run([statemap, "inspect", "out.safetensors", "--json"], cwd=work, env=env)
    # 395 names, 393 stored: the spec writes each tied group once (tied: dedupe; from_pretrained re-ties)
    assert json.loads(r.stdout)["n_tensors"] == 393
