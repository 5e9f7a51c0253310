"""Take a node out of the cluster: drain it, remove the labels divingbell set, stop the kubelet,
delete its Node object and remove the files its bootstrap script wrote for the kubelet.

Draining belongs to the maintenance part (issue 15): it is looked up at run time, so this
module works, and says what is missing, whether or not that part is installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from divingbell.bootstrap.labels import remove_owned_labels
from divingbell.bootstrap.paths import MANIFESTS, PATHS
from divingbell.core.errors import CommandError, DivingbellError
from divingbell.core.host import Host
from divingbell.kube import KubeError, NodeLabelApi

KUBELET_UNIT = "kubelet.service"
# What a join script wrote for the kubelet (the runtime's configuration and the apt sources
# stay: other things on the host may use them).
KUBELET_FILES = tuple(PATHS[key] for key in ("kubelet_dropin", "kubelet_config", "kubeconfig",
                                              "cert", "key", "ca"))


class TeardownError(DivingbellError):
    """Teardown cannot go on; the message says what to do."""


def find_drainer() -> Callable[[Any, str], Any] | None:
    """`divingbell.maintenance.drain(api, node)` when the maintenance part provides it."""
    try:
        module = importlib.import_module("divingbell.maintenance")
    except ModuleNotFoundError:
        return None
    drain = getattr(module, "drain", None)
    return drain if callable(drain) else None


def run_teardown(api: NodeLabelApi, host: Host, node: str, *, drain: bool = True,
                 drainer: Callable[[Any, str], Any] | None = None,
                 delete_node: bool = True) -> list[dict[str, str]]:
    steps: list[dict[str, str]] = []
    if host.exists(f"{MANIFESTS}/kube-apiserver.yaml"):
        raise TeardownError(
            f"{node} runs the control plane ({MANIFESTS}/kube-apiserver.yaml): taking it apart "
            "would take the cluster's API with it; nothing was changed")
    if drain:
        drainer = drainer or find_drainer()
        if drainer is None:
            raise TeardownError(
                "draining needs divingbell's maintenance part, which is not installed here: "
                f"drain {node} first (kubectl drain {node} --ignore-daemonsets) and run again "
                "with --no-drain; nothing was changed")
        try:
            drainer(api, node)
        except Exception as exc:  # the drainer's own errors name the pods that block
            raise TeardownError(f"drain of {node} did not finish: {exc}; the node stays "
                                "cordoned, its labels and kubelet are untouched (drain it "
                                "yourself and run again with --no-drain)") from None
        steps.append({"step": "drain", "result": "drained"})
    else:
        steps.append({"step": "drain", "result": "skipped (--no-drain)"})
    try:
        change = remove_owned_labels(api, node)
        steps.append({"step": "labels", "result": (f"removed {', '.join(change.removed)}"
                                                   if change.removed else "none to remove")})
    except KubeError as exc:
        if exc.code != 404:
            raise
        # A second run after the Node was deleted: finish what is left on the host.
        steps.append({"step": "labels", "result": "the Node is already gone"})
    try:
        if host.is_systemd_running():
            host.run(["systemctl", "disable", "--now", KUBELET_UNIT])
        else:
            host.run(["systemctl", "disable", KUBELET_UNIT])
    except CommandError as exc:
        raise TeardownError(f"could not stop the kubelet: {exc}") from None
    steps.append({"step": "kubelet", "result": "stopped and disabled"})
    if delete_node:
        # After the kubelet stopped: a running kubelet registers its Node again.
        try:
            api.delete_node(node)
            steps.append({"step": "node", "result": "deleted"})
        except KubeError as exc:
            if exc.code != 404:
                raise
            steps.append({"step": "node", "result": "already gone"})
    removed = [path for path in KUBELET_FILES if host.remove(path)]
    if PATHS["kubelet_dropin"] in removed and host.is_systemd_running():
        host.run(["systemctl", "daemon-reload"])
    steps.append({"step": "files", "result": f"removed {', '.join(removed)}" if removed
                  else "none left"})
    return steps
