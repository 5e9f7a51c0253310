"""An agent's whole maintenance sequence on a real API server: the DaemonSet from `divingbell
manifests`, its pod run by the stand-in kubelet (tests/kube/standin.py) with the pod-bound
token, on a node whose root is a Debian root with Debian's real GRUB (tests/grubroot.py).

The document adds a kernel parameter, so the agent's own plan needs a reboot: it writes the
GRUB drop-in, runs update-grub and leaves /run/reboot-required. Then, one agent tick at a time:
a slot Lease, its own node cordoned, a drain through the Eviction API that a
PodDisruptionBudget blocks and that is retried once the budget allows it, `systemctl reboot`.
The container is started inside a mount namespace of its own where the root's systemctl is a
script recording the call, and where the running kernel's boot id and command line are files
the test writes: the "reboot" stops the container, the boot id and command line become those of
the next boot (the line GRUB boots), and the container starts again (restartPolicy Always).
The second agent finds a new boot, the parameter running, the node Ready: it uncordons the node
and releases the slot."""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from divingbell.agent.manifests import build, to_yaml
from divingbell.core.host import Host
from divingbell.core.modules.kernel import GRUBENV
from divingbell.maintenance.decide import CORDONED_BY, lease_name
from tests.grubroot import BOOTED, KERNEL, grub_root, next_boot_line
from tests.kube.agents import Agents, put_back, revisions
from tests.kube.controlplane import ApiError, ControlPlane, Rest
from tests.kube.kubelet import add_node, add_pod, finish_deletions, set_ready
from tests.kube.standin import StandInKubelet, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.kernel]

MAINTENANCE_NODES = {"divingbell.test/maintenance": "yes"}
DOCUMENT = {"site.yaml": """\
conf:
  kernel:
    cmdline:
      hugepages: 16
  maintenance:
    reboot:
      when: [reboot-required]
      drain:
        timeout: 10m
        grace_period: 2s
      health:
        timeout: 10m
      slot_ttl: 10m
"""}
SYSTEMCTL_CALLS = "var/log/systemctl-calls"  # in the node's root
STUB = f"""#!/bin/sh
# A stand-in for systemctl: records how it was called, inside the node's root.
echo "$*" >> /{SYSTEMCTL_CALLS}
"""


@dataclass
class Node:
    name: str
    root: Path  # its "/" (the pod's hostPath)
    boot_id: Path  # what it sees as /proc/sys/kernel/random/boot_id
    cmdline: Path  # ... and as /proc/cmdline
    kubelet: StandInKubelet
    admin: Rest

    def annotations(self) -> dict[str, str]:
        found: dict[str, str] = self.admin.get(f"/api/v1/nodes/{self.name}")["metadata"].get(
            "annotations", {})
        return found

    def phase(self) -> str:
        return self.annotations().get("divingbell.io/maintenance", "")

    def calls(self) -> list[str]:
        path = self.root / SYSTEMCTL_CALLS
        return path.read_text().splitlines() if path.exists() else []

    def explain(self) -> str:
        return f"{self.annotations()}\n{self.kubelet.log(self.name)[-3000:]}"

    def reboot(self) -> None:
        """What `systemctl reboot` would have led to: every container stopped, then a new boot
        (a new boot id, the command line GRUB boots now), then the containers start again."""
        self.kubelet.power_off(self.name)
        line = self.next_boot_line()
        # GRUB's own `save_env` of the emptied one-time line (the kernel module's trial).
        subprocess.run(["chroot", self.root, "grub-editenv", GRUBENV, "set", "divingbell_try="],
                       check=True)
        self.boot_id.write_text(f"{uuid.uuid4()}\n")
        self.cmdline.write_text(f"BOOT_IMAGE={KERNEL} " + " ".join(line) + "\n")
        self.kubelet.power_on(self.name)

    def next_boot_line(self) -> list[str]:
        """The line GRUB boots next: its default entry with the environment block's line."""
        return next_boot_line(Host(root=self.root))


