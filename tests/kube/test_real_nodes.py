"""Real nodes (tests/kube/node.py): a kubelet, containerd and runc in a booted systemd-nspawn
machine, joined to the session's control plane. Pods really run, and a privileged pod can
change its node's own net.* sysctls but not the machine's kernel tunables."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.kube.controlplane import Rest
from tests.kube.node import RealNodes
from tests.kube.standin import wait_for

pytestmark = [pytest.mark.kube, pytest.mark.kernel]

# Writes back the value it read, so a missing guard would change nothing on the machine.
GUARD_CHECK = """
value=$(cat /proc/sys/vm/swappiness)
if echo "$value" > /proc/sys/vm/swappiness 2>/dev/null; then echo "vm.* writable"; exit 1; fi
value=$(cat /proc/sys/net/ipv4/tcp_fin_timeout)
echo "$value" > /proc/sys/net/ipv4/tcp_fin_timeout || { echo "net.* read-only"; exit 2; }
[ "$(cat /proc/sys/kernel/random/boot_id)" = "$NODE_BOOT_ID" ] || { echo "not the node's boot id"; exit 3; }
echo guarded
"""


def _pod(admin: Rest, namespace: str, node: str, image: str, script: str) -> dict[str, Any]:
    pod: dict[str, Any] = admin.post(f"/api/v1/namespaces/{namespace}/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "guard", "namespace": namespace},
        "spec": {"nodeName": node, "hostNetwork": True, "restartPolicy": "Never",
                 "containers": [{"name": "main", "image": image,
                                 "imagePullPolicy": "Never", "command": ["sh", "-c", script],
                                 "terminationMessagePolicy": "FallbackToLogsOnError",
                                 "securityContext": {"privileged": True}}]}})
    return pod


def test_a_privileged_pod_on_a_real_node_changes_only_net_sysctls(
        real_nodes: RealNodes, kube_admin: Rest, kube_namespace: str) -> None:
    node = real_nodes.nodes[0]
    started = time.monotonic()
    boot_id = node.run("cat", "/proc/sys/kernel/random/boot_id").stdout.strip()
    assert boot_id != Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    _pod(kube_admin, kube_namespace, node.name, real_nodes.divingbell_image,
         f"NODE_BOOT_ID={boot_id}\n{GUARD_CHECK}")
    path = f"/api/v1/namespaces/{kube_namespace}/pods/guard"

    def finished() -> bool:
        return kube_admin.get(path).get("status", {}).get("phase") in ("Succeeded", "Failed")

    wait_for("the pod to finish", finished, 120,
             lambda: f"{kube_admin.get(path).get('status')}\n{node.journal()}")
    print(f"\npod finished {time.monotonic() - started:.1f} s after it was created")
    status = kube_admin.get(path)["status"]
    (container,) = status["containerStatuses"]
    assert status["phase"] == "Succeeded", container["state"]
