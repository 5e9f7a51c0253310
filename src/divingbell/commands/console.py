"""What the host commands print and how they exit, without click.

`divingbell apply` runs here on its fast path (divingbell.commands.entry) without importing click at
all, so everything a host command shares — one-line errors or JSON for scripts, exit codes,
node names and labels, the validated-document cache — lives in this module, and the click
commands (divingbell.commands.host) are thin wrappers around it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from divingbell.core.document.cache import Resolved
    from divingbell.core.errors import DocumentError, Problem
    from divingbell.core.host import Host

T = TypeVar("T")

EXIT_FAILED, EXIT_INVALID, EXIT_LOCKED = 1, 2, 3
EXIT_CHANGES = 2  # plan --detailed-exitcode: there are changes


class BadArgument(ValueError):
    """A command-line value that cannot be used; `option` names it (`--label`)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def echo(text: str, *, err: bool = False, nl: bool = True) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n" if nl else text)
    stream.flush()


def print_json(data: Any) -> None:
    echo(json.dumps(data, indent=2, default=str))


def print_notes(notes: list[str]) -> None:
    for note in notes:
        echo(f"note: {note}", err=True)


def fail(message: str, output_format: str, exit_code: int, **fields: Any) -> NoReturn:
    """One line for people, or a JSON object with `errors` for scripts; then exit."""
    if output_format == "json":
        print_json({**fields, "result": fields.get("result", "failed"), "errors": [message]})
    else:
        echo(f"error: {message}", err=True)
    sys.exit(exit_code)


def document_error(exc: DocumentError, output_format: str, exit_code: int) -> NoReturn:
    if output_format == "json":
        print_json({"result": "invalid", "errors": [str(p) for p in exc.problems],
                    "problems": [vars(p) for p in exc.problems]})
    else:
        echo(f"error: the document is invalid ({len(exc.problems)} problem(s)); nothing "
             "was changed:", err=True)
        for problem in exc.problems:
            echo(f"  {problem}", err=True)
    sys.exit(exit_code)


def invalid_file(what: str, exc: DocumentError, output_format: str) -> NoReturn:
    """A settings file (`the policy file`, `the tenants config`) that does not validate: as
    `divingbell validate` says it, every problem with its path; exit 2."""
    if output_format == "json":
        print_json({"valid": False, "problems": [vars(p) for p in exc.problems]})
    else:
        echo(f"error: {what} is invalid ({len(exc.problems)} problem(s)):", err=True)
        for problem in exc.problems:
            echo(f"  {problem}", err=True)
    sys.exit(EXIT_INVALID)


def invalid_input(problems: Sequence[Problem], output_format: str) -> NoReturn:
    """A design or PKI catalog that does not validate: `error:` and each problem with its path,
    or `{"ok": false, "problems": [...]}` for scripts; exit 2."""
    if output_format == "json":
        print_json({"ok": False, "problems": [vars(p) for p in problems]})
    else:
        for problem in problems:
            echo(f"error: {problem}", err=True)
    sys.exit(EXIT_INVALID)


def guarded(action: Callable[[], T], output_format: str, node: str | None = None) -> T:
    """Run `action`, turning the host refusing access, a damaged journal or any other host
    error into one line saying what to do (a held lock is the caller's: it has its own exit
    code)."""
    from divingbell.core.errors import DivingbellError, LockTimeout

    try:
        return action()
    except PermissionError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        fail(f"permission denied{where}: divingbell reads and changes host state "
             "(/var/lib/divingbell, /etc, /proc/sys); run it as root", output_format,
             EXIT_FAILED, node=node)
    except LockTimeout:
        raise
    except (DivingbellError, OSError) as exc:
        fail(str(exc), output_format, EXIT_FAILED, node=node)


