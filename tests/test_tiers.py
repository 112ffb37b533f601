"""The test suite's two tiers (tests/conftest.py): every test is in exactly one, the README and
CI run the fast unit tier first, then the proofs, and neither tier silently loses a file."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import PROOF_TESTS, PROOFS, tier_of

TESTS = Path(__file__).resolve().parent


def test_every_proofs_pattern_names_a_file_and_every_proof_test_exists():
    files = sorted(TESTS.glob("test_*.py"))
    for pattern in PROOFS:
        assert any(f.match(pattern) for f in files), f"PROOFS entry {pattern!r} matches no test file"
    for nodeid in PROOF_TESTS:
        file, name = nodeid.split("::")
        assert re.search(rf"^def {name}\(", (TESTS / file).read_text(), re.M), f"PROOF_TESTS entry {nodeid} does not exist"


def test_both_tiers_hold_tests():
    tiers = {tier_of(f) for f in TESTS.glob("test_*.py")}
    assert tiers == {"unit", "proofs"}
    assert tier_of(TESTS / "test_catalog_vit.py") == "proofs" and tier_of(TESTS / "test_cli.py") == "unit"


def test_readme_and_ci_run_the_unit_tier_first_then_the_proofs(root):
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    for text in (readme, ci):
        m = re.search(r"python -m pytest -q --tier unit && python -m pytest -q --tier proofs", text)
        assert m, "the test command must run --tier unit, then --tier proofs"
