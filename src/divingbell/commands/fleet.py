"""`divingbell serve` and `divingbell fleet ...`: the fleet service and the operators' tools.

Commands that manage the store itself (migrate, token, backup, export, import) take `--db`;
the others talk to a running service over its API (`--server`, `--token-file`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click

from divingbell.commands.bootstrap import serve_options as bootstrap_serve_options
from divingbell.fleet.client import FleetApiError, FleetClient, read_token

if TYPE_CHECKING:
    from divingbell.fleet.db import Database

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
T = TypeVar("T")
DB_ENV = "DIVINGBELL_FLEET_DB"
DEFAULT_DB = "sqlite:////var/lib/divingbell/fleet.db"


def _db_option(func: F) -> F:
    return click.option(
        "--db", "db_url", envvar=DB_ENV, default=DEFAULT_DB, show_default=True, metavar="URL",
        help="The store: sqlite:///PATH (embedded) or postgresql://USER@HOST/DB "
        f"(also ${DB_ENV}).")(func)


def _format_option(func: F) -> F:
    return click.option("--format", "output_format", type=click.Choice(["text", "json"]),
                        default="text", show_default=True,
                        help="Output for people or for scripts.")(func)


def _api_options(func: F) -> F:
    func = click.option(
        "--token-file", envvar="DIVINGBELL_TOKEN_FILE", metavar="FILE",
        type=click.Path(dir_okay=False, path_type=Path),
        help="A file holding an admin or reader token ($DIVINGBELL_TOKEN_FILE; or the token "
        "itself in $DIVINGBELL_TOKEN).")(func)
    func = click.option(
        "--ca-file", envvar="DIVINGBELL_CA_FILE", metavar="FILE",
        type=click.Path(exists=True, dir_okay=False),
        help="CA certificate to trust for an https:// server.")(func)
    return click.option(
        "--server", envvar="DIVINGBELL_SERVER", required=True, metavar="URL",
        help="The fleet service, e.g. https://fleet.example.org:8443 ($DIVINGBELL_SERVER).",
    )(func)


def _client(server: str, token_file: Path | None, ca_file: str | None) -> FleetClient:
    try:
        token = read_token(token_file) if token_file else os.environ.get("DIVINGBELL_TOKEN")
        return FleetClient(server, token, ca_file=ca_file)
    except FleetApiError as exc:
        raise click.ClickException(str(exc)) from None


def _open_db(db_url: str, *, migrate: bool = True) -> Database:
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


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _fail(exc: FleetApiError) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    if isinstance(exc.detail, dict) and exc.detail.get("problems"):
        for problem in exc.detail["problems"]:
            where = f" ({problem.get('location')})" if problem.get("location") else ""
            path = f"{problem.get('path')}: " if problem.get("path") else ""
            click.echo(f"  {path}{problem.get('message')}{where}", err=True)
    sys.exit(2 if exc.status in (400, 404, 409, 422) else 1)


def _call(request: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """One request to the fleet API (a FleetClient method); an error the service or the
    network gives ends the command as `_fail` says: the message, its problems, exit 2 or 1."""
    try:
        return request(*args, **kwargs)
    except FleetApiError as exc:
        _fail(exc)


def power_answer(request: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """The answer of a request that powers a machine (a FleetClient method and its arguments).
    The service answers 502 `bmc-unconfirmed` when the BMC did not confirm, with the same body
    as a confirmed answer (what was sent, what was read): that is an answer, returned, not a
    failure of the command; any other error ends the command (`_fail`)."""
    try:
        data: dict[str, Any] = request(*args)
    except FleetApiError as exc:
        detail = exc.detail if isinstance(exc.detail, dict) else {}
        if detail.get("error") != "bmc-unconfirmed":
            _fail(exc)
        return detail
    return data


def _parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not host:
        raise click.BadParameter(f"{listen!r} is not ADDR:PORT", param_hint="--listen")
    return host.strip("[]"), int(port)


# serve ---------------------------------------------------------------------------------------

@click.command()
@_db_option
@click.option("--listen", default="127.0.0.1:8500", show_default=True, metavar="ADDR:PORT",
              help="Where the API listens (0.0.0.0:8500 for every address).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Serve HTTPS with this certificate (PEM, chain included).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="The certificate's private key (PEM).")
@click.option("--control-plane-size", type=click.Choice(["1", "3", "5", "7"]), default="3",
              show_default=True, help="The control-plane quorum the scheduler forms.")
@click.option("--install-parallel", type=click.IntRange(1, 1000), default=2, show_default=True,
              help="At most this many machines installing at once.")
@click.option("--install-ttl", default="30m", show_default=True, metavar="DURATION",
              help="An install grant expires after this long without a result.")
@click.option("--reports-kept", type=click.IntRange(1, 10000), default=20, show_default=True,
              help="Reports kept per machine.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes (like replicas, sharing the store; use PostgreSQL for "
              "more than one: SQLite has one writer at a time).")
@click.option("--no-migrate", is_flag=True,
              help="Do not run migrations at start (run divingbell fleet migrate instead).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--assets", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Serve DIR under /v1/assets/ for network boot (`divingbell image discovery "
              "-o DIR` puts the discovery image there). See docs/boot.md.")
@click.option("--public-url", metavar="URL",
              help="The URL machines reach this service at, written into boot scripts "
              "(default: the address each boot request came to).")
@click.option("--boot-profiles", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="YAML: kernel, initrds and command line per boot phase and role "
              "(default: the discovery image from --assets).")
@click.option("--boot-token-ttl", default="15m", show_default=True, metavar="DURATION",
              help="Lifetime of the boot token a network boot carries (it enrols that machine, "
              "once); never-enrolled boots are forgotten after it too.")
@click.option("--max-pending-boots", type=click.IntRange(1, 1_000_000), default=1000,
              show_default=True, metavar="N",
              help="At most N boot tokens pending at once; further boot requests that need one "
              "get 429 and retry (bounds what anonymous boots can store). See docs/security.md.")
@click.option("--max-unadmitted", type=click.IntRange(1, 1_000_000), default=1000,
              show_default=True, metavar="N",
              help="At most N machines enrolled anonymously (network boot) that no operator "
              "admitted yet; new anonymous enrolments beyond get 429 until you admit them "
              "(`fleet accept --all-unadmitted`) or decommission some. Machines enrolled with "
              "a bootstrap token never count. See docs/security.md.")
@click.option("--slot-concurrency", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Maintenance slots per group for a machine served no document (with one, "
              "its maintenance.reboot.concurrency decides; never the claimer).")
@click.option("--slot-ttl-max", default="4h", show_default=True, metavar="DURATION",
              help="The longest a slot claim or renewal may hold a slot for.")
@click.option("--secrets-key-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="The key BMC credentials are encrypted with (0600; shared by every "
              "replica). Default with an SQLite store: fleet-secrets.key beside it, generated "
              "on first start. Without one on PostgreSQL, BMCs cannot be set.")
@click.option("--power-interval", type=click.FloatRange(0, 60), default=1.0,
              show_default=True, metavar="SECONDS",
              help="Requests to one BMC at least this far apart.")
@click.option("--power-timeout", default="2m", show_default=True, metavar="DURATION",
              help="A power change the BMC has not confirmed by then is reported as failed.")
@click.option("--reboot-rescue-interval", type=click.FloatRange(0, 3600), default=30.0,
              show_default=True, metavar="SECONDS",
              help="How often to look for maintenance reboots not back within their health "
                   "timeout; each gets one power cycle through its BMC and is reported "
                   "(0: never).")
@bootstrap_serve_options
def serve(db_url: str, listen: str, tls_cert: str | None, tls_key: str | None,
          control_plane_size: str, install_parallel: int, install_ttl: str, reports_kept: int,
          workers: int, no_migrate: bool, log_level: str, assets: str | None,
          public_url: str | None, boot_profiles: str | None, boot_token_ttl: str,
          max_pending_boots: int, max_unadmitted: int, slot_concurrency: int,
          slot_ttl_max: str,
          secrets_key_file: str | None, power_interval: float, power_timeout: str,
          reboot_rescue_interval: float, **bootstrap_settings: Any) -> None:
    """Run the fleet service: the HTTP API (/v1/..., /docs, /openapi.json), /healthz,
    /readyz and /metrics.

    SQLite is the embedded default; give --db postgresql://... for production, where any
    number of replicas can share the database. Migrations run at start.

    \b
    First start:
      divingbell fleet token create --role admin > admin.token && chmod 600 admin.token
      divingbell serve --listen 0.0.0.0:8500
    """
    import logging

    import uvicorn

    from divingbell.fleet.app import create_app
    from divingbell.fleet.settings import FleetSettings
    from divingbell.fleet.tokens import parse_duration

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    host, port = _parse_listen(listen)
    try:
        ttl = parse_duration(install_ttl).total_seconds()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--install-ttl") from None
    try:
        slot_ttl = parse_duration(slot_ttl_max).total_seconds()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--slot-ttl-max") from None
    boot_ttl = _check_boot_options(public_url, boot_profiles, boot_token_ttl)
    try:
        power_seconds = parse_duration(power_timeout).total_seconds()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--power-timeout") from None
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = FleetSettings(db_url=db_url, control_plane_size=int(control_plane_size),
                             install_parallel=install_parallel, install_ttl_seconds=ttl,
                             reports_kept=reports_kept, migrate_at_start=not no_migrate,
                             assets_dir=assets, public_url=public_url,
                             boot_profiles=boot_profiles, boot_token_ttl_seconds=boot_ttl,
                             max_pending_boots=max_pending_boots,
                             max_unadmitted=max_unadmitted,
                             slot_concurrency=slot_concurrency,
                             slot_ttl_max_seconds=slot_ttl, secrets_key_file=secrets_key_file,
                             power_min_interval_seconds=power_interval,
                             power_timeout_seconds=power_seconds,
                             reboot_rescue_interval_seconds=reboot_rescue_interval,
                             **bootstrap_settings)
    _open_db(db_url, migrate=not no_migrate).dispose()
    _check_secrets_key(secrets_key_file, db_url)
    common: dict[str, Any] = {"host": host, "port": port, "log_config": None,
                              "access_log": False, "ssl_certfile": tls_cert,
                              "ssl_keyfile": tls_key, "timeout_graceful_shutdown": 5,
                              "backlog": 4096}
    if workers == 1:
        from divingbell.fleet.app import tune_gc

        server = uvicorn.Server(uvicorn.Config(create_app(settings), **common))
        tune_gc()
        server.run()
        return
    from dataclasses import asdict, replace

    from divingbell.fleet.app import SETTINGS_ENV

    os.environ[SETTINGS_ENV] = json.dumps(asdict(replace(settings, migrate_at_start=False)))
    uvicorn.run("divingbell.fleet.app:app_from_env", factory=True, workers=workers, **common)


def _check_secrets_key(key_file: str | None, db_url: str) -> None:
    """The BMC credentials' key, opened (or generated) before the service starts: a bad key
    file stops `serve` with one line, and the generation is said on standard error."""
    from divingbell.power.secrets import SecretsError, open_key

    try:
        _, note = open_key(key_file, db_url)
    except (SecretsError, OSError) as exc:
        raise click.BadParameter(str(exc), param_hint="--secrets-key-file") from None
    click.echo(note, err=True)


def _check_boot_options(public_url: str | None, boot_profiles: str | None,
                        boot_token_ttl: str) -> float:
    """Network-boot options checked before the service starts; returns the token TTL."""
    from divingbell.fleet.boot import BootProfileError, check_base_url, load_profiles
    from divingbell.fleet.tokens import parse_duration

    if public_url:
        try:
            check_base_url(public_url)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--public-url") from None
    if boot_profiles:
        try:
            load_profiles(Path(boot_profiles))
        except BootProfileError as exc:
            raise click.BadParameter("\n" + "\n".join(f"  {p}" for p in exc.problems),
                                     param_hint="--boot-profiles") from None
    try:
        return parse_duration(boot_token_ttl).total_seconds()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--boot-token-ttl") from None


# fleet ---------------------------------------------------------------------------------------

# Subcommands in modules of their own that use this one's helpers: found by name when used,
# so this module never imports them (imports go one way: tests/test_architecture.py).
SUBCOMMANDS: dict[str, str] = {
    "bmc": "divingbell.commands.power:bmc",
    "power": "divingbell.commands.power:power_cmd",
    "reprovision": "divingbell.commands.power:reprovision",
}


class _FleetGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *SUBCOMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in SUBCOMMANDS:
            import importlib

            module, _, attr = SUBCOMMANDS[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
        return command


@click.group(cls=_FleetGroup)
def fleet() -> None:
    """Operate the fleet service: its store (migrate, token, backup, export, import) and its
    machines and documents over the API.

    \b
    Store commands take --db (or $DIVINGBELL_FLEET_DB); API commands take --server and
    --token-file (or $DIVINGBELL_SERVER, $DIVINGBELL_TOKEN_FILE).
    """


@fleet.command()
@_db_option
def migrate(db_url: str) -> None:
    """Bring the store's schema to the newest version (serve also does this at start)."""
    from divingbell.fleet import migrations

    db = _open_db(db_url)
    click.echo(f"schema at {migrations.current(db.engine)}")
    db.dispose()


