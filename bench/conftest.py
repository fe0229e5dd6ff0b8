"""Session plumbing for the pytest-benchmark suite: collects per-call GPU times from the tests and
prints the same table of microseconds and ratios as bench_kernels.py at the end of the session."""
from __future__ import annotations

import pytest

_RECORDS: list[dict] = []
_FLOORS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def bench_record() -> list[dict]:
    return _RECORDS


@pytest.fixture(scope="session")
def bench_floors() -> dict[str, dict]:
    return _FLOORS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDS:
        return
    from bench import bench_kernels  # imported late: this file must load on machines without a GPU

    report = {"results": _RECORDS, "floors": _FLOORS, "unavailable": {}}
    terminalreporter.write_sep("=", "LoRDS kernel comparison (per-call GPU time from CUDA events)")
    terminalreporter.write_line(bench_kernels.format_table(report))
