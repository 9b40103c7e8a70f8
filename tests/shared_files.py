"""../shared: the data files beside the repository (GSM8K, the six evaluation sets) that some tests read.

Every test that reads them carries the `needs_shared` marker (on the test, or as its module's `pytestmark`).
Without ../shared such a test is skipped, and the run lists the skip and its reason (`-rs` in pytest.ini); where
../shared exists, tests/conftest.py turns any skip of a marked test into a failure, so a machine that has the
files cannot pass by not running the tests that read them.
"""
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
SHARED_DATA = SHARED / "data"
EVAL_DATA = SHARED_DATA / "eval"
needs_shared = pytest.mark.needs_shared