@fleet.group()
def token() -> None:
    """Create, list and revoke operator and bootstrap tokens."""


@token.command("create")
@_db_option
@click.option("--role", type=click.Choice(["admin", "reader", "bootstrap"]), required=True,
              help="admin: everything; reader: read machines and revisions; bootstrap: "
              "register machines (discovery) only.")
@click.option("--ttl", metavar="DURATION", help="Expire after this long (30m, 1h, 7d).")
@click.option("--description", default="", help="Who or what the token is for.")
@_format_option
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
    db = _open_db(db_url)
    ident, value = create_token(db, role, description, lifetime)
    db.dispose()
    if output_format == "json":
        _echo_json({"id": ident, "role": role, "token": value})
    else:
        click.echo(value)
        click.echo(f"token {ident} ({role}) created; it is shown only once", err=True)


@token.command("list")
@_db_option
@_format_option
def token_list(db_url: str, output_format: str) -> None:
    """List tokens (ids and roles; never the tokens themselves)."""
    from divingbell.commands.output import table
    from divingbell.fleet.tokens import list_tokens

    db = _open_db(db_url)
    rows = list_tokens(db)
    db.dispose()
    if output_format == "json":
        _echo_json(rows)
        return
    click.echo(table(["ID", "ROLE", "VALID", "EXPIRES", "DESCRIPTION"],
                     [[r["id"], r["role"], "yes" if r["valid"] else "no",
                       r["expires_at"] or "never", r["description"]] for r in rows]))


