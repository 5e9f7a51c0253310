"""`divingbell discover`: this host's facts, printed or registered with the fleet service.

Standard library only (no service extras): it runs on nodes and in the network-boot image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command()
@click.option("--server", envvar="DIVINGBELL_SERVER", metavar="URL",
              help="Register with this fleet service ($DIVINGBELL_SERVER).")
@click.option("--bootstrap-token-file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="DIVINGBELL_BOOTSTRAP_TOKEN_FILE", metavar="FILE",
              help="A file holding a bootstrap token (divingbell fleet token create --role "
              "bootstrap).")
@click.option("--credential-file", type=click.Path(dir_okay=False, path_type=Path),
              default="/var/lib/divingbell/fleet-credential", show_default=True,
              help="Where the machine credential received is stored (0600); the agent's "
              "fleet mode reads it from there. When it already holds this machine's "
              "credential, that credential updates the facts (enrolment happens once).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="CA certificate to trust for an https:// server.")
@click.option("--uuid", "uuid_override", metavar="UUID",
              help="Use this machine UUID instead of DMI's (hardware with a missing or "
              "duplicated product UUID; several test machines on one host).")
@click.option("--hostname", "hostname_override", metavar="NAME",
              help="Report this hostname instead of the kernel's.")
@click.option("--dry-run", is_flag=True, help="Print what would be sent; send nothing.")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output for people or for scripts.")
def discover(server: str | None, bootstrap_token_file: Path | None, credential_file: Path,
             ca_file: str | None, uuid_override: str | None, hostname_override: str | None,
             dry_run: bool, output_format: str) -> None:
    """Gather this machine's facts (UUID, boot id, interfaces, routes, disks, LLDP) and
    register it with the fleet service, storing the machine credential it gets back.

    A machine is enrolled once: the bootstrap token enrols a machine that has no credential;
    after that, running discover again updates its facts with the credential in
    --credential-file. A machine enrolled elsewhere (its credential lost) is refused until an
    admin runs `divingbell fleet reenroll ID`.

    \b
    An installed host joins the fleet with two commands:
      divingbell discover --server https://fleet:8500 --bootstrap-token-file bootstrap.token
      divingbell agent --server https://fleet:8500
    """
    from divingbell.core.errors import CommandError
    from divingbell.fleet.client import FleetApiError, FleetClient, read_token, write_secret
    from divingbell.fleet.facts import gather

    try:
        facts = gather(uuid=uuid_override)
    except (ValueError, CommandError) as exc:
        raise click.ClickException(f"cannot gather facts: {exc}") from None
    if hostname_override:
        facts["hostname"] = hostname_override
    if dry_run or server is None:
        if output_format == "json" or dry_run:
            click.echo(json.dumps(facts, indent=2))
        else:
            _print_facts(facts)
        if server is None and not dry_run:
            click.echo("(not registered: give --server to register)", err=True)
        return
    own = _own_credential(credential_file)
    if own is None and bootstrap_token_file is None:
        raise click.UsageError("--server needs --bootstrap-token-file (or this machine's "
                               f"credential in {credential_file})")
    try:
        answer = None
        if own is not None:
            try:
                answer = FleetClient(server, own, ca_file=ca_file).discover(facts)
            except FleetApiError as exc:
                if exc.status != 401 or bootstrap_token_file is None:
                    raise
                # Revoked (decommissioned, or an admin allowed a new enrolment): enrol again.
                click.echo(f"the credential in {credential_file} was revoked: enrolling with "
                           "the bootstrap token", err=True)
        if answer is None:
            answer = FleetClient(server, read_token(bootstrap_token_file or ""),
                                 ca_file=ca_file).discover(facts)
    except FleetApiError as exc:
        detail = exc.detail if isinstance(exc.detail, dict) else {}
        if detail.get("error") in ("mac-conflict", "hostname-conflict"):
            what = (f"MAC {detail.get('mac')}" if detail["error"] == "mac-conflict"
                    else f"hostname {detail.get('hostname')}")
            click.echo(f"error: {what} is already registered to machine(s) "
                       f"{', '.join(map(str, detail.get('machines', [])))}", err=True)
            sys.exit(2)
        if detail.get("error") == "already-enrolled":
            click.echo(f"error: this machine is enrolled as {detail.get('machine')} and "
                       f"{credential_file} does not hold its credential: an admin can allow "
                       f"a new enrolment with `divingbell fleet reenroll {detail.get('machine')}`",
                       err=True)
            sys.exit(2)
        raise click.ClickException(str(exc)) from None
    if answer.get("credential"):
        write_secret(credential_file, answer["credential"])
    if output_format == "json":
        click.echo(json.dumps({"machine_id": answer["machine_id"], "state": answer["state"],
                               "roles": answer.get("roles", []),
                               "credential_file": str(credential_file)}, indent=2))
    else:
        roles = ", ".join(answer.get("roles") or []) or "none yet"
        click.echo(f"registered as {answer['machine_id']} ({answer['state']}, roles: {roles}); "
                   f"credential stored in {credential_file}")


def _own_credential(path: Path) -> str | None:
    """The machine credential already in `path`, if any (a bootstrap token is never kept
    there)."""
    from divingbell.fleet.client import FleetApiError, machine_id_of, read_token

    if not path.exists():
        return None
    try:
        credential = read_token(path)
    except FleetApiError as exc:
        raise click.ClickException(str(exc)) from None
    return credential if machine_id_of(credential) else None


def _print_facts(facts: dict[str, object]) -> None:
    click.echo(f"uuid:     {facts['uuid']}")
    click.echo(f"boot id:  {facts['boot_id']}")
    click.echo(f"hostname: {facts['hostname']}")
    for interface in facts["interfaces"]:  # type: ignore[attr-defined]
        addresses = ", ".join(f"{a['address']}/{a['prefix']}" for a in interface["addresses"])
        click.echo(f"nic {interface['name']}: {interface['mac'] or '-'} {addresses}"
                   + (f" via {interface['gateway']}" if interface["gateway"] else "")
                   + (" (boot)" if interface["boot"] else ""))
    for disk in facts["disks"]:  # type: ignore[attr-defined]
        click.echo(f"disk {disk['path']}: {disk['size_bytes']} bytes")
    for neighbour in facts["lldp"]:  # type: ignore[attr-defined]
        click.echo(f"lldp {neighbour['interface']}: {neighbour['chassis_name'] or '-'} "
                   f"({neighbour['chassis_id']}) port {neighbour['port_id']}")
