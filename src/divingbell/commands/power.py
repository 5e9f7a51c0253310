"""`divingbell fleet bmc|power|reprovision`: machines' BMCs and their power, through the
fleet service (docs/power.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from divingbell.commands.fleetapi import (
    api_client,
    api_options,
    call,
    echo_json,
    format_option,
    power_answer,
)
from divingbell.fleet.client import FleetApiError


@click.command()
@api_options
@click.argument("machine_id")
@click.option("--redfish", "redfish_url", metavar="URL",
              help="The BMC's Redfish system URL (https://bmc/redfish/v1/Systems/1), or its "
              "root when it manages one system.")
@click.option("--ipmi", "ipmi_address", metavar="HOST[:PORT]",
              help="The BMC's IPMI 2.0 address (port 623 by default; IPMI has no TLS: keep "
              "the BMC network private).")
@click.option("--username", help="The BMC user.")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file (0600) holding the BMC user's password (first line).")
@click.option("--bmc-ca-file", "bmc_ca", type=click.Path(exists=True, dir_okay=False,
                                                     path_type=Path),
              help="Verify the BMC's certificate against this CA (PEM) instead of the "
              "system's trust store.")
@click.option("--insecure", is_flag=True,
              help="Do not verify the BMC's TLS certificate (recorded in the audit log).")
@click.option("--remove", is_flag=True, help="Forget the machine's BMC.")
@format_option
def bmc(server: str, token_file: Path | None, ca_file: str | None, machine_id: str,
        redfish_url: str | None, ipmi_address: str | None, username: str | None,
        password_file: Path | None, bmc_ca: Path | None, insecure: bool, remove: bool,
        output_format: str) -> None:
    """Show or set a machine's BMC (admin to set). Its credentials are stored encrypted with
    the service's secrets key and never shown again.

    \b
      divingbell fleet bmc m0123 --redfish https://10.0.9.11/redfish/v1/Systems/1 \\
          --username admin --password-file bmc.pass --bmc-ca-file bmc-ca.pem
      divingbell fleet bmc m0123 --ipmi 10.0.9.12 --username admin --password-file bmc.pass
      divingbell fleet bmc m0123          # show it (never the credentials)
    """
    from divingbell.fleet.client import read_token as read_first_line

    client = api_client(server, token_file, ca_file)
    path = f"/v1/machines/{machine_id}/bmc"
    if remove:
        call(client.call, "DELETE", path)
        click.echo(f"{machine_id}: BMC removed")
        return
    if redfish_url and ipmi_address:
        raise click.UsageError("give --redfish or --ipmi, not both")
    if redfish_url or ipmi_address:
        if not username or password_file is None:
            raise click.UsageError("--username and --password-file are needed with "
                                   "--redfish or --ipmi")
        try:
            password = read_first_line(password_file)
        except FleetApiError as exc:
            raise click.BadParameter(str(exc).replace("token file", "password file"),
                                     param_hint="--password-file") from None
        body: dict[str, Any] = {
            "protocol": "redfish" if redfish_url else "ipmi",
            "address": redfish_url or ipmi_address, "username": username,
            "password": password, "insecure": insecure}
        if bmc_ca is not None:
            body["ca_pem"] = bmc_ca.read_text()
        data = call(client.call, "PUT", path, body)
    elif username or password_file or bmc_ca or insecure:
        raise click.UsageError("--username, --password-file, --bmc-ca-file and --insecure go "
                               "with --redfish or --ipmi")
    else:
        data = call(client.call, "GET", path)
    if output_format == "json":
        echo_json(data)
        return
    trust = "" if data["protocol"] == "ipmi" else (
        "; TLS NOT verified" if not data["verify_tls"] else
        "; TLS verified" + (" with its CA" if data["ca"] else ""))
    click.echo(f"{data['machine_id']}: {data['protocol']} {data['address']}{trust}; "
               f"credentials {data['credentials']}; power {data['power_state']}"
               + (f" at {data['power_checked_at']}" if data["power_checked_at"] else ""))


@click.command("power")
@api_options
@click.argument("machine_id")
@click.argument("action", type=click.Choice(["status", "on", "off", "soft-off", "cycle"]))
@click.option("--boot-once", type=click.Choice(["pxe", "disk"]),
              help="Boot from the network (pxe) or the disk at the next boot only, set before "
              "the power action.")
@click.option("--wait", "wait_seconds", type=click.FloatRange(1, 3600), default=600,
              show_default=True, metavar="SECONDS",
              help="How long to wait for the service's answer.")
@format_option
def power_cmd(server: str, token_file: Path | None, ca_file: str | None, machine_id: str,
              action: str, boot_once: str | None, wait_seconds: float,
              output_format: str) -> None:
    """Power a machine through its BMC, with a confirmed outcome (admin; status: reader).

    Nothing is sent unless the BMC reports the same state twice in a row; `on` is sent only
    from a confirmed off; `cycle` is off, confirmed, then on, confirmed; each change is read
    back until the BMC confirms it or the service's --power-timeout passes. Exit 0 when
    confirmed, 1 when not (the answer says what was sent and what was read).

    \b
      divingbell fleet power m0123 status
      divingbell fleet power m0123 cycle --boot-once pxe
    """
    client = api_client(server, token_file, ca_file)
    client.timeout = wait_seconds
    path = f"/v1/machines/{machine_id}/power"
    if action == "status" and boot_once is None:
        data = power_answer(client.call, "GET", path)
    else:
        data = power_answer(client.call, "POST", path, {"action": action,
                                                        "boot_once": boot_once})
    if output_format == "json":
        echo_json(data)
    else:
        click.echo(f"{machine_id}: {_outcome(data)}", err=not data["ok"])
    sys.exit(0 if data["ok"] else 1)


@click.command()
@api_options
@click.argument("machine_id")
@click.option("--wait", "wait_seconds", type=click.FloatRange(1, 3600), default=600,
              show_default=True, metavar="SECONDS",
              help="How long to wait for the service's answer.")
@format_option
def reprovision(server: str, token_file: Path | None, ca_file: str | None, machine_id: str,
                wait_seconds: float, output_format: str) -> None:
    """Install MACHINE_ID again, as the same machine (admin; audited).

    Its id, roles, history and reports are kept; its credential is revoked (the OS holding it
    is about to be replaced) and it is `booting`: its next network boot enrols it again and,
    having roles, installs (the default hook overwrites its own previous install). With a BMC
    (`fleet bmc`) no hands are needed: it boots from the network once and is power cycled,
    off confirmed, then on confirmed; exit 1 when the BMC did not confirm (the machine then
    reinstalls at its next network boot). Without one, power-cycle it yourself.
    """
    client = api_client(server, token_file, ca_file)
    client.timeout = wait_seconds
    data = power_answer(client.call, "POST", f"/v1/machines/{machine_id}/reprovision")
    if output_format == "json":
        echo_json(data)
    elif "actions" not in data:
        click.echo(f"{machine_id}: {data['state']}; it installs again at its next network boot "
                   "(no BMC: power-cycle it to start)")
    else:
        click.echo(f"{machine_id}: reinstall at its next network boot; power {_outcome(data)}",
                   err=not data["ok"])
    sys.exit(0 if data.get("ok", True) else 1)


def _outcome(answer: dict[str, Any]) -> str:
    """A power answer as its line ends: the state, what was sent to the BMC, the message."""
    sent = ", ".join(answer["actions"]) or "nothing"
    return f"{answer['state']} (sent: {sent}): {answer['message']}"