@token.command("revoke")
@_db_option
@click.argument("token_id")
def token_revoke(db_url: str, token_id: str) -> None:
    """Revoke a token by id: it stops working at once, on every replica."""
    from divingbell.fleet.tokens import revoke_token

    db = _open_db(db_url)
    found = revoke_token(db, token_id)
    db.dispose()
    if not found:
        raise click.ClickException(f"no token {token_id} (see divingbell fleet token list)")
    click.echo(f"token {token_id} revoked")


@fleet.command()
@_api_options
@click.option("--state", help="Only machines in this state.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Only the first N machines (default: all, fetched a page at a time).")
@_format_option
def machines(server: str, token_file: Path | None, ca_file: str | None, state: str | None,
             limit: int | None, output_format: str) -> None:
    """List machines in the order they were first seen: state, roles, revision, up to date or
    not."""
    from divingbell.commands.output import table

    rows = _call(_client(server, token_file, ca_file).machines, state, limit=limit)
    if output_format == "json":
        _echo_json(rows)
        return
    click.echo(table(
        ["ID", "HOSTNAME", "STATE", "ROLES", "RACK", "REVISION", "UP-TO-DATE", "LAST REPORT"],
        [[m["id"], (m["hostname"] or "-") + (" (unadmitted)" if m.get("unadmitted") else ""),
          m["state"],
          ",".join(m["roles"]) + (" (pinned)" if m["pinned"] else "") or "-",
          m["rack"] or "-", str(m["revision"] or "-"), "yes" if m["up_to_date"] else "no",
          m["last_report_at"] or "never"] for m in rows]))


