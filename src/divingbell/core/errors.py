"""Typed errors. The library raises these; only the CLI turns them into exit codes."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass


class DivingbellError(Exception):
    """Base of every error divingbell raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document, located by its path (and file:line where known)."""

    path: str
    message: str
    location: str | None = None

    def __str__(self) -> str:
        where = f" ({self.location})" if self.location else ""
        prefix = f"{self.path}: " if self.path else ""
        return f"{prefix}{self.message}{where}"


class DocumentError(DivingbellError):
    """The document cannot be loaded or is invalid. Carries every problem found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class CommandError(DivingbellError):
    """A command on the host failed; the message carries its argv and captured output."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        shown = " ".join(self.argv)
        if returncode == 127:
            message = f"{self.argv[0]} not found on the host (ran: {shown})"
        elif returncode < 0:
            message = f"`{shown}` was killed by signal {-returncode}"
        else:
            message = f"`{shown}` exited {returncode}"
        output = (stderr.strip() or stdout.strip())
        if output:
            message += f": {output}"
        super().__init__(message)


class ModuleError(DivingbellError):
    """A module cannot observe, plan or apply; the message names the setting concerned.

    `retryable`: the change may succeed once the module's other changes are in (sysctls that
    constrain each other, like ipfrag_high_thresh > ipfrag_low_thresh).
    """

    def __init__(self, module: str, problems: Sequence[str], *, retryable: bool = False) -> None:
        self.module = module
        self.problems = list(problems)
        self.retryable = retryable
        super().__init__("; ".join(self.problems))


class OutcomeFailed(ModuleError):
    """A change was carried out and recorded, and its outcome is a failure (a script exited
    non-zero). There is nothing to roll back. `halt`: skip the module's remaining changes."""

    def __init__(self, module: str, problems: Sequence[str], *, halt: bool = False) -> None:
        super().__init__(module, problems)
        self.halt = halt


class LockTimeout(DivingbellError):
    """Another divingbell run holds the host lock."""


class UnsafePath(OSError):
    """A path would leave the host root, or pass through something divingbell must not
    follow (a symlink in a directory a user controls, a directory owned by someone else).

    An OSError, so every place that reports a failed file operation reports this one too."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(errno.ELOOP, why, path)
        self.path = path
        self.why = why

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"
