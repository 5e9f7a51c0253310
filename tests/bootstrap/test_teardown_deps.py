"""Teardown runs on the node, where the agent's image has divingbell without the `bootstrap`
extra (Jinja2 builds scripts; taking a node apart needs none)."""

from __future__ import annotations

import subprocess
import sys


def test_teardown_imports_without_jinja2() -> None:
    """Found on booted machines (test_genesis_nspawn.py): `divingbell bootstrap teardown` from
    the agent's image said it needs jinja2."""
    blocked = ("import sys; sys.modules['jinja2'] = None; "
               "import divingbell.bootstrap.teardown, divingbell.bootstrap.labels")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
