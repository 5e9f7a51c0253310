"""`divingbell fleet migrate|token|backup|export|import`: the commands that manage the fleet's
store itself, with `--db` (also `serve`'s)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from divingbell.commands.fleetapi import echo_json, format_option

if TYPE_CHECKING:
    from divingbell.fleet.db import Database

F = TypeVar("F", bound=Callable[..., Any])
DB_ENV = "DIVINGBELL_FLEET_DB"
DEFAULT_DB = "sqlite:////var/lib/divingbell/fleet.db"


def db_option(func: F) -> F:
    return click.option(
        "--db", "db_url", envvar=DB_ENV, default=DEFAULT_DB, show_default=True, metavar="URL",
        help="The store: sqlite:///PATH (embedded) or postgresql://USER@HOST/DB "
        f"(also ${DB_ENV}).")(func)


def open_db(db_url: str, *, migrate: bool = True) -> Database:
    from sqlalchemy.exc import SQLAlchemyError

    from divingbell.fleet import migrations
    from divingbell.fleet.db import Database, redact

    try:
        db = Database(db_url)
        if migrate:
            migrations.upgrade(db.write_engine)
        return db
    except (SQLAlchemyError, OSError) as exc:
        raise click.ClickException(f"cannot open the store {redact(db_url)}: "
                                   f"{getattr(exc, 'orig', None) or exc}") from None


@click.command()
@db_option
def migrate(db_url: str) -> None:
    """Bring the store's schema to the newest version (serve also does this at start)."""
    from divingbell.fleet import migrations

    db = open_db(db_url)
    click.echo(f"schema at {migrations.current(db.engine)}")
    db.dispose()


@click.group()
def token() -> None:
    """Create, list and revoke operator and bootstrap tokens."""


@token.command("create")
@db_option
@click.option("--role", type=click.Choice(["admin", "reader", "bootstrap"]), required=True,
              help="admin: everything; reader: read machines and revisions; bootstrap: "
              "register machines (discovery) only.")
@click.option("--ttl", metavar="DURATION", help="Expire after this long (30m, 1h, 7d).")
@click.option("--description", default="", help="Who or what the token is for.")
@format_option
def token_create(db_url: str, role: str, ttl: str | None, description: str,
                 output_format: str) -> None:
    """Create a token and print it once; only its hash is stored.

    \b
      divingbell fleet token create --role admin > admin.token && chmod 600 admin.token
    """
    from divingbell.fleet.tokens import create_token, parse_duration

    try:
        lifetime = parse_duration(ttl) if ttl else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from None
    db = open_db(db_url)
    ident, value = create_token(db, role, description, lifetime)
    db.dispose()
    if output_format == "json":
        echo_json({"id": ident, "role": role, "token": value})
    else:
        click.echo(value)
        click.echo(f"token {ident} ({role}) created; it is shown only once", err=True)


@token.command("list")
@db_option
@format_option
def token_list(db_url: str, output_format: str) -> None:
    """List tokens (ids and roles; never the tokens themselves)."""
    from divingbell.commands.output import table
    from divingbell.fleet.tokens import list_tokens

    db = open_db(db_url)
    rows = list_tokens(db)
    db.dispose()
    if output_format == "json":
        echo_json(rows)
        return
    click.echo(table(["ID", "ROLE", "VALID", "EXPIRES", "DESCRIPTION"],
                     [[r["id"], r["role"], "yes" if r["valid"] else "no",
                       r["expires_at"] or "never", r["description"]] for r in rows]))


@token.command("revoke")
@db_option
@click.argument("token_id")
def token_revoke(db_url: str, token_id: str) -> None:
    """Revoke a token by id: it stops working at once, on every replica."""
    from divingbell.fleet.tokens import revoke_token

    db = open_db(db_url)
    found = revoke_token(db, token_id)
    db.dispose()
    if not found:
        raise click.ClickException(f"no token {token_id} (see divingbell fleet token list)")
    click.echo(f"token {token_id} revoked")


@click.command()
@db_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def backup(db_url: str, file: Path) -> None:
    """Write a consistent backup of the store to FILE (0600) while the service runs: SQLite's
    online backup API (the copy is an SQLite database), or pg_dump's custom format for
    PostgreSQL (restore with pg_restore)."""
    from divingbell.fleet.backup import BackupError
    from divingbell.fleet.backup import backup as make_backup

    try:
        how = make_backup(db_url, file)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"backup written to {file} ({how})")


@click.command()
@db_option
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file (0600) instead of standard output.")
def export(db_url: str, output: Path | None) -> None:
    """Print the store as replayable JSON (see `fleet import`): every table (machines and
    their history, reports, revisions, rollouts, leases, audit events, settings) except tokens
    and UI sessions. Carries credential hashes, never credentials (BMC credentials only sealed
    with the service's secrets key, which is not in it): keep the file private."""
    from divingbell.fleet.backup import export as make_export
    from divingbell.fleet.client import write_secret

    db = open_db(db_url)
    data = json.dumps(make_export(db), indent=2)
    db.dispose()
    if output is None:
        click.echo(data)
    else:
        write_secret(output, data)
        click.echo(f"exported to {output}", err=True)


@click.command("import")
@db_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def import_cmd(db_url: str, file: Path) -> None:
    """Replay an export into the store (for example, SQLite into PostgreSQL), all or nothing.
    Meant for an empty store: a row already there must be identical (replaying the same export
    adds nothing). Stop the old service first: live slots and grants move with the export."""
    from divingbell.fleet.backup import BackupError, import_

    try:
        data = json.loads(file.read_text())
    except ValueError as exc:
        raise click.ClickException(f"{file}: not JSON: {exc}") from None
    db = open_db(db_url)
    try:
        counts = import_(db, data)
    except (BackupError, KeyError, TypeError, ValueError) as exc:
        raise click.ClickException(f"import failed, nothing changed: {exc}") from None
    finally:
        db.dispose()
    added = ", ".join(f"{table} {count}" for table, count in counts.items() if count)
    click.echo(f"imported {sum(counts.values())} row(s)" + (f": {added}" if added else
                                                             " (all already there)"))
