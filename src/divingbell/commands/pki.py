"""`divingbell pki`: generate a cluster's certificates from a catalog, and check or renew them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from divingbell.commands.console import EXIT_FAILED, invalid_input
from divingbell.core.errors import DocumentError


@click.group()
def pki() -> None:
    """Certificates and keys for a cluster, from a PKI catalog (Promenade's PKICatalog format).

    \b
      divingbell pki generate catalog.yaml -o pki/     # create, or reuse what still matches
      divingbell pki check pki/ --within 30d            # exit 1 if anything expires or is broken
      divingbell pki check pki/ --renew                 # re-issue those, keeping their keys
    """


@pki.command()
@click.argument("catalogs", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the PEM files and certificates.yaml (created 0700).")
@click.option("--renewal-window", default="30d", show_default=True, metavar="DURATION",
              help="Re-issue an existing certificate that expires within this (30d, 12h).")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output for people or for scripts.")
def generate(catalogs: tuple[Path, ...], out: Path, renewal_window: str,
             output_format: str) -> None:
    """Generate every CA, certificate and keypair CATALOGS describe into OUTPUT.

    Several catalog files form one catalog: a CA named in two files is one CA. A catalog is
    given bare (certificate_authorities:, keypairs:) or as a `promenade/PKICatalog/v1`
    document; files of Promenade configuration with other documents are fine.

    Files already in OUTPUT are reused while they match the catalog (subject, SANs, usages,
    issuer) and do not expire within the renewal window; otherwise the certificate is
    re-issued, keeping its key. A certificate without its key (or a key without its
    certificate) stops everything: nothing is written. Keys are written 0600 and never printed.

    \b
    Output layout:
      <ca>.pem, <ca>-key.pem                 each certificate authority (subject CN=<ca>)
      <document_name>.pem, -key.pem          each certificate
      <keypair>.pem (public), -key.pem       each keypair (e.g. service-account signing)
      certificates.yaml                      all of the above as YAML documents (0600)
    """
    from divingbell.pki.catalog import load_catalog
    from divingbell.pki.check import parse_window
    from divingbell.pki.crypto import PkiError
    from divingbell.pki.generate import generate as run_generate

    try:
        window = parse_window(renewal_window)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--renewal-window") from None
    try:
        catalog = load_catalog(catalogs)
    except DocumentError as exc:
        invalid_input(exc.problems, output_format)
    try:
        outcomes = run_generate(catalog, out, renewal_days=window.total_seconds() / 86400)
    except PkiError as exc:
        if output_format == "json":
            click.echo(json.dumps({"ok": False, "errors": exc.problems}, indent=2))
        else:
            for problem in exc.problems:
                click.echo(f"error: {problem}", err=True)
        raise SystemExit(EXIT_FAILED) from None
    if output_format == "json":
        click.echo(json.dumps({"ok": True, "output": str(out),
                               "items": [o.as_dict() for o in outcomes]}, indent=2))
        return
    for outcome in outcomes:
        detail = "" if outcome.action == "reused" or outcome.reason == "new" else (
            f"  ({outcome.reason})")
        click.echo(f"{outcome.action:9} {outcome.kind:11} {outcome.name}{detail}")
    counts = {a: sum(o.action == a for o in outcomes) for a in ("created", "reissued", "reused")}
    click.echo(f"{counts['created']} created, {counts['reissued']} re-issued, "
               f"{counts['reused']} reused in {out}")


@pki.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--within", default="30d", show_default=True, metavar="DURATION",
              help="Fail for certificates that expire within this (30d, 12h, 90m).")
@click.option("--renew", is_flag=True,
              help="Re-issue every certificate that expires within the window or does not chain "
              "to its CA (same subject, SANs and usages; keeps its key).")
@click.option("--rekey", is_flag=True, help="With --renew: new keys for what is re-issued.")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output for people or for scripts.")
def check(directory: Path, within: str, renew: bool, rekey: bool, output_format: str) -> None:
    """Show each certificate in DIRECTORY: subject, SANs, issuer, expiry, chain.

    Exits 1 if any certificate expires within the window or does not chain to a CA in the
    directory (after --renew: if any still does). Exit 0 means all good.
    """
    from divingbell.pki.check import check as run_check
    from divingbell.pki.check import parse_window
    from divingbell.pki.crypto import PkiError

    if rekey and not renew:
        raise click.UsageError("--rekey only goes with --renew")
    try:
        window = parse_window(within)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--within") from None
    try:
        statuses = run_check(directory, window, renew=renew, rekey=rekey)
    except PkiError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        raise SystemExit(EXIT_FAILED) from None
    failing = [s for s in statuses if s.problems]
    if output_format == "json":
        click.echo(json.dumps({"ok": not failing, "certificates": [s.as_dict() for s in statuses]},
                              indent=2))
    else:
        for status in statuses:
            mark = "renewed" if status.renewed else ("FAIL" if status.problems else "ok")
            click.echo(f"{status.name} ({status.kind}) [{mark}]")
            click.echo(f"  subject:  {status.subject}")
            sans = [*status.dns_names, *status.ip_addresses]
            if sans:
                click.echo(f"  SANs:     {', '.join(sans)}")
            if status.usages:
                click.echo(f"  usages:   {', '.join(status.usages)}")
            click.echo(f"  issuer:   {status.issuer}"
                       + (f" ({status.issuer_file}.pem)" if status.issuer_file else ""))
            click.echo(f"  expires:  {status.not_after:%Y-%m-%d %H:%M}Z")
            for problem in status.problems:
                click.echo(f"  problem:  {problem}")
        click.echo(f"{len(statuses)} certificates, {len(failing)} with problems")
    if failing:
        raise SystemExit(EXIT_FAILED)
