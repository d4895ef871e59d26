"""Shared pytest setup: tests run from the repository root so `tests.distributed` imports."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402  (after the path fix above, which `tests.*` imports need)


@pytest.fixture(scope="session")
def single_rank():
    """Single-rank parity references and their measured tolerances, shared by every module (tests/parity.py)."""
    from tests.parity import SingleRankRuns

    return SingleRankRuns()