@pytest.fixture
def node(agents: Agents, kube_cluster: ControlPlane, grub_image: Path, tmp_path: Path
         ) -> Iterator[Node]:
    name, netns = f"{agents.namespace}-m", f"dbm-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    add_node(agents.admin, name, labels=MAINTENANCE_NODES)
    boot_id, cmdline, stub = tmp_path / "boot_id", tmp_path / "cmdline", tmp_path / "systemctl"
    boot_id.write_text(f"{uuid.uuid4()}\n")
    cmdline.write_text(BOOTED)
    stub.write_text(STUB)
    stub.chmod(0o755)
    with grub_root(grub_image, tmp_path) as root:
        mounts = " && ".join(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}"
                             for source, target in (
                                 (stub, str(root / "usr/bin/systemctl")),
                                 (boot_id, "/proc/sys/kernel/random/boot_id"),
                                 (cmdline, "/proc/cmdline")))
        kubelet = StandInKubelet(
            kube_cluster, agents.admin, agents.namespace, {name: netns}, tmp_path,
            host_roots={name: root},
            launchers={name: ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              f'{mounts} && exec "$@"', "container"]})
        before = set(revisions(agents))
        kubelet.start()
        try:
            yield Node(name, root, boot_id, cmdline, kubelet, agents.admin)
        finally:
            kubelet.close()
            put_back(agents, before)
            # A test that failed mid-sequence must not leave the group's slot held by a node
            # that is gone: the next test's agents would wait for it.
            try:
                agents.admin.request("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/"
                                               f"{agents.namespace}/leases/"
                                               f"{lease_name('default', 0)}")
            except ApiError as error:
                if error.code != 404:
                    raise
            agents.admin.request("DELETE", f"/api/v1/nodes/{name}")
            subprocess.run(["ip", "netns", "del", netns], check=False)


def _budget(admin: Rest, namespace: str) -> None:
    admin.post(f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets", {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "db", "namespace": namespace},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "db"}}}})
    path = f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets/db"
    wait_for("the budget to count both pods",
             lambda: admin.get(path).get("status", {}).get("currentHealthy") == 2, 30,
             lambda: str(admin.get(path)))


def _lease(agents: Agents) -> dict[str, Any]:
    found: dict[str, Any] = agents.admin.get(
        f"/apis/coordination.k8s.io/v1/namespaces/{agents.namespace}/leases/"
        f"{lease_name('default', 0)}")
    return found


def test_the_agent_reboots_its_node_through_the_whole_sequence(
        agents: Agents, node: Node, kube_namespace: str, kube_cluster: ControlPlane) -> None:
    admin, ns = agents.admin, kube_namespace
    for pod, on in (("db-1", node.name), ("db-2", agents.node_b)):
        add_pod(admin, ns, pod, on, labels={"app": "db"})
        set_ready(admin, ns, pod)
    _budget(admin, ns)

    objects = build(DOCUMENT, namespace=agents.namespace, image="registry.example/db:1")
    (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
    daemonset["spec"]["template"]["spec"]["nodeSelector"] = dict(MAINTENANCE_NODES)
    kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                         input_text=to_yaml(objects))

    # The plan needed a reboot: applied, the sentinel left, a slot taken, the node cordoned,
    # and the drain held up by the budget.
    wait_for("the drain to be refused by the budget", lambda: "refused by a "
             "PodDisruptionBudget for " + f"{ns}/db-1" in node.annotations().get(
                 "divingbell.io/maintenance-reason", ""), 180, node.explain)
    assert (node.root / "run/reboot-required").exists()
    assert "hugepages=16" in node.next_boot_line()
    assert node.phase() == "draining"
    spec = admin.get(f"/api/v1/nodes/{node.name}")["spec"]
    assert spec.get("unschedulable") is True
    assert node.annotations()[CORDONED_BY] == "divingbell-agent"
    assert _lease(agents)["spec"]["holderIdentity"] == node.name
    assert node.calls() == []

    # Another replica becomes Ready elsewhere: the retried eviction goes through, the pod
    # leaves the node (its kubelet removes it), and the agent reboots.
    add_pod(admin, ns, "db-3", agents.node_b, labels={"app": "db"})
    set_ready(admin, ns, "db-3")

    def rebooting() -> bool:
        finish_deletions(admin, node.name)
        return node.calls() != []

    wait_for("systemctl reboot", rebooting, 120, node.explain)
    assert node.calls() == ["reboot --no-block"]
    assert node.phase() == "rebooting"
    pods = admin.get(f"/api/v1/namespaces/{ns}/pods")["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == ["db-2", "db-3"]

    node.reboot()
    wait_for("the maintenance to finish", lambda: node.phase() == "idle", 180, node.explain)
    annotations = node.annotations()
    print(f"\nmaintenance: {annotations['divingbell.io/maintenance-outcome']}")
    assert annotations["divingbell.io/maintenance-outcome"].startswith("rebooted (reboot)"), (
        annotations)
    assert not admin.get(f"/api/v1/nodes/{node.name}")["spec"].get("unschedulable")
    assert CORDONED_BY not in annotations
    assert not _lease(agents)["spec"].get("holderIdentity")
    assert not (node.root / "run/reboot-required").exists()
    assert node.calls() == ["reboot --no-block"]  # the second agent did not reboot again
    assert node.kubelet.log(node.name).count("agent for node") == 2, node.explain()
    events = admin.get("/api/v1/namespaces/default/events",
                       fieldSelector=f"involvedObject.name={node.name}")["items"]
    reasons = {e["reason"] for e in events}
    for reason in ("SlotClaimed", "Cordoned", "Drained", "Rebooting", "Booted", "Uncordoned",
                   "SlotReleased", "MaintenanceDone"):
        assert reason in reasons, reasons
