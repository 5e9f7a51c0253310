"""After a test run: what was skipped and why, and the one command that installs what the
skipped tests need (a pytest terminal-summary hook, imported by tests/conftest.py)."""

from __future__ import annotations

from collections import Counter

import pytest
from _pytest.terminal import TerminalReporter

INSTALL = "scripts/test-deps  (as root: installs the host tools the tests drive)"


def pytest_terminal_summary(terminalreporter: TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: Counter[str] = Counter()
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    terminalreporter.section(f"{len(skipped)} test(s) skipped", sep="-")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:4} {reason}")
    if any("needs" in reason for reason in reasons):
        terminalreporter.write_line(f"To run them: {INSTALL}")
