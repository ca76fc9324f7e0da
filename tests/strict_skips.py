"""MAE_TRANSFER_STRICT_SKIPS=1 (CI's fresh-clone run, .ci/run): a skipped test that is not marked with one of
ALLOWED_SKIP_MARKERS fails the session, and the summary says how many were skipped. The hooks are registered by
tests/conftest.py; this module imports nothing heavy, so tests/test_test_data.py runs them in a pytest of its own."""
from __future__ import annotations

import os

import pytest

ALLOWED_SKIP_MARKERS = ("cuda", "large_data")

_skips: dict[str, list[str]] = {"allowed": [], "unexpected": []}


def _strict_skips() -> bool:
    return os.environ.get("MAE_TRANSFER_STRICT_SKIPS", "") not in ("", "0")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        allowed = any(item.get_closest_marker(m) for m in ALLOWED_SKIP_MARKERS)
        _skips["allowed" if allowed else "unexpected"].append(f"{item.nodeid}: {report.longrepr[-1]}"
                                                              if isinstance(report.longrepr, tuple) else item.nodeid)
    return report


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a whole module skipped at collection
        _skips["unexpected"].append(f"{report.nodeid}: skipped at collection")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _strict_skips() and _skips["unexpected"] and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _strict_skips():
        return
    allowed, unexpected = _skips["allowed"], _skips["unexpected"]
    terminalreporter.write_line(f"[strict skips] {len(allowed) + len(unexpected)} skipped: {len(allowed)} marked "
                                f"{' or '.join(ALLOWED_SKIP_MARKERS)}, {len(unexpected)} not")
    for line in unexpected:
        terminalreporter.write_line(f"[strict skips] not allowed to skip: {line}", red=True)
