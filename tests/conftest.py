import os
import sys

# Tests share two cores; one intra-op thread per process keeps multi-process tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

from shared_files import SHARED  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_shared: reads files under ../shared (see tests/shared_files.py)")


def pytest_collection_modifyitems(items):
    skip = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reads {SHARED}, which is not here")
    for item in items:
        if item.get_closest_marker("needs_shared") is not None:
            item.add_marker(skip)


def _skipped_by_another_condition(item) -> bool:
    """A true boolean `skipif` (e.g. no CUDA device): such a skip is legitimate even where ../shared exists."""
    return any(mark.args and mark.args[0] is True for mark in item.iter_markers("skipif"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("needs_shared") is not None
            and SHARED.is_dir() and not _skipped_by_another_condition(item)):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped although {SHARED} exists (a test that reads it must run where it is): {reason}"
