"""The `divingbell` command: `apply` in its plain forms runs without click (see
divingbell.commands.apply); everything else goes to the click CLI in divingbell.commands.cli."""

from __future__ import annotations

import contextlib
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


def _stopped(signum: int, _frame: object) -> None:
    """SIGTERM or SIGINT before a command takes them over (apply stops between changes; the
    agent and the service shut down): one line saying so, the shell's code for the signal,
    never a KeyboardInterrupt traceback, click's "Aborted!" or a silent death."""
    import signal

    doing = " before changing anything" if sys.argv[1:2] == ["apply"] else ""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.write(2, f"divingbell: stopped by {signal.Signals(signum).name}{doing}\n".encode())
    os._exit(128 + signum)


def main() -> None:
    import signal

    # First of all: from here on, no signal ends divingbell without a word.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopped)
    from divingbell.commands import console

    console.signal_point("start")
    if sys.argv[1:2] == ["apply"]:
        if "inspect" not in sys.modules:
            sys.modules["inspect"] = _ImportedOnFirstUse("inspect")
        from divingbell.commands.apply import parse_fast, run_apply

        options = parse_fast(sys.argv[2:], os.environ)
        if options is not None:
            try:
                run_apply(options)
            except BrokenPipeError:
                # As click does: a reader that went away (`| head`) is not an error to show.
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces stdout for exit
                sys.exit(1)
    from divingbell.commands.cli import cli

    cli(prog_name="divingbell")