@fleet.command("machine")
@_api_options
@click.argument("machine_id")
@_format_option
def machine_cmd(server: str, token_file: Path | None, ca_file: str | None, machine_id: str,
                output_format: str) -> None:
    """Show one machine: facts, roles, labels, history, last reports."""
    data = _call(_client(server, token_file, ca_file).machine, machine_id)
    if output_format == "json":
        _echo_json(data)
        return
    click.echo(f"{data['id']}  {data['hostname'] or '-'}  uuid {data['uuid']}")
    click.echo(f"  state:    {data['state']} since {data['state_changed_at']}")
    click.echo(f"  roles:    {', '.join(data['roles']) or '-'}"
               + (" (pinned)" if data["pinned"] else ""))
    click.echo(f"  labels:   {', '.join(f'{k}={v}' for k, v in data['labels'].items()) or '-'}")
    click.echo(f"  revision: {data['revision'] or '-'} "
               f"({'up to date' if data['up_to_date'] else 'outdated'}), "
               f"last report {data['last_report_at'] or 'never'}"
               + (f" ({data['last_report_state']})" if data.get("last_report_state") else ""))
    for report in data.get("reports", [])[:1]:
        if report["state"] == "reverted":  # the reason the rollout halted here
            for name, module in sorted(report["modules"].items()):
                for failure in module.get("failures", []):
                    click.echo(f"  {name}: {failure}")
    for interface in data["interfaces"]:
        addresses = ", ".join(f"{a['address']}/{a['prefix']}" for a in interface["addresses"])
        click.echo(f"  nic {interface['name']}: {interface.get('mac') or '-'} {addresses}")
    for disk in data["disks"]:
        click.echo(f"  disk {disk['path']}: {disk['size_bytes']} bytes {disk.get('model') or ''}")
    if reported := data.get("reported_bmc"):
        click.echo(f"  bmc:      {reported['address']} (reported by its discovery, "
                   f"{reported['source']}; powers nothing until: divingbell fleet bmc "
                   f"{data['id']} ...)")
    click.echo("  history:")
    for change in data["history"][-10:]:
        click.echo(f"    {change['at']}  {change['from'] or '-'} -> {change['to']}: "
                   f"{change['reason']}")


