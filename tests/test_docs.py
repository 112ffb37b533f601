"""The docs cannot drift from the code: every op is documented, every YAML example parses."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from statemap.ops import REGISTRY
from statemap.spec import load_spec


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, re.S)


def test_every_op_has_a_section_with_examples_and_its_fields(root):
    text = (root / "docs" / "spec.md").read_text()
    for name, op in REGISTRY.items():
        m = re.search(rf"^### {name}\n(.*?)(?=^### |^## )", text, re.S | re.M)
        assert m, f"docs/spec.md has no section for op {name!r}"
        section = m.group(1)
        assert f"- {name}:" in section, f"no example of {name!r}"
        for field in op.fields:
            assert f"`{field}`" in section, f"field {field!r} of {name!r} is not documented"


def test_every_yaml_example_in_the_docs_is_valid(root):
    for doc in ("spec.md",):
        text = (root / "docs" / doc).read_text()
        for block in _yaml_blocks(text):
            data = yaml.safe_load(block)
            if isinstance(data, dict):
                load_spec(block if "\n" in block else block + "\n")
            else:
                load_spec({"name": "doc", "version": 1, "vars": {"vocab": 1, "d": 1, "heads": 1}, "rules": data})


def test_readme_starts_with_the_two_commands(root):
    text = (root / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands[0].startswith("pip install torch==2.13.0 && pip install -e . && statemap apply ")
    assert (
        commands[1]
        == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q --tier unit && python -m pytest -q --tier proofs'
    )
    ci = (root / ".ci" / "run").read_text()
    assert commands[1] in ci, ".ci/run must run the README's test command"


def test_readme_main_job_runs(root, tmp_path):
    """The first README command's statemap part, run as written (output redirected to tmp)."""
    text = (root / "README.md").read_text()
    cmd = re.search(r"statemap apply (\S+) (\S+) (\S+) --force", text)
    spec, src = cmd.group(1), cmd.group(2)
    r = subprocess.run(
        [sys.executable, "-m", "statemap", "apply", spec, str(root / src), str(tmp_path / "o.safetensors"), "--force"],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 393 tensors for 395 names" in r.stdout
