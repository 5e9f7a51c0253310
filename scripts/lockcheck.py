"""What scripts/lock and scripts/setup need to know about pyproject.toml's dependencies.

`digest` prints a line naming a digest of every dependency declaration (runtime, extras, build
backend); scripts/lock writes it into requirements.lock and scripts/setup compares, so a
dependency edited without refreshing the lock is caught before anything is installed.
`build-requires` prints the build backend's requirements, one a line. Standard library only:
this runs before .venv exists.
"""

import hashlib
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _pyproject() -> dict[str, Any]:
    return tomllib.loads(_PYPROJECT.read_text())


def _build_requires() -> list[str]:
    return [str(requirement) for requirement in _pyproject()["build-system"]["requires"]]


def _declarations() -> dict[str, Any]:
    project = _pyproject()["project"]
    return {
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build-system": _build_requires(),
    }


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) == 2 else ""
    if what == "digest":
        text = json.dumps(_declarations(), sort_keys=True)
        print("pyproject.toml dependencies sha256:", hashlib.sha256(text.encode()).hexdigest())
        return 0
    if what == "build-requires":
        print("\n".join(_build_requires()))
        return 0
    print("usage: lockcheck.py digest|build-requires", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
