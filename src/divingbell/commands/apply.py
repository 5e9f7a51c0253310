"""`divingbell apply`: the command body, and the fast path that runs it without click.

A node runs `divingbell apply` from timers and hooks, and nearly every run finds nothing to
do, so the whole process is mostly start-up: importing click alone costs more than the no-op
apply itself. divingbell.commands.entry therefore recognises the plain forms of `apply` with
`parse_fast` and calls `run_apply` directly; anything else (help, an unknown or repeated
option, a missing file, a bad value) goes to click, which parses it as always and reports
the problem. Both paths run the same `run_apply`, and tests/test_fast_path.py checks that
whatever `parse_fast` accepts, click parses to the same options.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from divingbell.commands import console

if TYPE_CHECKING:
    from divingbell.core.engine.change import Change
    from divingbell.core.host import Host


@dataclass(frozen=True)
class ApplyOptions:
    """The options of `divingbell apply`, as click or parse_fast hands them over."""

    files: tuple[Path, ...]
    node: str | None = None
    labels: tuple[str, ...] = ()
    root: Path = Path("/")
    proc_sys: Path = Path("/proc/sys")
    output_format: str = "text"
    lock_timeout: float = 10.0
    allow_empty: bool = False
    adopt: bool = False


_VALUE_OPTIONS = {"--root": "root", "--proc-sys": "proc_sys", "--node": "node",
                  "--label": "labels", "--format": "output_format",
                  "--lock-timeout": "lock_timeout"}
_FLAGS = {"--allow-empty": "allow_empty", "--adopt": "adopt"}
FORMATS = ("text", "json")


def parse_fast(argv: Sequence[str], environ: Mapping[str, str]) -> ApplyOptions | None:
    """The options of `apply` given as `argv` (what follows `apply`), or None when anything
    in them is not a plain, valid use: click then parses them, with its own messages."""
    values: dict[str, str] = {}
    labels: list[str] = []
    flags: set[str] = set()
    files: list[str] = []
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("-"):
            files.append(token)
            continue
        option, equals, value = token.partition("=")
        if option in _FLAGS and not equals and option not in flags:
            flags.add(option)
            continue
        if option not in _VALUE_OPTIONS:
            return None  # --help, --, -, short options, anything unknown
        if not equals:
            if not tokens:
                return None
            value = tokens.pop(0)
        if option == "--label":
            labels.append(value)
        elif option in values or not value:
            return None  # repeated: click takes the last one; leave that to click
        else:
            values[option] = value
    if not files or not all(_is_file(name) for name in files):
        return None
    root = values.get("--root") or environ.get("DIVINGBELL_ROOT") or "/"
    proc_sys = values.get("--proc-sys") or environ.get("DIVINGBELL_PROC_SYS") or "/proc/sys"
    output_format = values.get("--format", "text")
    if not _is_dir(root) or not _usable_proc_sys(proc_sys) or output_format not in FORMATS:
        return None
    try:
        lock_timeout = float(values.get("--lock-timeout", "10.0"))
        console.node_name(values.get("--node"))
        console.parse_labels(tuple(labels))
    except (ValueError, console.BadArgument):
        return None
    return ApplyOptions(
        files=tuple(Path(name) for name in files), node=values.get("--node"),
        labels=tuple(labels), root=Path(root), proc_sys=Path(proc_sys),
        output_format=output_format, lock_timeout=lock_timeout,
        allow_empty="--allow-empty" in flags, adopt="--adopt" in flags)


# What the click.Path types of `apply` accept (existing and readable where they say so), or
# less: anything in doubt is left to click, which then says what is wrong.

def _is_file(name: str) -> bool:
    """click.Path(exists=True, dir_okay=False): exists, not a directory, readable."""
    try:
        return not stat.S_ISDIR(os.stat(name).st_mode) and os.access(name, os.R_OK)
    except (OSError, ValueError):
        return False


def _is_dir(name: str) -> bool:
    """click.Path(exists=True, file_okay=False), for --root: a readable directory."""
    try:
        return stat.S_ISDIR(os.stat(name).st_mode) and os.access(name, os.R_OK)
    except (OSError, ValueError):
        return False


def _usable_proc_sys(name: str) -> bool:
    """click.Path(file_okay=False), for --proc-sys: absent, or a readable directory."""
    try:
        info = os.stat(name)
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return stat.S_ISDIR(info.st_mode) and os.access(name, os.R_OK)


def run_apply(options: ApplyOptions) -> NoReturn:
    """Converge this host to the document, print each change as it is made, and exit: 0 when
    the host matches, 1 on failure, 2 for an invalid document, 3 if another run holds the
    lock, 130/143 when stopped by SIGINT/SIGTERM (between two changes)."""
    received = console.stop_between_changes()
    from divingbell.commands.output import applied_line, report_tail
    from divingbell.core.engine.runner import apply_node
    from divingbell.core.errors import LockTimeout

    output_format = options.output_format
    resolved = console.resolve_or_exit(options.files, options.node, options.labels,
                                       options.root, output_format, console.EXIT_INVALID,
                                       allow_empty=options.allow_empty)
    config = resolved.config
    console.signal_point("resolved")
    shown = {"header": False, "module": ""}

    def header() -> None:
        # Printed once the lock is held (with the first change, or the summary), so a run
        # that never starts never says it did.
        if output_format == "text" and not shown["header"]:
            console.echo(f"Applying revision {resolved.revision} to node {config.node}:")
            shown["header"] = True

    def progress(change: Change, status: str) -> None:
        if output_format != "text":
            return
        header()
        if change.module != shown["module"]:
            console.echo(f"{change.module}:")
            shown["module"] = change.module
        console.echo(applied_line(change, status))

    host = console.host(options.root, options.proc_sys)
    # A kernel line on trial that did not boot is reverted (and held) before planning.
    console.guarded(lambda: _settle_kernel_trial(host, "not applied yet"), output_format,
                    config.node)
    try:
        report = console.guarded(lambda: apply_node(
            host, config, resolved.revision,
            lock_timeout=options.lock_timeout, listener=progress, adopt=options.adopt),
            output_format, config.node)
    except LockTimeout as exc:
        console.fail(f"{exc} Nothing was changed (--lock-timeout waits longer).",
                     output_format, console.EXIT_LOCKED, node=config.node, result="locked")
    console.signal_point("applied")
    if report.ok:
        # Converged on the line on trial, by an operator's own apply: commit it.
        console.guarded(lambda: _settle_kernel_trial(host, None), output_format, config.node)
    if output_format == "json":
        console.print_json({**report.as_dict(), "notes": resolved.notes})
    else:
        header()
        console.echo(report_tail(report))
    for warning in report.warnings:
        console.echo(f"warning: {warning}", err=True)
    console.signal_point("reported")
    # From here a signal is left pending and dies with the process: divingbell has decided how
    # to end, and says below whether a signal came before that.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    done = f"{len(report.applied)} of {report.planned_count} changes applied"
    if report.interrupted:
        signum = received[0] if received else signal.SIGTERM
        console.echo(f"interrupted by {signal.Signals(signum).name}: {done}; run apply again",
                     err=True)
        sys.exit(128 + signum)
    if received:
        outcome = "the host matches the document" if report.ok else "the run failed"
        console.echo(f"stopped by {signal.Signals(received[0]).name} after the run had "
                     f"finished: {done}, {outcome}", err=True)
        sys.exit(128 + received[0])
    sys.exit(0 if report.ok else console.EXIT_FAILED)


# modules/kernel.py's TRIAL_FILE, here so that a no-op apply never imports the modules.
KERNEL_TRIAL_FILE = "/var/lib/divingbell/kernel-trial.json"


def _settle_kernel_trial(host: Host, unhealthy: str | None) -> None:
    """Commit or revert a kernel command line on trial (modules/kernel.py); nothing to do
    (one missing file) unless one is."""
    if not host.exists(KERNEL_TRIAL_FILE):
        return
    import time

    from divingbell.core.errors import DivingbellError
    from divingbell.core.modules.kernel import settle_trial

    try:
        settled = settle_trial(host, lambda: unhealthy, time.time())
    except DivingbellError as exc:
        console.echo(f"warning: {exc}", err=True)
        return
    if settled is not None:
        console.echo(f"kernel command line {' '.join(settled.params)} {settled.outcome}: "
                     f"{settled.reason}", err=True)