@fleet.command()
@_api_options
@click.argument("machine_id")
@click.argument("roles", nargs=-1)
@click.option("--unpin", is_flag=True, help="Hand the machine back to the scheduler.")
@_format_option
def roles(server: str, token_file: Path | None, ca_file: str | None, machine_id: str,
          roles: tuple[str, ...], unpin: bool, output_format: str) -> None:
    """Pin a machine's roles (control-plane, worker), or --unpin it.

    \b
      divingbell fleet roles m0123456789ab worker
      divingbell fleet roles m0123456789ab --unpin
    """
    if unpin == bool(roles):
        raise click.UsageError("give ROLES to pin, or --unpin")
    data = _call(_client(server, token_file, ca_file).set_roles, machine_id, list(roles),
                 pinned=not unpin)
    if output_format == "json":
        _echo_json(data)
    else:
        click.echo(f"{data['id']}: roles {', '.join(data['roles']) or '-'}"
                   f"{' (pinned)' if data['pinned'] else ''}, state {data['state']}")


@fleet.command()
@_api_options
@click.option("--activate", "activate_number", type=int, metavar="N",
              help="Make revision N the current one again.")
@_format_option
def revisions(server: str, token_file: Path | None, ca_file: str | None,
              activate_number: int | None, output_format: str) -> None:
    """List document revisions (or make one current again with --activate N)."""
    from divingbell.commands.output import table

    client = _client(server, token_file, ca_file)
    if activate_number is not None:
        _call(client.activate, activate_number)
    rows = _call(client.revisions)
    if output_format == "json":
        _echo_json(rows)
        return
    click.echo(table(["REVISION", "ACTIVE", "NAME", "CREATED", "BY", "DIGEST"],
                     [[str(r["revision"]), "*" if r["active"] else "", r["name"],
                       r["created_at"], r["created_by"], r["digest"][:12]] for r in rows]))


