"""Fixtures for the compatibility and operator-experience tests (the shared ones are in
tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from tests.test_apt import host as apt_host  # noqa: F401  (fixture: a Debian root with the test repository)
from tests.test_apt import repo  # noqa: F401  (fixture: the signed test repository)

DATA = Path(__file__).resolve().parent.parent / "data" / "divingbell"
