"""`divingbell fleet ...`: the operators' tools for the fleet service.

Commands that manage the store itself (migrate, token, backup, export, import: `fleetstore.py`)
take `--db`; the others talk to a running service over its API (`--server`, `--token-file`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from divingbell.commands import fleetstore
from divingbell.commands.fleetapi import (
    api_client,
    api_options,
    call,
    echo_json,
    fail,
    format_option,
    power_answer,
    removal_lines,
)
from divingbell.commands.power import bmc, power_cmd, reprovision
from divingbell.commands.rollout import rollout
from divingbell.fleet.client import FleetApiError


@click.group()
def fleet() -> None:
    """Operate the fleet service: its store (migrate, token, backup, export, import) and its
    machines and documents over the API.

    \b
    Store commands take --db (or $DIVINGBELL_FLEET_DB); API commands take --server and
    --token-file (or $DIVINGBELL_SERVER, $DIVINGBELL_TOKEN_FILE).
    """


@fleet.command()
@api_options
@click.option("--state", help="Only machines in this state.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Only the first N machines (default: all, fetched a page at a time).")
@format_option
def machines(server: str, token_file: Path | None, ca_file: str | None, state: str | None,
             limit: int | None, output_format: str) -> None:
    """List machines in the order they were first seen: state, roles, revision, up to date or
    not."""
    from divingbell.commands.output import table

    rows = call(api_client(server, token_file, ca_file).machines, state, limit=limit)
    if output_format == "json":
        echo_json(rows)
        return
    click.echo(table(
        ["ID", "HOSTNAME", "STATE", "ROLES", "RACK", "REVISION", "UP-TO-DATE", "LAST REPORT"],
        [[m["id"], (m["hostname"] or "-") + (" (unadmitted)" if m.get("unadmitted") else ""),
          m["state"],
          ",".join(m["roles"]) + (" (pinned)" if m["pinned"] else "") or "-",
          m["rack"] or "-", str(m["revision"] or "-"), "yes" if m["up_to_date"] else "no",
          m["last_report_at"] or "never"] for m in rows]))


@fleet.command("machine")
@api_options
@click.argument("machine_id")
@format_option
def machine_cmd(server: str, token_file: Path | None, ca_file: str | None, machine_id: str,
                output_format: str) -> None:
    """Show one machine: facts, roles, labels, history, last reports."""
    data = call(api_client(server, token_file, ca_file).machine, machine_id)
    if output_format == "json":
        echo_json(data)
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
@api_options
@click.argument("machine_id")
@click.argument("roles", nargs=-1)
@click.option("--unpin", is_flag=True, help="Hand the machine back to the scheduler.")
@format_option
def roles(server: str, token_file: Path | None, ca_file: str | None, machine_id: str,
          roles: tuple[str, ...], unpin: bool, output_format: str) -> None:
    """Pin a machine's roles (control-plane, worker), or --unpin it.

    \b
      divingbell fleet roles m0123456789ab worker
      divingbell fleet roles m0123456789ab --unpin
    """
    if unpin == bool(roles):
        raise click.UsageError("give ROLES to pin, or --unpin")
    data = call(api_client(server, token_file, ca_file).set_roles, machine_id, list(roles),
                 pinned=not unpin)
    if output_format == "json":
        echo_json(data)
    else:
        click.echo(f"{data['id']}: roles {', '.join(data['roles']) or '-'}"
                   f"{' (pinned)' if data['pinned'] else ''}, state {data['state']}")


@fleet.command()
@api_options
@click.option("--activate", "activate_number", type=int, metavar="N",
              help="Make revision N the current one again.")
@format_option
def revisions(server: str, token_file: Path | None, ca_file: str | None,
              activate_number: int | None, output_format: str) -> None:
    """List document revisions (or make one current again with --activate N)."""
    from divingbell.commands.output import table

    client = api_client(server, token_file, ca_file)
    if activate_number is not None:
        call(client.activate, activate_number)
    rows = call(client.revisions)
    if output_format == "json":
        echo_json(rows)
        return
    click.echo(table(["REVISION", "ACTIVE", "NAME", "CREATED", "BY", "DIGEST"],
                     [[str(r["revision"]), "*" if r["active"] else "", r["name"],
                       r["created_at"], r["created_by"], r["digest"][:12]] for r in rows]))


@fleet.group()
def document() -> None:
    """The desired configuration for the whole fleet."""


@document.command("push")
@api_options
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--allow-removals", is_flag=True,
              help="Consent to a revision that removes more than it keeps on some machine "
              "(recorded in the audit log). Without it such a push is refused, naming them.")
@format_option
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
        data = api_client(server, token_file, ca_file).push_document(
            file.read_bytes(), file.name, allow_removals=allow_removals)
    except FleetApiError as exc:
        # Unlike the other commands, a rejected push answers in JSON under --format json:
        # scripts read the document's problems from it.
        if output_format == "json":
            echo_json({"error": exc.status, "detail": exc.detail})
            sys.exit(2)
        if isinstance(exc.detail, dict) and exc.detail.get("error") == "removals-need-consent":
            for group in exc.detail.get("removals", []):
                for line in removal_lines(group):
                    click.echo(line, err=True)
        fail(exc)
    if output_format == "json":
        echo_json(data)
        return
    if data.get("created", True):
        click.echo(f"revision {data['revision']} stored and active")
    else:
        click.echo(f"unchanged: revision {data['revision']} already has this text")
    for group in data.get("removals", []):
        for line in removal_lines(group):
            click.echo(line)


@fleet.command()
@api_options
@format_option
def status(server: str, token_file: Path | None, ca_file: str | None,
           output_format: str) -> None:
    """The fleet at a glance: machines by state, up to date vs outdated, active revision."""
    client = api_client(server, token_file, ca_file)
    rows = call(client.machines)
    revs = call(client.revisions)
    by_state: dict[str, int] = {}
    for machine in rows:
        by_state[machine["state"]] = by_state.get(machine["state"], 0) + 1
    live = [m for m in rows if m["state"] != "decommissioned"]
    fresh = sum(1 for m in live if m["up_to_date"])
    active = next((r["revision"] for r in revs if r["active"]), None)
    summary = {"machines": len(rows), "by_state": by_state, "up_to_date": fresh,
               "outdated": len(live) - fresh, "active_revision": active}
    if output_format == "json":
        echo_json(summary)
        return
    click.echo(f"{len(rows)} machine(s); active revision {active or 'none'}")
    click.echo(f"  up to date: {fresh}, outdated: {len(live) - fresh}")
    for state_name, count in sorted(by_state.items()):
        click.echo(f"  {state_name}: {count}")
    sys.exit(0 if len(live) == fresh else 1)

@fleet.command()
@api_options
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
    client = api_client(server, token_file, ca_file)
    data = call(client.call, "POST", f"/v1/machines/{machine_id}/decommission")
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
@api_options
@click.argument("machine_id")
@format_option
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
    data = call(api_client(server, token_file, ca_file).call,
                 "POST", f"/v1/machines/{machine_id}/reenroll")
    if output_format == "json":
        echo_json(data)
        return
    click.echo(f"{data['id']}: {data['state']}; its next boot may enrol it again")


@fleet.command()
@api_options
@click.argument("machine_id", required=False)
@click.option("--hostname", metavar="NAME",
              help="Accept this name instead of the one the machine claimed (RFC 1123).")
@click.option("--all-unadmitted", is_flag=True,
              help="Instead of one machine: accept the claimed name of every machine enrolled "
              "anonymously that no operator accepted yet, where the name is valid and free; "
              "the others are listed with why. One audit event.")
@format_option
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
    data = call(api_client(server, token_file, ca_file).call,
                 "PUT", f"/v1/machines/{machine_id}/hostname", body)
    if output_format == "json":
        echo_json(data)
        return
    click.echo(f"{data['id']}: hostname {data['hostname']} accepted")


def _accept_unadmitted(server: str, token_file: Path | None, ca_file: str | None,
                       output_format: str) -> None:
    data = call(api_client(server, token_file, ca_file).call,
                 "POST", "/v1/machines/accept", {"all_unadmitted": True})
    if output_format == "json":
        echo_json(data)
        return
    for item in data["accepted"]:
        click.echo(f"{item['id']}: hostname {item['hostname']} accepted")
    for item in data["refused"]:
        click.echo(f"{item['id']}: not accepted: {item['reason']}")
    click.echo(f"{len(data['accepted'])} accepted, {len(data['refused'])} not; "
               f"{data['unadmitted']} still unadmitted")


@fleet.command()
@api_options
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@format_option
def audit(server: str, token_file: Path | None, ca_file: str | None, limit: int,
          output_format: str) -> None:
    """What operators did: pushes, activations, role pins, decommissions, forced releases."""
    from divingbell.commands.output import table

    rows = call(api_client(server, token_file, ca_file).call, "GET", f"/v1/audit?limit={limit}")
    if output_format == "json":
        echo_json(rows)
        return
    click.echo(table(["AT", "ACTOR", "ACTION", "SUBJECT", "DETAIL"],
                     [[r["at"], r["actor"], r["action"], r["subject"], r["detail"]]
                      for r in rows]))


for command in (fleetstore.migrate, fleetstore.token, fleetstore.backup, fleetstore.export,
                fleetstore.import_cmd, rollout, bmc, power_cmd, reprovision):
    fleet.add_command(command)
