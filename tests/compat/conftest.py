"""Fixtures for the compatibility and operator-experience tests (the shared ones are in
tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "divingbell"
