"""`divingbell fleet rollout ...`: see and steer the rollout of a revision through the fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from divingbell.commands.fleetapi import (
    api_client,
    api_options,
    call,
    echo_json,
    format_option,
    removal_lines,
)


@click.group()
def rollout() -> None:
    """See and steer rollouts. Making a revision current (fleet document push, or activating
    an older one) starts a rollout: control-plane machines one at a time, then workers in waves
    of max-unavailable, rack by rack; the first failure halts it.

    \b
    divingbell fleet rollout plan 7          # what revision 7 would change, per machine
    divingbell fleet rollout policy --max-unavailable 25% --pause 60
    divingbell fleet document push site.yaml # starts the rollout
    divingbell fleet rollout status          # waves, progress, why it halted
    divingbell fleet rollout pause|resume
    divingbell fleet rollout abort [--rollback]
    """


def _print_rollout(data: dict[str, Any]) -> None:
    counts = data["summary"]
    total = sum(counts.values())
    click.echo(f"rollout {data['id']}: revision {data['revision']} "
               f"(from {data['from_revision'] or 'none'}) {data['status'].upper()}")
    click.echo(f"  started by {data['started_by']} at {data['started_at']}"
               + (f", finished {data['finished_at']}" if data["finished_at"] else ""))
    click.echo(f"  {counts['done']}/{total} done, {counts['updating']} updating, "
               f"{counts['failed']} failed, {counts['pending']} pending")
    if data.get("halt_reason"):
        click.echo(f"  {data['halt_reason']}")
    elif data.get("reason"):
        click.echo(f"  last decision: {data['reason']}")
    for number, wave in enumerate(data["waves"], 1):
        members = ", ".join(f"{m['name']}={m['progress']}" for m in wave)
        click.echo(f"  wave {number}: {members}")


@rollout.command()
@api_options
@format_option
def status(server: str, token_file: Path | None, ca_file: str | None,
           output_format: str) -> None:
    """The current rollout: waves, each machine's progress, why it halted. Exit 1 if it is
    halted, 0 otherwise."""
    data = call(api_client(server, token_file, ca_file).call, "GET", "/v1/rollouts/current")
    if output_format == "json":
        echo_json(data)
    else:
        _print_rollout(data)
    raise SystemExit(1 if data["status"] == "halted" else 0)


@rollout.command()
@api_options
@format_option
def history(server: str, token_file: Path | None, ca_file: str | None,
            output_format: str) -> None:
    """Past rollouts: who started each, when, and how it ended."""
    from divingbell.commands.output import table

    rows = call(api_client(server, token_file, ca_file).call, "GET", "/v1/rollouts")
    if output_format == "json":
        echo_json(rows)
        return
    click.echo(table(["ID", "REVISION", "STATUS", "STARTED BY", "STARTED", "FINISHED"],
                     [[str(r["id"]), str(r["revision"]), r["status"], r["started_by"],
                       r["started_at"], r["finished_at"] or "-"] for r in rows]))


def _verb(verb: str, server: str, token_file: Path | None, ca_file: str | None,
          output_format: str, rollback: bool = False) -> None:
    data = call(api_client(server, token_file, ca_file).call,
                "POST", f"/v1/rollouts/current/{verb}", {"rollback": rollback})
    if output_format == "json":
        echo_json(data)
    else:
        _print_rollout(data)


@rollout.command()
@api_options
@format_option
def pause(server: str, token_file: Path | None, ca_file: str | None, output_format: str) -> None:
    """Start no new machine; those updating finish."""
    _verb("pause", server, token_file, ca_file, output_format)


@rollout.command()
@api_options
@format_option
def resume(server: str, token_file: Path | None, ca_file: str | None,
           output_format: str) -> None:
    """Go on after a pause or a halt (failed machines are tried again)."""
    _verb("resume", server, token_file, ca_file, output_format)


@rollout.command()
@api_options
@click.option("--rollback", is_flag=True,
              help="Also serve the previous revision to the machines already updated.")
@format_option
def abort(server: str, token_file: Path | None, ca_file: str | None, rollback: bool,
          output_format: str) -> None:
    """Stop for good: machines not yet reached stay on their revision."""
    _verb("abort", server, token_file, ca_file, output_format, rollback)


DISRUPTION_WORDS = {"none": "live changes only", "restart": "restarts services",
                    "reboot": "REBOOTS"}


@rollout.command()
@api_options
@click.argument("revision", type=click.IntRange(min=1))
@click.option("--all", "show_all", is_flag=True, help="Also list machines that do not change.")
@format_option
def plan(server: str, token_file: Path | None, ca_file: str | None, revision: int,
         show_all: bool, output_format: str) -> None:
    """Before a rollout: how REVISION would change each machine's effective configuration,
    module by module, what it removes there (the host restores or removes each) against
    what it keeps, what it would do to each machine's workloads (live changes only, restart
    services, or reboot, with the reason, and how many machines of each), and which machines
    would not change at all."""
    data = call(api_client(server, token_file, ca_file).call,
                "GET", f"/v1/rollouts/plan/{revision}")
    if output_format == "json":
        echo_json(data)
        return
    click.echo(f"revision {revision}: {data['changed']} machine(s) change, "
               f"{data['unchanged']} unchanged (active revision {data['active'] or 'none'})")
    counts = data.get("disruption") or {}
    click.echo("disruption: " + ", ".join(f"{counts.get(kind, 0)} {word}" for kind, word in (
        ("reboot", "reboot"), ("restart", "restart services"), ("none", "live only"))))
    if data.get("exceeds_kept"):
        click.echo(f"removes more than it keeps on {len(data['exceeds_kept'])} machine(s): "
                   f"{', '.join(data['exceeds_kept'])} (a push of it needs --allow-removals)")
    for machine in data["machines"]:
        if not machine["changed"]:
            if show_all:
                click.echo(f"\n= {machine['name']} ({machine['id']}): no change")
            continue
        disrupts = machine.get("disruption") or {"kind": "none", "modules": {}}
        click.echo(f"\n~ {machine['name']} ({machine['id']}), "
                   f"from revision {machine['from_revision'] or 'none'}: "
                   f"{DISRUPTION_WORDS[disrupts['kind']]}")
        for module, why in disrupts["modules"].items():
            click.echo(f"  {module}: {why}")
        removals = machine.get("removals") or {}
        if removals.get("modules"):
            click.echo("  removed (the host restores or removes each):")
            for line in removal_lines({**removals, "name": machine["name"]})[1:]:
                click.echo(f"  {line}")
            click.echo(f"    {removals['removed']} removed, {removals['kept']} kept"
                       + ("  MORE THAN IT KEEPS" if removals.get("exceeds_kept") else ""))
        for module, lines in machine["modules"].items():
            click.echo(f"  [{module}]")
            for line in lines:
                click.echo(f"    {line}")


@rollout.command()
@api_options
@click.option("--max-unavailable", metavar="N|P%",
              help="Workers updated at once: a number or a percentage such as 25%.")
@click.option("--max-failures", type=click.IntRange(min=0),
              help="Failures tolerated before the rollout halts (default 0).")
@click.option("--pause", "pause_seconds", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Wait between waves.")
@format_option
def policy(server: str, token_file: Path | None, ca_file: str | None,
           max_unavailable: str | None, max_failures: int | None, pause_seconds: float | None,
           output_format: str) -> None:
    """Show the rollout policy, or change it for the next rollout."""
    current = call(api_client(server, token_file, ca_file).call, "GET", "/v1/rollout-policy")
    if any(v is not None for v in (max_unavailable, max_failures, pause_seconds)):
        if max_unavailable is not None:
            current["max_unavailable"] = (int(max_unavailable) if max_unavailable.isdigit()
                                          else max_unavailable)
        if max_failures is not None:
            current["max_failures"] = max_failures
        if pause_seconds is not None:
            current["pause_seconds"] = pause_seconds
        current = call(api_client(server, token_file, ca_file).call,
                       "PUT", "/v1/rollout-policy", current)
    if output_format == "json":
        echo_json(current)
        return
    for key, value in current.items():
        click.echo(f"{key}: {value}")
