"""What the commands that talk to a running fleet service share (`fleet`, `fleet rollout`,
`fleet bmc|power|reprovision`): the `--server`/`--token-file`/`--ca-file` and `--format`
options, the client, one request with its errors as one line and an exit code, and how answers
are shown."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

import click

from divingbell.fleet.client import FleetApiError, FleetClient, read_token

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
T = TypeVar("T")


def format_option(func: F) -> F:
    return click.option("--format", "output_format", type=click.Choice(["text", "json"]),
                        default="text", show_default=True,
                        help="Output for people or for scripts.")(func)


def api_options(func: F) -> F:
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


def api_client(server: str, token_file: Path | None, ca_file: str | None) -> FleetClient:
    try:
        token = read_token(token_file) if token_file else os.environ.get("DIVINGBELL_TOKEN")
        return FleetClient(server, token, ca_file=ca_file)
    except FleetApiError as exc:
        raise click.ClickException(str(exc)) from None


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def fail(exc: FleetApiError) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    if isinstance(exc.detail, dict) and exc.detail.get("problems"):
        for problem in exc.detail["problems"]:
            where = f" ({problem.get('location')})" if problem.get("location") else ""
            path = f"{problem.get('path')}: " if problem.get("path") else ""
            click.echo(f"  {path}{problem.get('message')}{where}", err=True)
    sys.exit(2 if exc.status in (400, 404, 409, 422) else 1)


def call(request: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """One request to the fleet API (a FleetClient method); an error the service or the
    network gives ends the command as `fail` says: the message, its problems, exit 2 or 1."""
    try:
        return request(*args, **kwargs)
    except FleetApiError as exc:
        fail(exc)


def power_answer(request: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """The answer of a request that powers a machine (a FleetClient method and its arguments).
    The service answers 502 `bmc-unconfirmed` when the BMC did not confirm, with the same body
    as a confirmed answer (what was sent, what was read): that is an answer, returned, not a
    failure of the command; any other error ends the command (`fail`)."""
    try:
        data: dict[str, Any] = request(*args)
    except FleetApiError as exc:
        detail = exc.detail if isinstance(exc.detail, dict) else {}
        if detail.get("error") != "bmc-unconfirmed":
            fail(exc)
        return detail
    return data


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
