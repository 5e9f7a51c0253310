"""`divingbell serve`: the fleet service (docs/fleet.md)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from divingbell.commands.bootstrap import serve_options as bootstrap_serve_options
from divingbell.commands.fleetstore import db_option, open_db


def _parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not host:
        raise click.BadParameter(f"{listen!r} is not ADDR:PORT", param_hint="--listen")
    return host.strip("[]"), int(port)


@click.command()
@db_option
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
@click.option("--loop-connections", type=click.IntRange(0, 64), default=4, show_default=True,
              metavar="N",
              help="PostgreSQL: connections each worker's event loop keeps for machines' own "
              "polls and reports, answered without a thread (besides its pool of up to 40; "
              "count both against the server's max_connections). 0: all of them go to the "
              "store threads. See docs/performance.md.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes (like replicas, sharing the store; use PostgreSQL for "
              "more than one: SQLite has one writer at a time).")
@click.option("--no-migrate", is_flag=True,
              help="Do not run migrations at start (run divingbell fleet migrate instead).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--http-front", type=click.Choice(["divingbell", "uvicorn"]),
              default="divingbell", show_default=True,
              help="The HTTP protocol: divingbell's answers a machine's own polls and reports "
              "in the protocol itself (a little less CPU per request); uvicorn's takes every "
              "request through ASGI. The answers are the same.")
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
          loop_connections: int, workers: int, no_migrate: bool, log_level: str, http_front: str,
          assets: str | None,
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
                             reports_kept=reports_kept, loop_connections=loop_connections,
                             migrate_at_start=not no_migrate,
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
    open_db(db_url, migrate=not no_migrate).dispose()
    _check_secrets_key(secrets_key_file, db_url)
    from divingbell.fleet.front import HTTP_PROTOCOL

    common: dict[str, Any] = {"host": host, "port": port, "log_config": None,
                              "http": HTTP_PROTOCOL if http_front == "divingbell" else "httptools",
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
