"""`divingbell documents`: the document Secrets of the agent on Kubernetes, and pruning them."""

from __future__ import annotations

import json
import sys

import click

from divingbell.agent.manifests import APP, check_namespace


def _namespace(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_namespace(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.option("--namespace", default=APP, show_default=True, callback=_namespace,
              help="Where `divingbell manifests` put the agent.")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False), envvar="KUBECONFIG",
              help="Which cluster. Default: in-cluster, else ~/.kube/config.")
@click.option("--prune", is_flag=True,
              help="Delete the document Secrets that neither the DaemonSet nor any revision "
              "it keeps for `kubectl rollout undo` mounts.")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output for people or for scripts.")
def documents(namespace: str, kubeconfig: str | None, prune: bool, output_format: str) -> None:
    """List the document Secrets (divingbell-document-<digest>) and what uses each.

    Every `divingbell manifests | kubectl apply` of a new document adds an immutable Secret;
    the old ones stay so that `kubectl -n NAMESPACE rollout undo daemonset/divingbell` can go
    back. A Secret is in use while the DaemonSet's template or one of the revisions it keeps
    (revisionHistoryLimit, 5) mounts it. --prune deletes the others.

    \b
      divingbell documents                   # NAME  DIGEST  CREATED  USED BY
      divingbell documents --prune           # delete the unused ones
    """
    from divingbell.kube import KubeError, LightkubeApi

    try:
        api = LightkubeApi(kubeconfig)
        found = api.document_secrets(namespace, APP)
        deleted = []
        if prune:
            for secret in found:
                if not secret.used_by:
                    api.delete_secret(namespace, secret.name)
                    deleted.append(secret.name)
    except KubeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if output_format == "json":
        click.echo(json.dumps({
            "namespace": namespace,
            "documents": [{"name": s.name, "digest": s.digest, "created": s.created,
                           "used_by": list(s.used_by), "deleted": s.name in deleted}
                          for s in found]}, indent=2))
        return
    from divingbell.commands.output import table

    click.echo(table(["NAME", "DIGEST", "CREATED", "USED BY"],
                     [[s.name, s.digest, s.created,
                       "deleted" if s.name in deleted else ", ".join(s.used_by) or "-"]
                      for s in found]))
    unused = sum(1 for s in found if not s.used_by)
    if prune:
        click.echo(f"{len(found)} document Secret(s), {len(deleted)} deleted.")
    else:
        click.echo(f"{len(found)} document Secret(s), {unused} unused"
                   + (" (divingbell documents --prune deletes them)." if unused else "."))
