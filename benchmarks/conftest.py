"""Shared helpers of the benchmark suites: a summary of the speed ratios at the end of the run."""
import pytest

_RATIOS = []


@pytest.fixture
def report_ratio():
    """report_ratio(name, ratio, detail): list `ratio` (higher = faster) in the run's summary."""
    def add(name, ratio, detail=""):
        _RATIOS.append((name, ratio, detail))
    return add


def pytest_terminal_summary(terminalreporter):
    if _RATIOS:
        terminalreporter.section("speed ratios (reference time / backend time)")
        for name, ratio, detail in _RATIOS:
            terminalreporter.write_line(f"{name}: {ratio:.2f}x  {detail}")
