"""Pytest hooks (imported by conftest.py): a skipped test is a failed test, except where the skip
is about hardware.

CI installs every framework the tests use, so a skip there means a check silently did not
run (a missing package, a fixture that gave up). Every skip, at collection (a module-level
`pytest.importorskip`), in setup or in the test itself, becomes a failure that keeps the skip's
reason, unless the test is marked `gpu` (needs a CUDA device) or `nogpu` (checks behaviour on
machines without one). xfail is not a skip and is left alone.

For local runs without some frameworks, NEREID_ALLOW_SKIPS=1 turns this off (docs/DEVELOPING.md).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

ALLOW_SKIPS_ENV = "NEREID_ALLOW_SKIPS"
# Markers whose tests may skip: whether they can run depends on the machine's hardware.
HARDWARE_MARKERS = ("gpu", "nogpu")


def skips_allowed() -> bool:
    return os.environ.get(ALLOW_SKIPS_ENV, "").strip() not in ("", "0")


def _reason(longrepr: Any) -> str:
    """The skip's reason and where it was raised, from a skipped report's (path, line, reason)."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, line, reason = longrepr
        return f"{reason} ({path}:{line})"
    return str(longrepr)


def _as_failure(report: Any, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"{what} was skipped, and only tests marked {' or '.join(HARDWARE_MARKERS)} may skip: "
        f"{_reason(report.longrepr)}\n(CI installs every framework; set {ALLOW_SKIPS_ENV}=1 for a local run "
        f"without them)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and not skips_allowed()
        and not any(item.get_closest_marker(marker) for marker in HARDWARE_MARKERS)
    ):
        _as_failure(report, "this test")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    report = yield
    if report.skipped and not skips_allowed():
        _as_failure(report, "this module")
    return report
