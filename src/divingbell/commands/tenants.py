"""`divingbell tenants`: keep tenant namespaces, quotas, bindings and credentials in line
with the source of truth."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from divingbell.policy.tenants import Controller, RunReport

EXIT_FAILED, EXIT_INVALID = 1, 2


@click.group()
def tenants() -> None:
    """Tenant accounts: what Toolforge's maintain-kubeusers did, as a controller.

    \b
      divingbell tenants sync --source tenants.yaml --config tenants-config.yaml --once
      divingbell tenants sync --source 'ldap://ldap.example.org/ou=people,dc=example,dc=org'
    """


@tenants.command()
@click.option("--source", required=True, metavar="FILE|ldap://HOST/BASE-DN[??SCOPE?FILTER]",
              help="The source of truth: a YAML file of tenants, or an LDAP URL (accounts of "
              "ldap.object_class with a numeric uid under the base DN).")
@click.option("--config", "config_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The controller's settings (prefix, quota, limits, credentials, homes). "
              "Default: built-in defaults, see docs/policy.md.")
@click.option("--once", is_flag=True, help="Run one pass and exit (0 when every tenant is in "
              "line, 1 otherwise). Without it, run every --interval.")
@click.option("--interval", type=click.FloatRange(5), default=300.0, show_default=True,
              metavar="SECONDS")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False), envvar="KUBECONFIG",
              help="Which cluster. Default: in-cluster, else ~/.kube/config.")
@click.option("--listen", default="0.0.0.0:9115", show_default=True, metavar="ADDR:PORT",
              help="Where /metrics is served (not with --once).")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]),
              default="text", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def sync(source: str, config_path: Path | None, once: bool, interval: float,
         kubeconfig: str | None, listen: str, output_format: str, log_level: str) -> None:
    """Reconcile every tenant: namespace, ResourceQuota, LimitRange, RoleBinding, client
    certificate and kubeconfig; disable and remove those the source says so.

    A source that cannot be read changes nothing. Results per tenant go to the status
    ConfigMap (status.namespace/status.configmap) and, with --once, to stdout.
    """
    from divingbell.agent.loop import configure_logging
    from divingbell.commands.console import invalid_file
    from divingbell.core.errors import DivingbellError, DocumentError
    from divingbell.kube import KubeError, LightkubeApi
    from divingbell.policy import FIELD_MANAGER
    from divingbell.policy.tenant_sources import open_source
    from divingbell.policy.tenants import Controller, load_config, make_signer

    # The HTTP client logs every API request at INFO: only divingbell's own lines at
    # --log-level, everything else at WARNING unless debug (as the agent does).
    configure_logging(log_level)
    try:
        config = load_config(config_path)
    except DocumentError as exc:
        invalid_file("the tenants config", exc, "text")
    try:
        tenant_source = open_source(source, config.ldap, config.namespace_prefix)
        api = LightkubeApi(kubeconfig, field_manager=FIELD_MANAGER)
        signer = make_signer(config, api)
    except DivingbellError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INVALID)
    except KubeError as exc:  # the kubeconfig, said in one line
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    controller = Controller(api, tenant_source, config, signer)
    if once:
        report = controller.run()
        _print(report, output_format)
        sys.exit(0 if report.ok else EXIT_FAILED)
    _loop(controller, interval, listen)


def _loop(controller: Controller, interval: float, listen: str) -> None:
    import logging
    import signal
    import threading

    from prometheus_client import start_http_server

    log = logging.getLogger("divingbell.tenants")
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{listen!r} is not ADDR:PORT", param_hint="--listen")
    try:
        start_http_server(int(port), host or "0.0.0.0", registry=controller.metrics.registry)
    except OSError as exc:  # in use, not an address of this host, unknown name
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror or exc}"
                                   ) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("tenant controller: source %s, every %.0fs, metrics on %s",
             controller.source.describe(), interval, listen)
    while not stop.is_set():
        report = controller.run()
        for line in _summary(report):
            log.info("%s", line)
        for error in report.errors:
            log.error("%s", error)
        stop.wait(interval)


def _summary(report: RunReport) -> list[str]:
    lines = []
    for tenant in report.tenants:
        detail = "; ".join(tenant.messages or tenant.actions) or "in line"
        lines.append(f"{tenant.name:<20} {tenant.state:<9} {detail}")
    for skipped in report.skipped:
        lines.append(f"skipped: {skipped}")
    counts: dict[str, int] = {}
    for tenant in report.tenants:
        counts[tenant.state] = counts.get(tenant.state, 0) + 1
    lines.append(f"{len(report.tenants)} tenant(s) from {report.source} in "
                 f"{report.seconds:.2f}s: " + (", ".join(f"{n} {s}" for s, n in
                                                         sorted(counts.items())) or "none"))
    return lines


def _print(report: RunReport, output_format: str) -> None:
    if output_format == "json":
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    for line in _summary(report):
        click.echo(line)
    for error in report.errors:
        click.echo(f"error: {error}", err=True)


@tenants.command()
@click.option("--source", required=True, metavar="FILE|ldap://HOST/BASE-DN[??SCOPE?FILTER]",
              help="As for sync.")
@click.option("--config", "config_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="As for sync.")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]),
              default="text", show_default=True)
def check(source: str, config_path: Path | None, output_format: str) -> None:
    """Validate the config and read the source, touching no cluster: every tenant with its
    namespace, uid, gid, home and state, and every entry that would be skipped.

    Exits 0 when both are usable, 1 when the source cannot be read, 2 when the config is
    invalid.
    """
    from divingbell.commands.console import invalid_file
    from divingbell.core.errors import DivingbellError, DocumentError
    from divingbell.policy.tenant_sources import open_source
    from divingbell.policy.tenants import load_config

    try:
        config = load_config(config_path)
    except DocumentError as exc:
        invalid_file("the tenants config", exc, output_format)
    try:
        read = open_source(source, config.ldap, config.namespace_prefix).read()
    except DivingbellError as exc:
        if output_format == "json":
            click.echo(json.dumps({"valid": False, "error": str(exc)}, indent=2))
            sys.exit(EXIT_FAILED)
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    rows: list[dict[str, object]] = []
    for tenant in read.tenants:
        home = (tenant.home if tenant.home and config.home.from_source
                else config.home.pattern.format(name=tenant.name))
        rows.append({"name": tenant.name, "namespace": config.namespace_prefix + tenant.name,
                     "uid": tenant.uid, "gid": tenant.gid, "home": home,
                     "state": "disabled" if tenant.disabled else "active"})
    if output_format == "json":
        click.echo(json.dumps({"valid": True, "tenants": rows, "skipped": read.skipped},
                              indent=2))
        return
    from divingbell.commands.output import table

    click.echo(table(["NAME", "NAMESPACE", "UID", "GID", "HOME", "STATE"],
                     [[str(r[k]) for k in ("name", "namespace", "uid", "gid", "home", "state")]
                      for r in rows]))
    for skipped in read.skipped:
        click.echo(f"skipped: {skipped}")
    click.echo(f"{len(rows)} tenant(s), {len(read.skipped)} skipped")