@fleet.group()
def document() -> None:
    """The desired configuration for the whole fleet."""


@document.command("push")
@_api_options
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--allow-removals", is_flag=True,
              help="Consent to a revision that removes more than it keeps on some machine "
              "(recorded in the audit log). Without it such a push is refused, naming them.")
@_format_option
def document_push(server: str, token_file: Path | None, ca_file: str | None, file: Path,
                  allow_removals: bool, output_format: str) -> None:
    """Validate FILE on the service (exactly as `divingbell validate`) and store it as the
    new revision. A rejected document changes nothing; its problems are printed.

    Shows, per machine and per module, what the revision removes from the configuration the
    machine is served now: the host restores each (original sysctls, owners and modes, NIC
    settings) or removes it (mounts, packages, limits files; accounts are expired). A
    revision that removes more than it keeps on some machine is refused, nothing stored,
    listing those machines and what it removes: check it (`divingbell fleet rollout plan`
    shows the full diff of a stored revision), then push again with --allow-removals.
    """
    try:
        data = _client(server, token_file, ca_file).push_document(
            file.read_bytes(), file.name, allow_removals=allow_removals)
    except FleetApiError as exc:
        # Unlike the other commands, a rejected push answers in JSON under --format json:
        # scripts read the document's problems from it.
        if output_format == "json":
            _echo_json({"error": exc.status, "detail": exc.detail})
            sys.exit(2)
        if isinstance(exc.detail, dict) and exc.detail.get("error") == "removals-need-consent":
            for group in exc.detail.get("removals", []):
                for line in removal_lines(group):
                    click.echo(line, err=True)
        _fail(exc)
    if output_format == "json":
        _echo_json(data)
        return
    if data.get("created", True):
        click.echo(f"revision {data['revision']} stored and active")
    else:
        click.echo(f"unchanged: revision {data['revision']} already has this text")
    for group in data.get("removals", []):
        for line in removal_lines(group):
            click.echo(line)


def removal_lines(group: dict[str, Any]) -> list[str]:
    """What a revision removes on a group of machines (the `removals` of a push answer or
    refusal) or on one (`name`: a machine in `rollout plan`, a kind of node in `manifests`),
    per module, for people."""
    names = [m["name"] for m in group.get("machines", [])] or [group.get("name", "?")]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    flag = "  MORE THAN IT KEEPS" if group.get("exceeds_kept") else ""
    lines = [f"- {shown}: removes {group.get('removed', 0)}, keeps {group.get('kept', 0)}{flag}"]
    for module, found in (group.get("modules") or {}).items():
        lines.append(f"    {module}: {found.get('effect')}: {', '.join(found.get('entries', []))}")
    return lines


