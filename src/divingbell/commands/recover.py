"""`divingbell recover`: put a host's journal back in order after it was lost or damaged.

See docs/hardening.md (journal recovery). Nothing here changes the host's configuration: only
divingbell's own journal under <root>/var/lib/divingbell, under the host lock.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from divingbell.core.engine.journal import (
    JOURNAL_FILE,
    PREVIOUS_FILE,
    FileJournalStore,
    Journal,
    JournalError,
    find_owned_files,
)
from divingbell.core.engine.lock import host_lock
from divingbell.core.errors import DivingbellError
from divingbell.core.host import Host


@click.command()
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default="/", show_default=True, envvar="DIVINGBELL_ROOT",
              help="The host's root filesystem.")
@click.option("--previous", "mode", flag_value="previous",
              help="Put back the previous journal generation (journal.prev.json, kept at the "
              "start of the last apply).")
@click.option("--adopt", "mode", flag_value="adopt",
              help="Start a fresh journal that owns every file on the host that says "
              "divingbell wrote it (their originals are lost: they are deleted, not restored, "
              "when they leave the document).")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def recover(root: Path, mode: str | None, output_format: str) -> None:
    """Repair divingbell's journal after it was deleted, truncated or damaged.

    The damaged journal is kept next to it (journal.json.damaged-<time>), never deleted.
    Run `divingbell plan` afterwards to see what the next apply would do.

    \b
      divingbell recover --root / --previous   # damaged: back to the last good generation
      divingbell recover --root / --adopt      # lost: own divingbell's files from now on
    """
    if mode is None:
        raise click.UsageError("say how: --previous or --adopt (see docs/hardening.md)")
    host = Host(root=root)
    done: list[str] = []
    try:
        with host_lock(host, 10.0):
            store = FileJournalStore(host)
            current = host.read_bytes(JOURNAL_FILE) if host.lstat(JOURNAL_FILE, follow=True) \
                else None
            if mode == "previous":
                text = host.read_text(PREVIOUS_FILE)
                if text is None:
                    raise JournalError(f"there is no previous generation at "
                                       f"{host.path(PREVIOUS_FILE)}; use --adopt")
                try:
                    journal = Journal.from_dict(json.loads(text))
                except (ValueError, RecursionError) as exc:
                    raise JournalError(f"the previous generation is damaged too ({exc}); use "
                                       "--adopt") from None
            else:
                journal = Journal()
                for module, path in find_owned_files(host):
                    journal.record(module).own(path)
                    done.append(f"{module} owns {path}")
            if current is not None:
                aside = f"{JOURNAL_FILE}.damaged-{int(time.time())}"
                host.write_atomic(aside, current, 0o600)
                done.insert(0, f"kept the old journal as {aside}")
            store.save(journal)
            done.insert(0 if current is None else 1,
                        f"wrote {JOURNAL_FILE} from "
                        + ("the previous generation" if mode == "previous" else
                           "the divingbell files found on the host"))
    except (DivingbellError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if output_format == "json":
        click.echo(json.dumps({"recovered": mode, "done": done}, indent=2))
    else:
        for line in done:
            click.echo(line)
        click.echo("next: `divingbell plan` shows what the next apply would do")
