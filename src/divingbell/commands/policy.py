"""`divingbell policy`: the admission webhooks (serve, check, manifests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from divingbell.commands.host import check_image_option

if TYPE_CHECKING:
    from divingbell.policy.config import PolicyConfig

EXIT_FAILED, EXIT_INVALID = 1, 2

_config_option = click.option(
    "--config", "config_path", required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The policy file (see docs/policy.md).")


def _load(path: Path, output_format: str = "text") -> PolicyConfig:
    from divingbell.commands.console import invalid_file
    from divingbell.core.errors import DocumentError
    from divingbell.policy.config import load_policy

    try:
        return load_policy(path)
    except DocumentError as exc:
        invalid_file("the policy file", exc, output_format)


def _address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"{listen!r} is not ADDR:PORT", param_hint="--listen")
    return host.strip("[]") or "0.0.0.0", int(port)


@click.group()
def policy() -> None:
    """Admission webhooks that pin tenants to their uid, registry and host paths.

    \b
      divingbell policy check --config policy.yaml
      divingbell policy manifests --config policy.yaml --ca-bundle ca.crt | kubectl apply -f -
      divingbell policy serve --config policy.yaml --tls-cert tls.crt --tls-key tls.key
    """


@policy.command()
@_config_option
@click.option("--format", "output_format", type=click.Choice(["text", "json"]),
              default="text", show_default=True)
def check(config_path: Path, output_format: str) -> None:
    """Validate a policy file; list the policies it enables and where each answers.

    Exits 0 when valid, 2 when not (every problem named with its path and file:line).
    """
    from divingbell.policy.server import routes

    config = _load(config_path, output_format)
    enabled = {path: route.policy.name for path, route in sorted(routes(config).items())}
    if output_format == "json":
        click.echo(json.dumps({"valid": True, "routes": enabled}, indent=2))
        return
    if not enabled:
        click.echo(f"{config_path}: valid, but no policy is enabled")
        return
    click.echo(f"{config_path}: valid; {len(enabled)} policies:")
    for path, name in enabled.items():
        route = routes(config)[path]
        scope = (f"namespaces matching {route.selector.as_kubernetes()}"
                 if route.selector else "every namespace")
        click.echo(f"  {path:<20} {name:<10} {scope}")


@policy.command()
@_config_option
@click.option("--tls-cert", required=True, type=click.Path(exists=True, dir_okay=False,
                                                           path_type=Path),
              help="The serving certificate (PEM, with its chain). Re-read when it changes.")
@click.option("--tls-key", required=True, type=click.Path(exists=True, dir_okay=False,
                                                          path_type=Path),
              help="Its private key (PEM).")
@click.option("--listen", default="0.0.0.0:8443", show_default=True, metavar="ADDR:PORT")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False), envvar="KUBECONFIG",
              help="For namespace lookups outside a pod. Default: in-cluster, else "
              "~/.kube/config.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def serve(config_path: Path, tls_cert: Path, tls_key: Path, listen: str,
          kubeconfig: str | None, log_level: str) -> None:
    """Answer admission.k8s.io/v1 AdmissionReviews over HTTPS.

    Each enabled policy answers on its own path (/mutate/uid, /mutate/automount,
    /validate/registry, /validate/hostpath); /healthz and /metrics for probes and
    Prometheus. Namespaces are looked up through the API (RunAsUser annotation, labels for
    the selector) and cached for namespace_cache_seconds. Refusals are logged.
    """
    import logging
    import signal
    import ssl
    import threading

    from divingbell.agent.loop import configure_logging
    from divingbell.policy.server import make_server

    # The HTTP client logs every API request at INFO: only divingbell's own lines at
    # --log-level, everything else at WARNING unless debug (as the agent does).
    configure_logging(log_level)
    config = _load(config_path)
    host, port = _address(listen)
    from divingbell.kube import KubeError, LightkubeApi
    from divingbell.policy import FIELD_MANAGER
    from divingbell.policy.server import ClusterNamespaces, routes

    namespaces = None
    if any(route.needs_namespace for route in routes(config).values()):
        try:
            namespaces = ClusterNamespaces(LightkubeApi(kubeconfig,
                                                        field_manager=FIELD_MANAGER))
        except KubeError as exc:  # the kubeconfig, said in one line
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_FAILED)
    try:
        server = make_server(config, namespaces, cert=tls_cert, key=tls_key, host=host,
                             port=port)
    except (OSError, ssl.SSLError) as exc:
        click.echo(f"error: cannot serve on {listen} with {tls_cert}: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    logging.getLogger("divingbell.policy").info(
        "serving %s on https://%s:%d", ", ".join(sorted(server.reviewer.routes)) or "nothing",
        host, server.port)
    stop.wait()
    server.shutdown()
    server.server_close()


@policy.command()
@_config_option
@click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The CA that signed the webhook's serving certificate (PEM).")
@click.option("--pki-dir", type=click.Path(file_okay=False, path_type=Path),
              default="/etc/divingbell/pki", show_default=True,
              help="Where divingbell's PKI keeps its CAs; its webhook-ca.crt (else ca.crt) is "
              "used when --ca-bundle is not given.")
@click.option("--image", default=None, metavar="IMAGE", callback=check_image_option,
              help="The divingbell image. Default: divingbell:<this version>.")
@click.option("--replicas", type=click.IntRange(1, 10), default=2, show_default=True)
@click.option("--timeout", "timeout", type=click.IntRange(1, 30), default=5, show_default=True,
              help="The API server's timeoutSeconds for each webhook call.")
@click.option("--tenants/--no-tenants", default=True, show_default=True,
              help="Also print the tenant ClusterRole and the tenant controller's RBAC.")
def manifests(config_path: Path, ca_bundle: Path | None, pki_dir: Path, image: str | None,
              replicas: int, timeout: int, tenants: bool) -> None:
    """Print everything to deploy, as YAML: namespace, RBAC, ConfigMap, Deployment, PDB,
    Service and the Mutating/ValidatingWebhookConfigurations (failurePolicy Fail; never
    kube-system or the policy's own namespace).

    \b
    The serving certificate goes in a Secret first:
      kubectl -n divingbell-policy create secret tls divingbell-policy-tls \\
          --cert tls.crt --key tls.key
      divingbell policy manifests --config policy.yaml --ca-bundle ca.crt | kubectl apply -f -
    """
    from divingbell.agent.manifests import to_yaml
    from divingbell.policy.manifests import DEFAULT_IMAGE, build

    config = _load(config_path)
    bundle = _ca_bundle(ca_bundle, pki_dir)
    objects = build(config, config_path.read_text(), ca_bundle=bundle,
                    image=image or DEFAULT_IMAGE, replicas=replicas, timeout=timeout,
                    tenants=tenants)
    click.echo(to_yaml(objects), nl=False)


def _ca_bundle(ca_bundle: Path | None, pki_dir: Path) -> bytes:
    candidates = [ca_bundle] if ca_bundle else [pki_dir / "webhook-ca.crt", pki_dir / "ca.crt"]
    for path in candidates:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror}",
                                     param_hint="--ca-bundle") from None
        from cryptography import x509

        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            raise click.BadParameter(f"{path} holds no PEM certificate",
                                     param_hint="--ca-bundle") from None
        return data
    raise click.BadParameter(f"no CA bundle: give --ca-bundle FILE, or run `divingbell pki` so "
                             f"{candidates[0]} exists", param_hint="--ca-bundle")