@fleet.command()
@_api_options
@_format_option
def status(server: str, token_file: Path | None, ca_file: str | None,
           output_format: str) -> None:
    """The fleet at a glance: machines by state, up to date vs outdated, active revision."""
    client = _client(server, token_file, ca_file)
    rows = _call(client.machines)
    revs = _call(client.revisions)
    by_state: dict[str, int] = {}
    for machine in rows:
        by_state[machine["state"]] = by_state.get(machine["state"], 0) + 1
    live = [m for m in rows if m["state"] != "decommissioned"]
    fresh = sum(1 for m in live if m["up_to_date"])
    active = next((r["revision"] for r in revs if r["active"]), None)
    summary = {"machines": len(rows), "by_state": by_state, "up_to_date": fresh,
               "outdated": len(live) - fresh, "active_revision": active}
    if output_format == "json":
        _echo_json(summary)
        return
    click.echo(f"{len(rows)} machine(s); active revision {active or 'none'}")
    click.echo(f"  up to date: {fresh}, outdated: {len(live) - fresh}")
    for state_name, count in sorted(by_state.items()):
        click.echo(f"  {state_name}: {count}")
    sys.exit(0 if len(live) == fresh else 1)


@fleet.command()
@_db_option
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


@fleet.command()
@_db_option
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file (0600) instead of standard output.")
def export(db_url: str, output: Path | None) -> None:
    """Print the store as replayable JSON (see `fleet import`): every table (machines and
    their history, reports, revisions, rollouts, leases, audit events, settings) except tokens
    and UI sessions. Carries credential hashes, never credentials (BMC credentials only sealed
    with the service's secrets key, which is not in it): keep the file private."""
    from divingbell.fleet.backup import export as make_export
    from divingbell.fleet.client import write_secret

    db = _open_db(db_url)
    data = json.dumps(make_export(db), indent=2)
    db.dispose()
    if output is None:
        click.echo(data)
    else:
        write_secret(output, data)
        click.echo(f"exported to {output}", err=True)


@fleet.command("import")
@_db_option
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
    db = _open_db(db_url)
    try:
        counts = import_(db, data)
    except (BackupError, KeyError, TypeError, ValueError) as exc:
        raise click.ClickException(f"import failed, nothing changed: {exc}") from None
    finally:
        db.dispose()
    added = ", ".join(f"{table} {count}" for table, count in counts.items() if count)
    click.echo(f"imported {sum(counts.values())} row(s)" + (f": {added}" if added else
                                                             " (all already there)"))


@fleet.command()
@_api_options
@click.argument("machine_id")
@click.option("--power-off", is_flag=True,
              help="Then switch it off through its BMC (confirmed; after it is out of the "
              "fleet, so nothing of the fleet's is left running on it).")
def decommission(server: str, token_file: Path | None, ca_file: str | None,
                 machine_id: str, power_off: bool) -> None:
    """Take a machine out of the fleet: its credential is revoked (configuration, reports,
    slots, install flow and join script stop working for it at once), its role, grant and
    slots released; a missing control-plane member is replaced by the scheduler. Booting
    again enrols it anew. With --power-off, its BMC then switches it off (confirmed)."""
    client = _client(server, token_file, ca_file)
    data = _call(client.call, "POST", f"/v1/machines/{machine_id}/decommission")
    click.echo(f"{data['id']}: {data['state']}")
    if not power_off:
        return
    client.timeout = 600
    outcome = power_answer(client.call, "POST", f"/v1/machines/{machine_id}/power",
                           {"action": "off"})
    click.echo(f"{machine_id}: power {outcome['state']}: {outcome['message']}",
               err=not outcome["ok"])
    sys.exit(0 if outcome["ok"] else 1)