def node_name(node: str | None) -> str:
    name = node if node is not None else os.environ.get("NODE_NAME") or os.uname().nodename
    if not name.strip() or name != name.strip() or any(c.isspace() for c in name):
        raise BadArgument("--node", f"{name!r} is not a node name (empty or with spaces)")
    return name


# Kubernetes label syntax: an optional DNS-subdomain prefix and "/", a name of at most 63
# characters; values likewise (or empty).
# (Patterns, not compiled objects: compiled on first use, not on every start.)
_LABEL_NAME = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
_LABEL_PREFIX = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def parse_labels(labels: tuple[str, ...]) -> Mapping[str, str]:
    parsed = {}
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise BadArgument("--label", f"{label!r} is not KEY=VALUE")
        prefix, slash, name = key.rpartition("/")
        if not re.match(_LABEL_NAME, name) or (slash and (
                len(prefix) > 253 or not re.match(_LABEL_PREFIX, prefix))):
            raise BadArgument(
                "--label", f"{key!r} is not a Kubernetes label key (letters, digits, - _ . up "
                "to 63, optionally prefix/)")
        if value and not re.match(_LABEL_NAME, value):
            raise BadArgument(
                "--label",
                f"{value!r} is not a Kubernetes label value (letters, digits, - _ . up to 63)")
        parsed[key] = value
    return parsed


def cache_file(root: Path) -> Path | None:
    """Where the validated-document cache lives under `root`, or None (no cache) when a
    directory on the way is a symlink: the cache is written with plain file calls, so it is
    only used where they cannot be led outside the root."""
    from divingbell.core.document.cache import CACHE_FILE

    path = root
    for part in PurePosixPath(CACHE_FILE).parent.parts[1:]:
        path = path / part
        try:
            if path.is_symlink():
                return None
        except OSError:
            return None
    return root / CACHE_FILE.lstrip("/")


def resolve_or_exit(files: tuple[Path, ...], node: str | None, labels: tuple[str, ...],
                    root: Path, output_format: str, exit_code: int, *,
                    allow_empty: bool = False) -> Resolved:
    """The node's configuration, from the validated-document cache when the document bytes,
    node and labels are unchanged (see divingbell.core.document.cache). A bad --node or --label
    raises BadArgument for text output (the caller shows it as a usage error) and is one JSON
    error for scripts."""
    from divingbell.core.document.api import resolve_files
    from divingbell.core.errors import DocumentError

    try:
        name, parsed = node_name(node), parse_labels(labels)
    except BadArgument as exc:
        if output_format != "json":
            raise
        fail(f"'{exc.option}': {exc}", output_format, EXIT_INVALID, result="invalid")
    try:
        resolved = resolve_files(files, name, parsed, cache_file(root),
                                 allow_empty=allow_empty)
    except DocumentError as exc:
        document_error(exc, output_format, exit_code)
    if output_format == "text":
        print_notes(resolved.notes)
    return resolved


def host(root: Path, proc_sys: Path) -> Host:
    from divingbell.core.host import Host

    return Host(root=root, proc_sys=proc_sys)


SIGNAL_POINT_ENV = "DIVINGBELL_FAULT_SIGNAL_AT"


def signal_point(point: str) -> None:
    """Test hook: with DIVINGBELL_FAULT_SIGNAL_AT=<point>:<SIGNAME> set, send this process that
    signal at that point (`start`, and apply's `resolved`, `applied`, `reported`), so the
    interrupt tests hit every window, however short, every time."""
    spec = os.environ.get(SIGNAL_POINT_ENV)
    if spec is None or spec.partition(":")[0] != point:
        return
    import signal

    os.kill(os.getpid(), signal.Signals[spec.partition(":")[2]])


def stop_between_changes() -> list[int]:
    """SIGTERM and SIGINT ask the engine to stop between two changes (and kill a running
    operator script's process group) instead of dying mid-change. Returns the list the
    signal numbers received are appended to."""
    import signal

    from divingbell.core.host import interrupt

    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        interrupt.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    return received
