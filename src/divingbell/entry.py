"""The `divingbell` command: `apply` in its plain forms runs without click (see
divingbell.apply_command); everything else goes to the click CLI in divingbell.cli."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import types
from typing import Any


class _ImportedOnFirstUse(types.ModuleType):
    """Stands in sys.modules for a standard library module until an attribute of it is first
    used; then imports the real module and becomes a copy of it.

    For `inspect` on apply's fast path: dataclasses imports it at its top but only calls it for
    a class without a docstring, and it pulls in ast, dis and tokenize, about a tenth of a
    no-op apply. (importlib's LazyLoader would not do: `import inspect` reads `__spec__`,
    which loads the module at once on Python 3.11.)"""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__spec__ = importlib.machinery.PathFinder.find_spec(name)

    def __getattr__(self, attribute: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attribute)


def main() -> None:
    import signal

    # Ctrl-C anywhere outside apply (which stops between changes instead) ends quietly with
    # the shell's code for it, never a KeyboardInterrupt traceback or click's "Aborted!".
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    if sys.argv[1:2] == ["apply"]:
        if "inspect" not in sys.modules:
            sys.modules["inspect"] = _ImportedOnFirstUse("inspect")
        from divingbell.apply_command import parse_fast, run_apply

        options = parse_fast(sys.argv[2:], os.environ)
        if options is not None:
            try:
                run_apply(options)
            except BrokenPipeError:
                # As click does: a reader that went away (`| head`) is not an error to show.
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces stdout for exit
                sys.exit(1)
    from divingbell.cli import cli

    cli(prog_name="divingbell")
