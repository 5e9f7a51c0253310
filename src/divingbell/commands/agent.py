"""`divingbell agent`: keep this node converged, in a DaemonSet pod, under systemd, or in
fleet mode. A thin click wrapper around divingbell.agent.loop (and divingbell.agent.fleet_source).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from divingbell.commands import console
from divingbell.commands.host import host_options, node_name, node_options, parse_labels

if TYPE_CHECKING:
    from divingbell.agent.loop import Agent
    from divingbell.core.host import Host


@click.command(short_help="Keep this node converged (a DaemonSet pod or systemd unit).")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@host_options
@node_options
@click.option("--server", "fleet_server", metavar="URL",
              help="Fleet mode: take the configuration from this fleet service instead of "
              "FILES, and report to it (see docs/fleet.md).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Fleet mode: the machine credential (default: the one divingbell discover "
              "stored, /var/lib/divingbell/fleet-credential).")
@click.option("--fleet-interval", type=float, default=60.0, show_default=True,
              metavar="SECONDS", help="Fleet mode: how often the configuration is fetched "
              "(a conditional GET) and the last report re-sent (a report also follows every "
              "converge).")
@click.option("--revert-after", type=click.FloatRange(min=1), default=900.0,
              show_default=True, metavar="SECONDS",
              help="Fleet mode: a new revision after which the service has not answered for "
              "this long is reverted on this machine to the last-known-good one (the last "
              "reported converged) and reported `reverted` once the service answers.")
@click.option("--labels-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Node labels as KEY=VALUE lines, re-read as they change (hosts without "
              "Kubernetes).")
@click.option("--kube/--no-kube", "use_kube", default=None,
              help="Read node labels from, and report status to, the Kubernetes API. Default: "
              "on inside a pod (KUBERNETES_SERVICE_HOST set), off elsewhere.")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False), envvar="KUBECONFIG",
              help="Which cluster, outside a pod.")
@click.option("--listen", default="0.0.0.0:9114", show_default=True, metavar="ADDR:PORT",
              help="Where /healthz, /readyz and /metrics are served.")
@click.option("--poll-interval", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="How often the document files are checked for a change.")
@click.option("--label-interval", type=float, default=30.0, show_default=True,
              metavar="SECONDS", help="How often node labels are re-read.")
@click.option("--drift-interval", type=float, default=300.0, show_default=True,
              metavar="SECONDS", help="How often the host is checked for drift.")
@click.option("--backoff-max", type=float, default=300.0, show_default=True, metavar="SECONDS",
              help="Longest wait between retries of a failed converge (doubling from 10s).")
@click.option("--follow-document-changes", is_flag=True,
              help="Converge the document files again when they change under the running "
              "agent (hosts where an operator edits them). Default: the document read at start "
              "is kept until the agent restarts; in a pod a new document comes with a new pod.")
@click.option("--document-digest", metavar="DIGEST", envvar="DIVINGBELL_DOCUMENT_DIGEST",
              help="Refuse a document whose digest differs (set by `divingbell manifests` in "
              "the pod template).")
@click.option("--converge-timeout", type=float, default=None, metavar="SECONDS",
              help="A converge running longer is stuck and /healthz fails. Default: the "
              "document's script timeouts and lock waits, plus 30 minutes.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True,
              help="info: one line per converge; debug adds every Kubernetes API request.")
def agent(files: tuple[Path, ...], root: Path, proc_sys: Path, node: str | None,
          labels: tuple[str, ...], labels_file: Path | None, use_kube: bool | None,
          kubeconfig: str | None, listen: str, poll_interval: float, label_interval: float,
          drift_interval: float, backoff_max: float, follow_document_changes: bool,
          document_digest: str | None, converge_timeout: float | None, log_level: str,
          fleet_server: str | None, token_file: Path | None, fleet_interval: float,
          revert_after: float) -> None:
    """Keep this node converged: the process a DaemonSet pod or a systemd unit runs.

    Converges the document at start, then again whenever the node's labels change or drift
    is found (every --drift-interval; only reported if the document says `drift: report`).
    The document is the one read at start: files changed under the running agent are
    reported and ignored unless --follow-document-changes (in a pod, a new document comes
    with a new pod, so the DaemonSet rollout decides when each node gets it). A failure
    never ends the process: it backs off and retries. /readyz answers 200 only once the
    current document revision has converged here, which is what gates a DaemonSet rollout;
    /healthz fails when a converge runs far past its budget (--converge-timeout).

    \b
    In a pod:      divingbell agent /etc/divingbell/site.yaml --root /host
    Without k8s:   divingbell agent /etc/divingbell/site.yaml --follow-document-changes \
                       --labels-file /etc/divingbell/labels
    Fleet mode:    divingbell agent --server https://fleet:8500
    """
    import logging
    import signal
    import threading
    from http.server import ThreadingHTTPServer

    from divingbell.agent.loop import Agent, AgentSettings, configure_logging, serve
    from divingbell.core.host import interrupt

    configure_logging(log_level)
    address, _, port_text = listen.rpartition(":")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise click.BadParameter(f"{listen!r} is not ADDR:PORT", param_hint="--listen")

    def listening(runner: Agent) -> ThreadingHTTPServer:
        try:
            return serve(runner, address or "0.0.0.0", int(port_text))
        except OSError as exc:  # in use, not an address of this host, unknown name
            raise click.ClickException(
                f"cannot listen on {listen}: {exc.strerror or exc}") from None

    if fleet_server is not None or files == ():
        runner: Agent = _fleet_agent(fleet_server, token_file, files, console.host(root, proc_sys),
                                     poll_interval, fleet_interval, drift_interval, backoff_max,
                                     revert_after)
        server_http = listening(runner)
        stop_fleet = threading.Event()

        def stop_fleet_now(*_: object) -> None:
            stop_fleet.set()
            interrupt.set()  # a converge in progress stops between two changes

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop_fleet_now)
        logging.getLogger("divingbell.agent").info("agent in fleet mode (%s), serving %s",
                                                   fleet_server, listen)
        runner.run(stop_fleet)
        server_http.shutdown()
        return
    name = node_name(node)
    if use_kube is None:
        use_kube = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) or kubeconfig is not None
    kube = None
    if use_kube:
        from divingbell.kube import KubeError, LightkubeApi

        try:
            kube = LightkubeApi(kubeconfig)
        except KubeError as exc:
            raise click.ClickException(str(exc)) from None
    settings = AgentSettings(
        documents=list(files), node=name, host=console.host(root, proc_sys),
        static_labels=dict(parse_labels(labels)), labels_file=labels_file,
        poll_interval=poll_interval, label_interval=label_interval,
        drift_interval=drift_interval, backoff_max=backoff_max,
        follow_document_changes=follow_document_changes, expected_digest=document_digest,
        converge_timeout=converge_timeout)
    runner = Agent(settings, kube)
    server = listening(runner)
    stop = threading.Event()

    def stop_now(*_: object) -> None:
        stop.set()
        interrupt.set()  # a converge in progress stops between two changes, as `apply` does

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_now)
    logging.getLogger("divingbell.agent").info(
        "agent for node %s on %s, serving %s; %s", name, root, listen,
        "following document changes" if follow_document_changes
        else "the document read at start is kept until the agent restarts")
    runner.run(stop)
    server.shutdown()


def _fleet_agent(server: str | None, token_file: Path | None, files: tuple[Path, ...],
                 host: Host, poll_interval: float, fleet_interval: float,
                 drift_interval: float, backoff_max: float, revert_after: float) -> Agent:
    """The agent's fleet mode (divingbell/agent/fleet_source.py): stdlib-only."""
    from divingbell.agent.fleet_source import build
    from divingbell.fleet.client import CREDENTIAL_PATH, FleetApiError, read_token

    if server is None:
        raise click.UsageError("give the document FILES, or --server URL for fleet mode")
    if files:
        raise click.UsageError("FILES and --server exclude each other: in fleet mode the "
                               "document comes from the service")
    try:
        credential = read_token(token_file or CREDENTIAL_PATH)
        return build(server, credential, host, poll_interval=poll_interval,
                     fetch_interval=fleet_interval, report_interval=fleet_interval,
                     drift_interval=drift_interval, backoff_max=backoff_max,
                     credential_file=token_file or CREDENTIAL_PATH,
                     revert_after=revert_after)
    except (FleetApiError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