@fleet.command()
@_api_options
@click.argument("machine_id")
@_format_option
def reenroll(server: str, token_file: Path | None, ca_file: str | None, machine_id: str,
             output_format: str) -> None:
    """Let the next network boot of MACHINE_ID enrol it again (an admin's act, audited).

    An enrolled machine is updated only with its own credential; nobody else, not even an
    admin's discovery, can register it again (docs/security.md). For a reinstall or a lost
    credential, this revokes its credential at once, releases its install grant and slots
    and makes it `booting`: its next boot gets a boot token bound to it and enrols, keeping
    its roles.

    \b
      divingbell fleet reenroll m1a2b3c4d5e6 --server https://fleet:8500 --token-file admin.token
    """
    data = _call(_client(server, token_file, ca_file).call,
                 "POST", f"/v1/machines/{machine_id}/reenroll")
    if output_format == "json":
        _echo_json(data)
        return
    click.echo(f"{data['id']}: {data['state']}; its next boot may enrol it again")


@fleet.command()
@_api_options
@click.argument("machine_id", required=False)
@click.option("--hostname", metavar="NAME",
              help="Accept this name instead of the one the machine claimed (RFC 1123).")
@click.option("--all-unadmitted", is_flag=True,
              help="Instead of one machine: accept the claimed name of every machine enrolled "
              "anonymously that no operator accepted yet, where the name is valid and free; "
              "the others are listed with why. One audit event.")
@_format_option
def accept(server: str, token_file: Path | None, ca_file: str | None, machine_id: str | None,
           hostname: str | None, all_unadmitted: bool, output_format: str) -> None:
    """Accept MACHINE_ID's host name (an admin's act, audited).

    A name a machine claims for itself at a network boot is only its word: it selects the
    document's host overrides and the machine's own join script only once accepted. Names
    are unique among active machines: a conflict names both.

    Accepting a name admits a machine enrolled anonymously: at most `serve --max-unadmitted`
    such machines wait for it, and new ones get 429 beyond. `--all-unadmitted` admits them
    all at once (check `divingbell fleet machines` first: each is a machine that booted on
    your provisioning network).
    """
    if all_unadmitted:
        if machine_id is not None or hostname is not None:
            raise click.UsageError("--all-unadmitted takes no MACHINE_ID or --hostname")
        _accept_unadmitted(server, token_file, ca_file, output_format)
        return
    if machine_id is None:
        raise click.UsageError("give MACHINE_ID, or --all-unadmitted")
    body = {} if hostname is None else {"hostname": hostname}
    data = _call(_client(server, token_file, ca_file).call,
                 "PUT", f"/v1/machines/{machine_id}/hostname", body)
    if output_format == "json":
        _echo_json(data)
        return
    click.echo(f"{data['id']}: hostname {data['hostname']} accepted")


def _accept_unadmitted(server: str, token_file: Path | None, ca_file: str | None,
                       output_format: str) -> None:
    data = _call(_client(server, token_file, ca_file).call,
                 "POST", "/v1/machines/accept", {"all_unadmitted": True})
    if output_format == "json":
        _echo_json(data)
        return
    for item in data["accepted"]:
        click.echo(f"{item['id']}: hostname {item['hostname']} accepted")
    for item in data["refused"]:
        click.echo(f"{item['id']}: not accepted: {item['reason']}")
    click.echo(f"{len(data['accepted'])} accepted, {len(data['refused'])} not; "
               f"{data['unadmitted']} still unadmitted")


@fleet.command()
@_api_options
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@_format_option
def audit(server: str, token_file: Path | None, ca_file: str | None, limit: int,
          output_format: str) -> None:
    """What operators did: pushes, activations, role pins, decommissions, forced releases."""
    from divingbell.commands.output import table

    rows = _call(_client(server, token_file, ca_file).call, "GET", f"/v1/audit?limit={limit}")
    if output_format == "json":
        _echo_json(rows)
        return
    click.echo(table(["AT", "ACTOR", "ACTION", "SUBJECT", "DETAIL"],
                     [[r["at"], r["actor"], r["action"], r["subject"], r["detail"]]
                      for r in rows]))


def _add_rollout_group() -> None:
    from divingbell.commands.rollout import rollout

    fleet.add_command(rollout)


_add_rollout_group()
