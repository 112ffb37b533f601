from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def root() -> Path:
    return ROOT


# In CI every dependency is installed, so a skipped test means a proof silently did not run
# (e.g. a catalog test whose library went missing): fail the run instead.
_SKIPPED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import os
    import sys

    if os.environ.get("CI") == "true" and _SKIPPED and exitstatus == 0:
        sys.stderr.write(f"\nCI: {len(_SKIPPED)} test(s) skipped, which CI does not allow: {_SKIPPED[:5]}\n")
        session.exitstatus = 1
